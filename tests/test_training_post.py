"""Post-training on the engine: the assistant-token mask token by token for both template families,
WICEL and ALR against their definitions, DPO-P against a hand computation and against plain DPO,
GRPO's verifiable reward, bad data as one line and exit 2, and short real runs of each verb."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orlik.training import chats, dpo, grpo, sft
from orlik.training.defaults import SFT_TRAIN, RunOptions

CONVERSATION = [
    {"role": "system", "content": "Odpowiadaj krótko."},
    {"role": "user", "content": "Jaka jest stolica Polski?"},
    {"role": "assistant", "content": "Warszawa."},
    {"role": "user", "content": "A największe jezioro?"},
    {"role": "assistant", "content": "Śniardwy."},
]


def mask_runs(tok: Any, messages: list[dict[str, str]]) -> list[tuple[bool, str]]:
    """The rendered chat as maximal runs of (carries loss, decoded text), token by token."""
    e = chats.encode_chat(tok, messages, 4096)
    runs: list[tuple[bool, list[int]]] = []
    for i, lbl in zip(e["input_ids"], e["labels"], strict=True):
        on = lbl != chats.IGNORE
        assert lbl in (i, chats.IGNORE)  # a label is the token itself or nothing
        if runs and runs[-1][0] == on:
            runs[-1][1].append(i)
        else:
            runs.append((on, [i]))
    return [(on, tok.decode(ids)) for on, ids in runs]


# ---------------------------------------------------------------- the mask, token by token
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_label_mask_token_by_token(arch: str, family_checkpoint: Callable[[str], Path]) -> None:
    """Only the assistant's words and the token that ends its turn carry loss; the system prompt,
    the user turns and every control sequence ([INST] ... [/INST], <|im_start|>role) are masked."""
    from orlik.checkpoint import Checkpoint

    tok = Checkpoint.open(family_checkpoint(arch)).load_tokenizer()
    runs = mask_runs(tok, CONVERSATION)
    end = "</s>" if arch == "llama" else "<|im_end|>"
    assert [t.strip() for on, t in runs if on] == [f"Warszawa.{end}", f"Śniardwy.{end}"], runs
    masked = "".join(t for on, t in runs if not on)
    for piece in ("Odpowiadaj krótko.", "Jaka jest stolica Polski?", "A największe jezioro?"):
        assert piece in masked
    if arch == "llama":
        assert masked.count("[INST]") == 2 and masked.count("[/INST]") == 2 and masked.startswith("<s>")
    else:
        assert masked.count("<|im_start|>") == 5 and "assistant\n" in masked
        assert masked.count("<|im_end|>") == 3  # system and the two user turns; assistant ends are trained
    # The rendering is the checkpoint's own template: the mask does not change what the model reads.
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert chats.encode_chat(tok, CONVERSATION, 4096)["input_ids"] == ids


# ---------------------------------------------------------------- WICEL and ALR
def _batch(seed: int = 0) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = chats.IGNORE  # a prompt
    labels[2, 4:] = chats.IGNORE  # padding
    return logits, labels


def test_wicel_with_unit_weights_is_masked_cross_entropy() -> None:
    import torch
    import torch.nn.functional as F

    logits, labels = _batch()
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=chats.IGNORE
    )
    got = sft.wicel_loss(logits, labels, torch.ones(3))
    assert torch.allclose(got, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(sft.wicel_loss(logits, labels, torch.tensor([1.0, 0.5, 1.0])), plain)


def test_wicel_half_weight_gives_half_the_gradient() -> None:
    """Sample 1's own contribution to the gradient (loss with it minus loss with weight 0) halves at 0.5."""
    import torch

    logits, labels = _batch(1)

    def grad(w: float) -> Any:
        x = logits.clone().requires_grad_(True)
        sft.wicel_loss(x, labels, torch.tensor([1.0, w, 1.0])).backward()
        return x.grad

    full, half, none = grad(1.0) - grad(0.0), grad(0.5) - grad(0.0), grad(0.0)
    assert full.abs().sum() > 0
    assert torch.allclose(half, 0.5 * full, atol=1e-7)
    assert torch.equal(none[1], torch.zeros_like(none[1]))  # weight 0 removes the sample's pull


