"""`orlik eval` end to end: a task whose right answer is the FP16 model's own greedy next token
scores 100% through `orlik serve` and lm-eval; bad input is one line and exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = ["Ala ma kota, a kot ma", "W Krakowie pada dziś", "Najlepsza zupa to", "Pociąg do Gdańska odjeżdża",
           "Wczoraj kupiliśmy nowy", "Lekarz powiedział, że", "Na śniadanie zjadłem", "Mój brat mieszka w",
           "Rada Miejska przyjęła", "Po deszczu wyszło", "Książka opowiada o", "Nad jeziorem stoi"]  # fmt: skip
YAML = """task: {name}
custom_dataset: !function jsonl.load
dataset_kwargs:
  file: {name}.jsonl
  fields: [prompt, choices, label]
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def _known_answer_task(ckpt: Path, out: Path) -> int:
    """Items whose first choice is the argmax token after the prompt, tokenized as lm-eval does
    (no BOS, continuation split at the context's length); three other tokens are the distractors."""
    from orlik.benchmarks.tasks import jsonl
    from orlik.serving.runtimes.base import load_runtime

    rt = load_runtime(ckpt, threads=1)
    rng = np.random.default_rng(0)
    items: list[dict[str, Any]] = []
    for i, prompt in enumerate(PROMPTS):
        ctx = rt.tokenize(prompt, add_bos=False, special=True)
        order = np.argsort(-rt.logits(ctx)[-1])
        pieces = []
        for t in [int(order[0]), *(int(x) for x in rng.permutation(order[1:200]))]:
            text = rt.detokenize([*ctx, t])[len(rt.detokenize(ctx)) :]
            if text.strip() and rt.tokenize(prompt + text, add_bos=False, special=True) == [*ctx, t]:
                pieces.append(text)
            elif t == int(order[0]):
                break  # the greedy token does not survive re-tokenization: no item from this prompt
            if len(pieces) == 4:
                label = i % 4
                choices = pieces[1:]
                choices.insert(label, pieces[0])
                items.append({"prompt": prompt, "choices": choices, "label": label})
                break
    rt.close()
    (out / "known_answer.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    (out / "known_answer.yaml").write_text(YAML.format(name="known_answer"))
    (out / "jsonl.py").write_text(Path(jsonl.__file__).read_text())  # the loader the YAML names
    return len(items)


def test_greedy_answer_scores_100_percent_on_fp16(
    tiny_checkpoint: Path, tmp_path: Path, orlik_cli: Callable[..., Any]
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    n = _known_answer_task(tiny_checkpoint, tasks)
    assert n >= 4, "too few prompts whose greedy token re-tokenizes the same"
    out = tmp_path / "reports"
    r = orlik_cli("--json", "eval", tiny_checkpoint, "--variants-dir", tmp_path / "none", "--include", tasks,
                  "--tasks", "known_answer,pl_yes_no", "--limit", "20", "--threads", "1", "--parallel", "2",
                  "--out", out)  # fmt: skip
    assert r.code == 0, r.err
    res = json.loads((out / "eval.json").read_text())
    fp16 = res["variants"][0]
    assert fp16["name"] == "FP16" and fp16["tasks"]["known_answer"]["n"] == n
    assert fp16["tasks"]["known_answer"]["acc"] == 1.0
    assert 0.0 <= fp16["tasks"]["pl_yes_no"]["acc"] <= 1.0 and res["tasks"]["pl_yes_no"]["majority"] == 0.5
    assert "| majority class |" in (out / "eval.md").read_text()


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, orlik_cli: Callable[..., Any], tiny_checkpoint: Path
) -> None:
    from orlik.benchmarks.serving_proc import free_port

    r = orlik_cli("eval", tiny_checkpoint, "--tasks", "pl_nonexistent")
    assert r.code == 2 and "unknown task 'pl_nonexistent'" in r.err and len(r.err.strip().splitlines()) == 1
    r = orlik_cli("eval", "--base-url", f"http://127.0.0.1:{free_port()}")
    assert r.code == 2 and "cannot reach" in r.err and len(r.err.strip().splitlines()) == 1

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.jsonl").write_text(json.dumps({"prompt": "x", "choices": ["a", "b"]}) + "\n")  # no label
    (bad / "t.yaml").write_text(YAML.format(name="t"))
    r = orlik_cli("eval", tiny_checkpoint, "--include", bad, "--tasks", "t")
    assert r.code == 2 and "t.jsonl:1: the item has no field 'label'" in r.err
    (bad / "t.yaml").write_text(YAML.format(name="t").replace("doc_to_text", "doc_to_textt"))
    r = orlik_cli("eval", tiny_checkpoint, "--include", bad, "--tasks", "t")
    assert r.code == 2 and "the task has no 'doc_to_text'" in r.err and len(r.err.strip().splitlines()) == 1


def test_report_joins_the_bench_table_once(tmp_path: Path) -> None:
    """The accuracy columns join bench's results.json and table.md (replaced, not repeated, on a
    rerun) and the KLD plot is drawn from bench's KLD."""
    from orlik.benchmarks import eval as ev
    from orlik.benchmarks import eval_report

    rows = {"pl": {"kld": 0.0, "kld_err": 0.0}}
    bench = {"texts": {"pl": {}}, "variants": [{"name": "FP16", "bytes": 2**20, "rows": rows},
             {"name": "Q4_K_M", "bytes": 2**19, "rows": {"pl": {"kld": 0.02, "kld_err": 0.001}}}]}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(bench))
    (tmp_path / "table.md").write_text("# Table 8\n")
    specs = ev.resolve_tasks("pl_topic,pl_yes_no")
    scores = [ev.VariantScores(n, {s.name: ev.TaskScore(a, 0.03, 10) for s in specs}, 1.0)
              for n, a in (("FP16", 0.6), ("Q4_K_M", 0.5))]  # fmt: skip
    res = eval_report.results("m", specs, scores, {"num_concurrent": 4})
    for _ in range(2):
        written = eval_report.write(tmp_path, res)
    assert written == ["eval.json", "eval.md", "results.json", "table.md", "kld_accuracy.png"]
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# Table 8") and table.count(eval_report.BEGIN) == 1
    assert "| Q4_K_M | 0.50 | 0.02 ± 0.001 | 50.0 ± 3.0 | 50.0 ± 3.0 | 50.0 | 10.0 |" in table
    merged = json.loads((tmp_path / "results.json").read_text())
    assert (
        merged["variants"][1]["eval"]["mean_acc"] == 0.5
        and merged["eval"]["tasks"]["pl_yes_no"]["majority"] == 0.5
    )
