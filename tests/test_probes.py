"""The sensitivity pass's parts on tiny in-memory models: the probe and Fisher windows, the KLD probes
(embedding rows, head on hidden states, layer and row splits), ggml's threaded roundtrip, and the bf16
Fisher pass against float32."""

from __future__ import annotations

import numpy as np
import pytest


def test_probe_windows_are_disjoint_from_the_fisher_windows_and_spread(monkeypatch) -> None:
    from orlik.quantize import sensitivity

    def windows(ckpt, texts, tokens, seq_len):  # window i holds only token i: its identity
        return [[i] * seq_len for i in range(min(tokens // seq_len, len(texts)))]

    monkeypatch.setattr(sensitivity, "_token_windows", windows)
    for n_windows, fis_tok, probe_tok in ((100, 8 * 512, 2 * 512), (5, 8 * 512, 2 * 512), (3, 512, 4 * 512)):
        fis, pro = sensitivity.split_windows(None, ["t"] * n_windows, fisher_tokens=fis_tok,
                                             probe_tokens=probe_tok, seq_len=512)  # fmt: skip
        f, p = {w[0] for w in fis}, {w[0] for w in pro}
        assert f and p and not f & p and len(f) == len(fis) and len(p) == len(pro)
        assert len(fis) <= fis_tok // 512 and len(pro) <= probe_tok // 512
    fis, pro = sensitivity.split_windows(
        None, ["t"] * 100, fisher_tokens=8 * 512, probe_tokens=2 * 512, seq_len=512
    )
    # spread over the whole set, not its first windows: both reach past the middle
    assert max(w[0] for w in fis) > 50 and max(w[0] for w in pro) > 50 and min(w[0] for w in pro) < 50
    fis, pro = sensitivity.split_windows(None, ["t"], fisher_tokens=4 * 512, probe_tokens=512, seq_len=512)
    assert len(fis) == 1 and pro == []  # one window: the Fisher pass keeps it, no probes
    # shorter probe windows: the first probe_seq_len tokens of their window, as many as probe_tokens holds
    fis, pro = sensitivity.split_windows(None, ["t"] * 100, fisher_tokens=4 * 512, probe_tokens=3 * 256,
                                         seq_len=512, probe_seq_len=256)  # fmt: skip
    assert (
        len(fis) == 4 and len(pro) == 3 and {len(w) for w in pro} == {256} and {len(w) for w in fis} == {512}
    )
    assert not {w[0] for w in fis} & {w[0] for w in pro}


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_probe_on_used_rows_is_exact(tied: bool, monkeypatch) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orlik.quantize import probes

    cfg = LlamaConfig(vocab_size=600, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    x = torch.randint(0, 100, (1, 64))
    base = probes.Head(model, x)
    name = "model.embed_tokens.weight"
    rows = probes.used_rows(model, name, x)
    assert (rows is None) == tied and (tied or set(rows.tolist()) == set(x.reshape(-1).tolist()))
    assert probes.used_rows(model, "model.layers.0.mlp.down_proj.weight", x) is None
    fast, _ = probes._probe(model, x, base, {name: ("Q2_K", None, None)}, 1)
    monkeypatch.setattr(probes, "used_rows", lambda *a: None)
    full, _ = probes._probe(model, x, base, {name: ("Q2_K", None, None)}, 1)
    assert fast == pytest.approx(full, rel=1e-9) and full > 0


def _tiny_untied_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def test_head_probe_on_hidden_states_matches_a_full_forward_and_its_estimate_is_exact(monkeypatch) -> None:
    import torch

    from orlik.quantize import probes, sensitivity

    model = _tiny_untied_llama()
    x = torch.randint(0, 512, (1, 96))
    fis = sensitivity.fisher(model, x.tolist(), seed=0, dtype="float32")
    head = probes.Head(model, x)
    assert head.hidden is not None and head.alone(model, ["lm_head.weight"])
    assert not head.alone(model, ["model.layers.0.mlp.down_proj.weight"])
    rows = np.arange(1, 512, 2)
    pairs = {"lm_head.weight": fis.weights["lm_head.weight"]}
    fast, est = probes._probe(model, x, head, {"lm_head.weight": ("Q2_K", None, rows)}, 2, pairs=pairs)
    # the same probe through the whole model gives the same KLD; the weights are restored after each
    w0 = model.lm_head.weight.detach().clone()
    monkeypatch.setattr(head, "hidden", None)
    full, est2 = probes._probe(model, x, head, {"lm_head.weight": ("Q2_K", None, rows)}, 2, pairs=pairs)
    assert torch.equal(model.lm_head.weight, w0)
    assert fast == pytest.approx(full, rel=1e-6) and full > 0
    # the estimate is the Fisher estimate of exactly the quantized rows
    from orlik.quantize import ggml_quants

    w = w0.numpy()
    err2 = (ggml_quants.roundtrip("Q2_K", w[rows], None) - w[rows]).astype(np.float64) ** 2
    want = sensitivity.weighted_error(pairs["lm_head.weight"], rows, np.ones(len(rows)), err2)
    # (the probe sums each row's error in float32: six digits)
    assert est == pytest.approx(want, rel=1e-6) and est2 == pytest.approx(want, rel=1e-6)


def test_probes_split_layers_and_head_rows_between_the_probe_types(monkeypatch) -> None:
    import torch

    from orlik.quantize import probes, sensitivity

    model = _tiny_untied_llama(1)
    fis = sensitivity.fisher(model, torch.randint(0, 512, (2, 64)).tolist(), seed=0, dtype="float32")
    names = {n.removesuffix(".weight"): n for n in fis.weights
             if any(k in n for k in ("mlp.down_proj", "q_proj", "k_proj")) or n == "lm_head.weight"}  # fmt: skip
    seen: list[dict] = []
    probe = probes._probe
    monkeypatch.setattr(
        probes,
        "_probe",
        lambda m, x, h, params, *a, **k: seen.append(params) or probe(m, x, h, params, *a, **k),
    )
    costs = {g: {"Q2_K": 1.0, "Q4_K": 0.1} for g in names}
    sizes = {g: model.get_parameter(n).numel() for g, n in names.items()}
    out = probes.measure(model, torch.randint(0, 512, (1, 64)).tolist(), names, costs, sizes, {}, threads=2,
                         fmt=probes.Format(probes.layer_kind, probes.GGUF.bpw, probes.GGUF.roundtrip, probes.PROBE_TYPES),
                         pairs={g: fis.weights[n] for g, n in names.items()})  # fmt: skip
    down = out["kinds"]["model.layers.mlp.down_proj"]
    assert [p["matrices"] for p in down] == [1, 1] and [p["rows"] for p in down] == ["all", "all"]
    headp = out["kinds"]["lm_head"]
    assert [p["rows"] for p in headp] == ["0::4", "1::4"]
    head_rows = [params["lm_head.weight"][2] for params in seen if "lm_head.weight" in params]
    assert [r.tolist() for r in head_rows] == [list(range(0, 512, 4)), list(range(1, 512, 4))]
    # query and key share a probe and are split by layer: layer 0's pair at Q2_K, layer 1's at Q4_K
    qk = out["kinds"]["model.layers.self_attn.qk_proj"]
    assert [p["matrices"] for p in qk] == [2, 2] and set(out["kinds"]) == {
        "model.layers.mlp.down_proj",
        "lm_head",
        "model.layers.self_attn.qk_proj",
    }
    pairs = [
        sorted((n.split(".")[2], t) for n, (t, _, _) in params.items()) for params in seen if len(params) == 2
    ]
    assert pairs == [[("0", "Q2_K"), ("0", "Q2_K")], [("1", "Q4_K"), ("1", "Q4_K")]]
    for p in down + headp + qk:  # exact estimates, not the table's 1.0 / 0.1
        assert p["estimated"] not in (1.0, 0.1) and p["real"] > 0 and p["ratio"] > 0
    # each matrix quantized whole reports the Fisher estimate of all its rows at its probe type ...
    assert set(out["matrices"]) == set(names) - {"lm_head"}
    m = out["matrices"]["model.layers.0.mlp.down_proj"]
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    from orlik.quantize import ggml_quants

    err2 = (ggml_quants.roundtrip("Q2_K", w, None) - w).astype(np.float64) ** 2
    rows = np.arange(w.shape[0])
    want = sensitivity.weighted_error(
        fis.weights[names["model.layers.0.mlp.down_proj"]], rows, np.ones(len(rows)), err2
    )
    assert m["type"] == "Q2_K" and m["estimated"] == pytest.approx(want, rel=1e-5)
    # ... which replaces the sampled estimate there and scales its other types by the same factor
    fixed = probes.row_corrected(costs, out)
    for g, m in out["matrices"].items():
        other = next(t for t in costs[g] if t != m["type"])
        assert fixed[g][m["type"]] == pytest.approx(m["estimated"])
        assert fixed[g][other] == pytest.approx(costs[g][other] * m["estimated"] / costs[g][m["type"]])
    assert fixed["lm_head"] == costs["lm_head"]  # probed on some rows: kept as sampled


def test_probes_score_the_second_half_of_each_window_as_llama_perplexity_does(monkeypatch) -> None:
    import torch

    from orlik.quantize import probes

    model = _tiny_untied_llama(3)
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        full = model(input_ids=x).logits
    head = probes.Head(model, x)
    # positions 32..62 of 64: the head ran on those only, and the hidden states are the head's input there
    assert head.base.z.shape == (2, 31, 512) and torch.allclose(head.base.z, full[:, 32:63], atol=1e-5)
    assert head.hidden is not None and head.hidden.shape == (2, 31, 256)
    name = "model.layers.0.mlp.down_proj.weight"
    real, _ = probes._probe(model, x, head, {name: ("Q2_K", None, None)}, 1)
    w0 = model.get_parameter(name).detach().clone()
    from orlik.quantize import ggml_quants

    with torch.no_grad():
        model.get_parameter(name).copy_(torch.from_numpy(ggml_quants.roundtrip("Q2_K", w0.numpy(), None)))
        quant = model(input_ids=x).logits
        model.get_parameter(name).copy_(w0)
    p = torch.softmax(full[:, 32:63].double(), -1)
    want = p * (
        torch.log_softmax(full[:, 32:63].double(), -1) - torch.log_softmax(quant[:, 32:63].double(), -1)
    )
    assert real == pytest.approx(float(want.sum(-1).mean()), rel=1e-3) and real > 0

    # a model whose forward takes no logits_to_keep gets the same positions from its whole logits
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor) -> object:
            return self.inner(input_ids=input_ids)

    with torch.no_grad():
        assert torch.allclose(probes.scored_logits(Plain(), x), head.base.z, atol=1e-5)


def test_ggml_roundtrip_split_between_threads_is_identical() -> None:
    from orlik.quantize import ggml_quants

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 512)).astype(np.float32)
    imat = rng.random(512).astype(np.float32) + 0.1
    for ty in ("Q2_K", "Q4_K", "IQ4_XS"):
        assert np.array_equal(ggml_quants.roundtrip(ty, w, imat, 1), ggml_quants.roundtrip(ty, w, imat, 3))


def test_fisher_bf16_matches_float32_closely() -> None:
    import torch

    from orlik.quantize import sensitivity

    model = _tiny_untied_llama(2)
    x = torch.randint(0, 512, (2, 64)).tolist()
    a = sensitivity.fisher(model, x, seed=0, dtype="float32")
    b = sensitivity.fisher(model, x, seed=0, dtype="bfloat16")
    assert a.dtype == "float32" and b.dtype == "bfloat16"
    for name, [(r32, c32)] in a.weights.items():
        [(r16, c16)] = b.weights[name]
        # C is the input's mean square (float32 either way); R, from bf16 gradients, agrees to a few %
        assert np.corrcoef(r32, r16)[0, 1] > 0.95, name
        assert abs(r16.sum() / r32.sum() - 1) < 0.1, name
        assert np.corrcoef(c32, c16)[0, 1] > 0.95, name


def test_float32_kld_agrees_with_the_float64_formula_from_1e_8_to_1() -> None:
    import torch

    from orlik.quantize import probes

    gen = torch.Generator().manual_seed(0)
    z0 = 4 * torch.randn(64, 32000, generator=gen)  # peaked, like a trained model's logits
    ref = probes.Reference(z0)
    lp = torch.log_softmax(z0.double(), -1)
    for scale in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        z = z0 + scale * torch.randn(z0.shape, generator=gen)
        exact = float((lp.exp() * (lp - torch.log_softmax(z.double(), -1))).sum(-1).mean())
        assert 1e-9 < exact < 2 and probes.kld(ref, z) == pytest.approx(exact, rel=2e-3)
    assert probes.kld(ref, z0) == 0.0


def test_fisher_label_draws_follow_the_softmax() -> None:
    import torch

    from orlik.quantize import sensitivity

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, -30.0]])
    draws = sensitivity.sample(logits.repeat(200_000, 1), gen)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=4e-3) and freq[4] == 0
    # a peaked 32k-wide row: its top token about as often as its probability says
    row = torch.zeros(32000)
    row[123] = 10.0
    p_top = float(torch.softmax(row, -1)[123])
    hits = float((sensitivity.sample(row.repeat(20_000, 1), gen) == 123).double().mean())
    assert abs(hits - p_top) < 0.02


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_probes_quantized_ahead_from_the_files_equal_the_probes_own(dtype: str, tmp_path) -> None:
    import types

    import torch
    from safetensors.torch import save_file

    from orlik.quantize import prequantize, probes, sensitivity

    model = _tiny_untied_llama(2)
    for p in model.parameters():  # weights the file's dtype holds exactly
        p.data = p.data.to(getattr(torch, dtype)).float()
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    read = sensitivity.file_weights(types.SimpleNamespace(weight_files=[tmp_path / "model.safetensors"]))
    assert np.array_equal(read("model.layers.1.mlp.down_proj.weight"),
                          model.model.layers[1].mlp.down_proj.weight.detach().numpy())  # fmt: skip
    assert read("no.such.tensor") is None
    names = {
        n.removesuffix(".weight"): n for n, _ in model.named_parameters() if "proj" in n or "lm_head" in n
    }
    costs = {g: {"Q2_K": 1.0, "Q4_K": 0.1} for g in names}
    fis = sensitivity.fisher(model, torch.randint(0, 512, (1, 64)).tolist(), seed=0, dtype="float32")
    pairs = {g: fis.weights[n] for g, n in names.items()}
    sizes = {g: model.get_parameter(n).numel() for g, n in names.items()}
    calls = []

    def roundtrip(*a):
        calls.append(a[0])
        return probes.GGUF.roundtrip(*a)

    fmt = probes.Format(probes.layer_kind, probes.GGUF.bpw, roundtrip, probes.PROBE_TYPES,
                        probes.GGUF.quantize, probes.GGUF.dequantize)  # fmt: skip
    x = torch.randint(0, 512, (1, 64)).tolist()
    pre = prequantize.Prequantized(probes.plan(costs, fmt), names, read, {}, fmt, head="lm_head")
    for f in pre._jobs.values():
        f.result()  # all done before the probes start: every matrix and the head's rows come from `pre`
    ahead = probes.measure(model, x, names, costs, sizes, {}, threads=2, fmt=fmt, pairs=pairs, pre=pre)
    assert calls == [] and len(pre._jobs) == 2 * len(model.model.layers) * 7 // 2 + 2
    assert [p["rows"] for p in ahead["kinds"]["lm_head"]] == ["0::4", "1::4"]
    own = probes.measure(model, x, names, costs, sizes, {}, threads=2, fmt=fmt, pairs=pairs)
    assert ahead["kinds"] == own["kinds"] and len(calls) == len(pre._jobs)
    # weights that are not the file's: not taken from it
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert pre.get("model.layers.0.mlp.down_proj.weight", "Q2_K", w) is not None
    assert pre.get("model.layers.0.mlp.down_proj.weight", "Q2_K", w + 1e-3) is None
    head = model.lm_head.weight.detach().numpy()
    rows = np.arange(1, head.shape[0], 4)
    assert pre.get("lm_head.weight", "Q4_K", head[rows], rows) is not None
    assert pre.get("lm_head.weight", "Q4_K", head[rows[:-1]], rows[:-1]) is None  # rows it did not quantize
    assert pre.get("lm_head.weight", "Q2_K", head[rows], rows) is None