@pytest.mark.parametrize(("quality", "weight"), [("high", 1.0), ("medium", 0.7), ("low", 0.5)])
def test_quality_labels_map_to_weights(quality: str, weight: float) -> None:
    rec = {"messages": CONVERSATION, "quality": quality}
    assert chats.check_chat(rec, "x")["weight"] == weight
    assert chats.check_chat({"messages": CONVERSATION, "weight": 0.25}, "x")["weight"] == 0.25


def test_alr_formula() -> None:
    assert sft.alr(1e-3, 2048, 2048) == 1e-3
    assert math.isclose(sft.alr(1e-3, 512, 2048), 5e-4)  # a quarter of the tokens: half the rate
    assert math.isclose(sft.alr(2e-4, 8192, 2048), 4e-4)


# ---------------------------------------------------------------- bad data: one line, exit 2
def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("verb", "record", "message"),
    [
        ("sft", {"text": "no messages"}, r"data\.jsonl:2: missing 'messages'"),
        (
            "sft",
            {"messages": [{"role": "user", "content": "Hej"}]},
            "data.jsonl:2: the chat has no assistant turn",
        ),
        (
            "sft",
            {"messages": CONVERSATION, "quality": "great"},
            "unknown quality 'great'; valid: high, medium, low",
        ),
        ("sft", {"messages": CONVERSATION, "weight": -1}, "weight must be a positive number"),
        (
            "dpo",
            {"prompt": "Pytanie?", "chosen": "Odpowiedź.", "rejected": " "},
            "has an empty 'rejected' side",
        ),
        ("dpo", {"prompt": "Pytanie?", "chosen": "", "rejected": "Zła."}, "has an empty 'chosen' side"),
        ("grpo", {"question": "Stolica Polski?", "answers": []}, "'answers' must be a non-empty list"),
    ],
)
def test_bad_data_exits_2_with_one_line(
    verb: str, record: dict[str, Any], message: str, family_checkpoint: Callable[[str], Path], tmp_path: Path,
    orlik_cli: Callable[..., Any],
) -> None:  # fmt: skip
    import re

    good = {
        "sft": {"messages": CONVERSATION},
        "dpo": {"prompt": "Pytanie?", "chosen": "Tak.", "rejected": "Nie."},
        "grpo": {"question": "Stolica Polski?", "answers": ["Warszawa"]},
    }[verb]
    data = _write(tmp_path / "data.jsonl", [good, record])
    out = tmp_path / "out"
    r = orlik_cli("train", verb, family_checkpoint("llama"), "--data", data, "--out", out)
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and re.search(message, lines[0]), r.err
    assert not out.exists() and not out.with_name("out.work").exists()


# ---------------------------------------------------------------- DPO-P
def test_dpop_loss_matches_a_hand_computation() -> None:
    import torch

    # Policy log-probs of chosen/rejected, reference log-probs of the same.
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-12.0, -15.0, -11.0, -13.0))
    beta, lam = 0.1, 5.0
    # margin = (-12 + 11) - (-15 + 13) - 5 * max(0, -11 + 12) = -1 + 2 - 5 = -4
    hand = math.log(1 + math.exp(0.4))  # -log sigmoid(0.1 * -4)
    assert math.isclose(float(dpo.dpop_loss(pc, pr, rc, rr, beta, lam)), hand, rel_tol=1e-6)
    # With the chosen answer above its reference the penalty is zero: plain DPO's value.
    pc2 = torch.tensor([-10.0])  # margin = 1 + 2 = 3
    assert math.isclose(
        float(dpo.dpop_loss(pc2, pr, rc, rr, beta, lam)), math.log(1 + math.exp(-0.3)), rel_tol=1e-6
    )
    assert math.isclose(
        float(dpo.dpop_loss(pc, pr, rc, rr, beta, 0.0)), math.log(1 + math.exp(-0.1)), rel_tol=1e-6
    )


def _two_token_policy(lam: float, steps: int = 200) -> tuple[float, float, float]:
    """Pal et al.'s failure case in miniature: answers drawn token by token from one categorical,
    y_w = (a, b) and y_l = (a, a). Raising the margin pushes b up and a down, and the sum of both
    falls (log Z grows), so plain DPO lowers log pi(y_w). Returns the chosen log-ratio
    log pi(y_w) - log pi_ref(y_w) at the end, its lowest value on the way, and the final margin."""
    import torch

    theta = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)

    def logps() -> tuple[Any, Any]:
        lp = torch.log_softmax(theta, 0)
        return lp[0] + lp[1], lp[0] + lp[0]

    with torch.no_grad():
        rc, rr = logps()
    lowest = 0.0
    for _ in range(steps):
        pc, pr = logps()
        loss = dpo.dpop_loss(pc, pr, rc, rr, beta=0.1, lam=lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lowest = min(lowest, float(logps()[0] - rc))
    with torch.no_grad():
        pc, pr = logps()
        return float(pc - rc), lowest, float((pc - rc) - (pr - rr))


def test_dpo_lowers_the_chosen_likelihood_and_dpop_does_not() -> None:
    """Same pair, same optimizer, beta 0.1: lambda 0 (plain DPO) against the default lambda 50."""
    plain, _, plain_margin = _two_token_policy(lam=0.0)
    positive, lowest, margin = _two_token_policy(lam=50.0)
    assert plain < -1.0 and plain_margin > 0, plain  # measured -5.77: the preferred answer got less likely
    assert positive > 0 and lowest > -0.05, (positive, lowest)  # measured +0.20, never below -0.03
    assert margin > 1.0, margin  # and DPO-P still learned the preference (measured 1.54)


# ---------------------------------------------------------------- GRPO's reward
def test_grpo_reward_is_format_plus_answer() -> None:
    ok = [["Warszawa"]] * 5
    done = ["Warszawa", "warszawa.", "To Warszawa", "Kraków", "To jest na pewno miasto Warszawa w Polsce"]
    assert grpo.reward(done, ok) == [2.0, 2.0, 0.5, 1.0, 0.0]
    assert grpo.reward([[{"role": "assistant", "content": "Wisła"}]], [["Wisła"]]) == [2.0]
    assert grpo.reward([""], [["Wisła"]]) == [0.0]
    assert len(grpo.load_task(None)) >= 20


# ---------------------------------------------------------------- real runs on the tiny model
# The 20-step family checkpoint and short chats keep these runs to about a minute on 2 idle cores.
SFT_RUN = dict(steps=12, batch_size=4, max_len=256)
SFT_TRAIN_ARGS = replace(SFT_TRAIN, **SFT_RUN)


@pytest.fixture(scope="module")
def base(family_checkpoint: Callable[[str], Path]) -> Path:
    return family_checkpoint("llama")


@pytest.fixture(scope="module")
def sft_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "fp16"
    sft.run(base, out, train=SFT_TRAIN_ARGS, opts=RunOptions(threads=1, checkpoint_every=1000))
    return out


def test_sft_lowers_heldout_assistant_loss(sft_run: Path, base: Path) -> None:
    rep = json.loads((sft_run / "training.json").read_text())
    assert rep["heldout_assistant_loss_after"] < rep["heldout_assistant_loss_before"], rep
    assert rep["heldout_chats"] == 50 and rep["train_chats"] == 170
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (sft_run / name).read_bytes() == (base / name).read_bytes(), name
    from safetensors import safe_open

    with safe_open(str(sft_run / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118


def test_alr_is_logged_per_step_from_the_steps_loss_tokens(sft_run: Path, base: Path) -> None:
    """Each step's rate is the scheduled rate times sqrt(T / BS), with T the loss tokens of exactly
    the chats that step trained on (recounted here from the step's batch)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from orlik.checkpoint import Checkpoint

    rep = json.loads((sft_run / "training.json").read_text())
    rows, args = rep["alr"], rep["args"]
    steps, bs = SFT_RUN["steps"], SFT_RUN["batch_size"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    tok = Checkpoint.open(base).load_tokenizer()
    examples = sft.encode(tok, chats.load_chats(None), args["max_len"])
    data = sft.StepChats(examples, args["seed"], steps, bs)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args["lr"])
    sched = get_cosine_schedule_with_warmup(
        opt, num_warmup_steps=max(1, steps // 10), num_training_steps=steps
    )
    for step, row in enumerate(rows):
        labels = [data[step * bs + j]["labels"] for j in range(bs)]
        tokens = sum(sum(1 for x in lab[1:] if x != chats.IGNORE) for lab in labels)
        assert row["loss_tokens"] == tokens
        scheduled = sched.get_last_lr()[0]
        assert math.isclose(row["lr"], scheduled * math.sqrt(tokens / args["alr_baseline"]), rel_tol=1e-6)
        opt.step()
        sched.step()


def test_dpo_cli_writes_a_checkpoint(sft_run: Path, tmp_path: Path, orlik_cli: Callable[..., Any]) -> None:
    out = tmp_path / "dpo"
    r = orlik_cli("--json", "train", "dpo", sft_run, "--out", out, "--steps", "3", "--batch-size", "4",
                  "--lambda", "25", "--threads", "1")  # fmt: skip
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["lambda"] == 25 and summary["steps"] == 3 and summary["heldout_pairs"] == 22
    rep = json.loads((out / "training.json").read_text())
    assert len(rep["losses"]) == 3 and math.isclose(rep["losses"][0], math.log(2), rel_tol=1e-4)
    assert (out / "model.safetensors").is_file() and not out.with_name("dpo.work").exists()


def test_grpo_cli_runs_and_reports_rewards(
    sft_run: Path, tmp_path: Path, orlik_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "grpo"
    r = orlik_cli("--json", "train", "grpo", sft_run, "--out", out, "--steps", "2", "--generations", "4",
                  "--max-completion", "8", "--threads", "1")  # fmt: skip
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert 0 <= summary["mean_reward_before"] <= 2 and 0 <= summary["mean_reward_after"] <= 2
    rep = json.loads((out / "training.json").read_text())
    assert sum("reward" in row for row in rep["log"]) == 2


def test_serve_answers_a_chat_on_the_sft_checkpoint_with_the_sft_template(sft_run: Path) -> None:
    """`orlik serve` on the SFT checkpoint (in process, the FP16 transformers runtime): a chat completion
    is a 200 with an assistant reply, and the prompt the server generates from is, token for token,
    the prefix SFT trained the first answer on (its template rendering up to the assistant turn)."""
    from starlette.testclient import TestClient

    from orlik.checkpoint import Checkpoint
    from orlik.serving import server
    from orlik.training import configs

    assert (sft_run / "chat_template.jinja").read_text() == configs.chat_template("llama")
    enc = chats.encode_chat(Checkpoint.open(sft_run).load_tokenizer(), CONVERSATION[:3], 256)
    first = next(i for i, lab in enumerate(enc["labels"]) if lab != chats.IGNORE)
    trained_prompt = enc["input_ids"][:first]
    app = server.build([f"sft={sft_run}"], parallel=1, threads=1)
    try:
        with TestClient(app) as client:
            served = client.post("/tokenize", json={"model": "sft", "messages": CONVERSATION[:2]})
            assert served.status_code == 200 and served.json()["tokens"] == trained_prompt
            r = client.post("/v1/chat/completions", json={"model": "sft", "messages": CONVERSATION[:2],
                                                          "max_tokens": 8, "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["message"]["role"] == "assistant"
            assert isinstance(body["choices"][0]["message"]["content"], str)
            assert body["usage"]["prompt_tokens"] == len(trained_prompt)
            assert 1 <= body["usage"]["completion_tokens"] <= 8
            card = client.get("/v1/models/sft").json()
            assert Path(card["chat_template"]).resolve() == (sft_run / "chat_template.jinja").resolve()
    finally:
        app.state.orlik.registry.close()
