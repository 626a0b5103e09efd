"""Size-budgeted mixed precision (`--recipe auto`, `mlx-auto`): the allocator, the size it lands at,
what llama-quantize accepts, the sensitivity cache, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from orlik.errors import InputError
from orlik.quantize import allocate

pytestmark = pytest.mark.usefixtures("gguf_cache")
FAST = ("--option", "sens_tokens=512", "--option", "sens_seq_len=256", "--option", "measure_tokens=512",
        "--option", "probe_tokens=512")  # fmt: skip


def _random_tensors(rng: np.random.Generator, n: int) -> dict[str, list[allocate.Option]]:
    out = {}
    for i in range(n):
        size = int(rng.integers(1000, 5000))
        sens = float(rng.lognormal(0, 1.5))
        out[f"t{i}"] = [
            allocate.Option(f"{b}b", size * b, sens * 2.0 ** (-2 * b)) for b in (2, 3, 4, 5, 6, 8)
        ]
    return out


def test_solver_fits_the_budget_and_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    tensors = _random_tensors(rng, 5)
    names = list(tensors)
    for budget in (30_000, 60_000, 90_000):
        sol = allocate.solve(tensors, budget)
        assert sol.bytes <= budget
        best = min(
            (sum(o.cost for o in combo), combo)
            for combo in itertools.product(*(tensors[n] for n in names))
            if sum(o.bytes for o in combo) <= budget
        )
        # Sizes are rounded to 1/20000 of the budget: within a hair of the exact optimum.
        assert sol.cost <= best[0] * 1.01
    with pytest.raises(InputError, match="below the smallest"):
        allocate.solve(tensors, 100)


def test_parse_size() -> None:
    assert allocate.parse_size("90MiB") == 90 << 20
    assert allocate.parse_size("1.5GB") == 1_500_000_000
    assert allocate.parse_size("512") == 512
    with pytest.raises(InputError):
        allocate.parse_size("ninety")


@pytest.fixture(scope="module")
def auto_variant(
    tiny_checkpoint: Path, tiny_calibration: Path, tiny_imatrix: Path, tmp_path_factory, orlik_cli
):
    out = tmp_path_factory.mktemp("auto-variants")
    r = orlik_cli("--json", "quantize", tiny_checkpoint, "--recipe", "auto", "--target-bpw", "4.0",
                  "--recipe", "Q3_K_M-imat", "--recipe", "auto-like-Q3_K_M", "--recipe", "auto-2.5bpw",
                  "--calib", tiny_calibration,
                  "--out", out, *FAST)  # fmt: skip
    assert r.code == 0, r.err
    return out


def test_auto_lands_within_one_percent(auto_variant: Path, orlik_cli) -> None:
    from orlik import gguf_read
    from orlik.manifest import Variant

    v = Variant.load(auto_variant / "auto-4bpw")
    assert abs(v.bpw / 4.0 - 1) < 0.01
    stock = Variant.load(auto_variant / "Q3_K_M-imat")
    like = Variant.load(auto_variant / "auto-like-Q3_K_M")
    assert abs(like.bytes / stock.bytes - 1) < 0.01
    # The file holds exactly the types the allocator chose, and they are not all one type.
    got = gguf_read.summarize(like.path / "model.gguf").types()
    chosen = {n: t["type"] for n, t in like.extra["auto"]["tensors"].items()}
    assert all(got[n] == t for n, t in chosen.items())
    assert len(set(chosen.values())) > 1
    assert like.imatrix_hash == stock.imatrix_hash
    m = like.extra["auto"]["measured"]
    assert m["tokens"] == 512 and like.extra["auto"]["estimated_kld"] > 0
    assert m["kld"] is None or m["kld"] >= 0  # None only when llama-perplexity's logger lost its output
    r = orlik_cli("inspect", like.path)
    assert r.code == 0 and "KLD estimated" in r.out and "blk.0.ffn_down.weight" in r.out
    assert "probe real/estimated KLD, ffn_down: Q2_K" in r.out
    # The probe-calibrated estimate is what was allocated; the Fisher one and the probes are kept.
    a = like.extra["auto"]
    assert a["estimated_kld_fisher"] > 0 and {"token_embd", "ffn_down"} <= set(a["probes"]["kinds"])


def test_a_mix_from_an_older_auto_method_is_rebuilt(
    auto_variant: Path, tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path, orlik_cli
) -> None:
    import shutil

    shutil.copytree(auto_variant / "auto-like-Q3_K_M", tmp_path / "auto-like-Q3_K_M")
    args = ("quantize", tiny_checkpoint, "--recipe", "auto-like-Q3_K_M", "--calib", tiny_calibration,
            "--out", tmp_path, *FAST)  # fmt: skip
    r = orlik_cli("--json", *args)
    assert r.code == 0 and json.loads(r.out)["variants"][0]["status"] == "skipped", r.out
    manifest = tmp_path / "auto-like-Q3_K_M" / "variant.json"
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    now, doc["extra"]["auto"]["method"] = doc["extra"]["auto"]["method"], "fisher-diag+kind-probes-v2"
    manifest.write_text(json.dumps(doc), encoding="utf-8")
    r = orlik_cli("--json", *args)
    row = json.loads(r.out)["variants"][0]
    assert r.code == 0 and row["status"] == "rebuilt", r.out
    assert (
        row["reason"]
        == f"its mix was chosen by auto method fisher-diag+kind-probes-v2, and orlik's is now {now}"
    )
    assert json.loads(manifest.read_text(encoding="utf-8"))["extra"]["auto"]["method"] == now


def test_slow_iq_types_only_below_what_the_fast_ones_reach(auto_variant: Path) -> None:
    from orlik.manifest import Variant
    from orlik.quantize.backends import gguf_auto

    fast = Variant.load(auto_variant / "auto-like-Q3_K_M").extra["auto"]["tensors"]
    assert all(t["type"] in gguf_auto.FAST_256 for t in fast.values())
    low = Variant.load(auto_variant / "auto-2.5bpw")  # below every tensor at Q2_K: IQ2 types join
    assert abs(low.bpw / 2.5 - 1) < 0.01
    assert any(t["type"].startswith("IQ") for t in low.extra["auto"]["tensors"].values())


def test_probe_ratio_scales_its_kind_and_moves_the_bytes() -> None:
    from orlik.quantize import ggml_quants, probes

    types = ("Q2_K", "Q4_K", "Q6_K", "Q8_0")
    raw = {t: 2.0 ** (-2 * ggml_quants.info(t).bpw) for t in types}  # the same Fisher estimate for both kinds
    names = [f"blk.{i}.{k}.weight" for i in range(3) for k in ("attn_q", "ffn_down")]

    def point(ty: str, ratio: float) -> dict:
        return {"type": ty, "bpw": ggml_quants.info(ty).bpw, "ratio": ratio}

    table = {"tensors": {n: {"ne": [256, 256], "types": raw} for n in names},
             "probes": {"kinds": {"ffn_down": [point("Q2_K", 40.0), point("Q6_K", 10.0)],
                                  "attn_q": [point("Q2_K", 1.0), point("Q6_K", 1.0)]}}}  # fmt: skip
    costs = probes.calibrated(table)
    down, q = costs["blk.0.ffn_down.weight"], costs["blk.0.attn_q.weight"]
    assert down["Q2_K"] == pytest.approx(40 * raw["Q2_K"]) and down["Q8_0"] == pytest.approx(10 * raw["Q8_0"])
    assert 10 * raw["Q4_K"] < down["Q4_K"] < 40 * raw["Q4_K"] and q["Q4_K"] == pytest.approx(raw["Q4_K"])

    def solve(c: dict) -> dict[str, str]:
        opts = {n: [allocate.Option(t, 256 * ggml_quants.info(t).row_bytes(256), c[n][t]) for t in types]
                for n in names}  # fmt: skip
        return allocate.solve(opts, 6 * 256 * ggml_quants.info("Q4_K").row_bytes(256)).kinds()

    even = solve({n: raw for n in names})
    assert len({even[n] for n in names}) == 1  # equal estimates: one type for all
    moved = solve(costs)
    bits = {n: ggml_quants.info(moved[n]).bpw for n in names}
    assert min(bits[n] for n in names if "ffn_down" in n) > max(bits[n] for n in names if "attn_q" in n)


def test_targets_out_of_range_are_one_line_exit_2(tiny_checkpoint: Path, tiny_calibration: Path,
                                                  tiny_imatrix: Path, tmp_path: Path, orlik_cli) -> None:  # fmt: skip
    for size in ("10KiB", "10GiB"):
        r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "auto", "--target-size", size,
                      "--calib", tiny_calibration, "--out", tmp_path, *FAST)  # fmt: skip
        assert r.code == 2, r.err
        assert len(r.err.strip().splitlines()) == 1 and (
            "below the smallest" in r.err or "above the" in r.err
        )
    r = orlik_cli(
        "quantize", tiny_checkpoint, "--recipe", "auto", "--calib", tiny_calibration, "--out", tmp_path
    )
    assert r.code == 2 and "needs a target" in r.err
    # probes run on whole windows: a probe_tokens between 0 and one window would probe nothing
    r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "auto-like-Q3_K_M", "--calib", tiny_calibration,
                  "--out", tmp_path, "--option", "probe_tokens=100", "--option", "sens_seq_len=128")  # fmt: skip
    assert r.code == 2 and r.err.strip() == (
        "orlik: error: probe_tokens=100 is not a whole probe window of 128 tokens "
        "(probe_seq_len, at most sens_seq_len): use 0 (no KLD probes) or at least 128"
    ), r.err
    for bad in ("sens_dtype=float16", "probe_seq_len=8"):
        r = orlik_cli("quantize", tiny_checkpoint, "--recipe", "auto-like-Q3_K_M", "--calib", tiny_calibration,
                      "--out", tmp_path, "--option", bad)  # fmt: skip
        assert r.code == 2 and r.err.count("\n") == 1 and bad.split("=")[0] in r.err, r.err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def narrow_checkpoint(tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A llama checkpoint whose hidden size (320) is not a multiple of 256; random weights are
    enough to ask which types llama-quantize accepts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("narrow") / "fp16"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=320, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=512,
                      tie_word_embeddings=False, torch_dtype="float16")  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_narrow_model_gets_only_types_llama_quantize_accepts(
    narrow_checkpoint: Path, tiny_calibration: Path, tmp_path: Path, orlik_cli
) -> None:
    from orlik.manifest import Variant
    from orlik.quantize.backends import gguf_auto

    for t in ("Q2_K", "IQ2_XXS", "Q4_K"):
        assert t not in gguf_auto.candidates(320, True)
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(tiny_calibration / "calibration.jsonl", calib)
    r = orlik_cli("--json", "quantize", narrow_checkpoint, "--recipe", "auto", "--target-bpw", "4.5",
                  "--calib", calib, "--out", tmp_path / "v", *FAST)  # fmt: skip
    assert r.code == 0, r.err
    v = Variant.load(tmp_path / "v" / "auto-4.5bpw")
    log = (v.path / "llama-quantize.log").read_text()
    assert "falling back" not in log and "required fallback" not in log
    for name, t in v.extra["auto"]["tensors"].items():
        assert v.extra["tensor_type_by_name"][name] == t["type"]
    # Rows of 320 take only 32-wide blocks; ffn_down's rows (768) may take any type.
    assert all(v.extra["tensor_type_by_name"][n] in (*gguf_auto.TYPES_32, "F16")
               for n in v.extra["auto"]["tensors"] if "ffn_down" not in n)  # fmt: skip


def test_sensitivity_cache_follows_the_calibration_set(
    tiny_checkpoint: Path, tiny_calibration: Path, tiny_imatrix: Path, tmp_path: Path
) -> None:
    from orlik import gguf_read
    from orlik.checkpoint import Checkpoint
    from orlik.gguf_convert import f16_gguf
    from orlik.quantize import run
    from orlik.quantize.backends import gguf_auto
    from orlik.quantize.recipe import Recipe

    ckpt = Checkpoint.open(tiny_checkpoint)
    source = gguf_read.summarize(f16_gguf(ckpt))
    recipe = Recipe.from_name("auto-4.0bpw")
    recipe = Recipe.from_dict({**recipe.to_dict(), "options": {**recipe.options, "sens_tokens": 512,
                                                               "sens_seq_len": 256, "probe_tokens": 512}})  # fmt: skip

    def table(calib_dir: Path) -> dict:
        calib = run.calibration_for(calib_dir, tiny_imatrix)
        return gguf_auto.sensitivity_table(ckpt, recipe, calib, source, tiny_imatrix, 2)

    first = table(tiny_calibration)
    assert table(tiny_calibration)["cached"]
    n_layers = sum(1 for t in source.tensors if t.name.endswith("ffn_down.weight"))
    changed = tmp_path / "calib"
    changed.mkdir()
    lines = (tiny_calibration / "calibration.jsonl").read_text(encoding="utf-8").splitlines()
    (changed / "calibration.jsonl").write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    again = table(changed)
    assert not again["cached"] and again["cache"] != first["cache"]
    a = first["tensors"]["blk.0.attn_q.weight"]["types"]["Q4_K"]
    b = again["tensors"]["blk.0.attn_q.weight"]["types"]["Q4_K"]
    assert a != b  # different text, different Fisher weights
    # The direct probes are cached with the table and redone on the new text: for every kind, real
    # KLD grows as the probe type shrinks.
    assert table(tiny_calibration)["probes"] == first["probes"]
    for kinds in (first["probes"]["kinds"], again["probes"]["kinds"]):
        # query and key share a probe, as do the MLP's gate and up projections
        assert set(kinds) == {
            "token_embd",
            "output",
            "attn_qk",
            "attn_v",
            "attn_output",
            "ffn_gate_up",
            "ffn_down",
        }
        for k, pts in kinds.items():
            real = {p["type"]: p["real"] for p in pts}
            assert real["Q2_K"] > real["Q4_K"] > 0
            # block kinds: the two probe types split the layers between them, each matrix probed once
            n = (
                1
                if k in ("token_embd", "output")
                else n_layers * (2 if k in ("attn_qk", "ffn_gate_up") else 1)
            )
            assert sum(p["matrices"] for p in pts) == (2 if n == 1 else n)
    assert first["probes"]["kinds"]["ffn_down"] != again["probes"]["kinds"]["ffn_down"]


def test_mlx_auto_hits_its_bpw(
    tiny_checkpoint: Path, tiny_calibration: Path, tmp_path: Path, orlik_cli
) -> None:
    pytest.importorskip("mlx_lm")
    r = orlik_cli("--json", "quantize", tiny_checkpoint, "--recipe", "mlx-auto", "--target-bpw", "4.5",
                  "--calib", tiny_calibration, "--out", tmp_path, "--option", "sens_tokens=512", "--option", "sens_seq_len=256", "--option", "probe_tokens=256")  # fmt: skip
    assert r.code == 0, r.err
    v = json.loads((tmp_path / "mlx-auto-4.5bpw" / "variant.json").read_text())
    assert abs(v["bpw"] / 4.5 - 1) < 0.01
    # The same probes as GGUF calibrate the estimate: per kind of layer, real KLD falls with bits.
    kinds = v["extra"]["auto"]["probes"]["kinds"]
    assert {"model.embed_tokens", "model.layers.mlp.down_proj", "model.layers.self_attn.qk_proj"} <= set(
        kinds
    )
    for pts in kinds.values():
        real = {p["type"]: p["real"] for p in pts}
        assert real["2g64"] > real["4g64"] > 0
    assert v["extra"]["auto"]["estimated_kld_fisher"] > 0
    cfg = json.loads((tmp_path / "mlx-auto-4.5bpw" / "config.json").read_text())
    per_layer = {k: q for k, q in cfg["quantization"].items() if isinstance(q, dict)}
    assert len({(q["bits"], q["group_size"]) for q in per_layer.values()}) > 1


def test_pareto_plot_marks_auto_and_draws_both_fronts(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from orlik.benchmarks import plots

    def row(kld: float) -> dict:
        return {"all": {"kld": kld, "kld_err": kld / 20}}

    def variant(name: str, mib: float, kld: float, auto: bool = False) -> dict:
        recipe = {"options": {"auto": True}} if auto else {"options": {}}
        return {"name": name, "format": "gguf", "bytes": int(mib * 2**20), "imatrix_hash": "x", "recipe": recipe,
                "rows": row(kld)}  # fmt: skip

    results = {"texts": {"all": {"scored_tokens": 1000}}, "settings": {"ctx": 512}, "model": {"name": "m"},
               "variants": [variant("Q4_K_M-imat", 6, 0.02), variant("Q3_K_M-imat", 5, 0.06),
                            variant("Q2_K-imat", 4, 0.2), variant("auto-like-Q3_K_M", 5, 0.04, auto=True)]}  # fmt: skip
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.update(fig=fig))
    plots.pareto(results, tmp_path / "pareto.png")
    labels = [t.get_text() for t in seen["fig"].axes[0].get_legend().get_texts()]
    assert "GGUF auto" in labels
    assert "Pareto front, fixed recipes" in labels and "Pareto front, with auto" in labels
    import matplotlib.pyplot as plt

    plt.close(seen["fig"])


def test_probe_matrices_are_quantized_from_prepare_on(
    tiny_checkpoint: Path, tiny_calibration: Path, tiny_imatrix: Path, tmp_path: Path, monkeypatch
) -> None:
    """prepare() starts quantizing the probes' matrices before the F16 GGUF's header is parsed (block
    matrices from the imatrix, the architecture from the file's first metadata pair), and the
    build's probes take every one of them from it."""
    import struct

    from orlik import gguf_read
    from orlik.checkpoint import Checkpoint
    from orlik.gguf_convert import f16_gguf
    from orlik.quantize import prequantize, run
    from orlik.quantize.recipe import Recipe

    ckpt = Checkpoint.open(tiny_checkpoint)
    assert gguf_read.architecture(f16_gguf(ckpt)) == "llama"
    (tmp_path / "short.gguf").write_bytes(b"GGUF" + bytes(8))
    (tmp_path / "text.gguf").write_text("general.architecture llama")

    def kv(key: str, vtype: int, value: bytes) -> bytes:
        return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + value

    array = struct.pack("<IQ", 4, 2) + bytes(8)  # two uint32 before the architecture: not skipped over
    name = struct.pack("<Q", 5) + b"llama"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    (tmp_path / "array-first.gguf").write_bytes(
        head + kv("a.list", 9, array) + kv("general.architecture", 8, name)
    )
    (tmp_path / "scalar-first.gguf").write_bytes(
        head + kv("a.n", 4, bytes(4)) + kv("general.architecture", 8, name)
    )
    got = {p.name: gguf_read.architecture(p) for p in sorted(tmp_path.glob("*.gguf"))}
    assert got == {
        "array-first.gguf": None,
        "scalar-first.gguf": "llama",
        "short.gguf": None,
        "text.gguf": None,
    }
    assert gguf_read.architecture(tmp_path / "missing.gguf") is None

    started: list[prequantize.Prequantized] = []
    taken: list[bool] = []
    init, get = prequantize.Prequantized.__init__, prequantize.Prequantized.get

    def record_init(self, *a, **k) -> None:
        init(self, *a, **k)
        started.append(self)

    def record_get(self, name, ty, w2, rows=None):
        out = get(self, name, ty, w2, rows)
        key = (name, ty, 0, 1) if rows is None else (name, ty, int(rows[0]), int(rows[1] - rows[0]))
        taken.append((out is not None, self._jobs[key].cancelled()))
        return out

    monkeypatch.setattr(prequantize.Prequantized, "__init__", record_init)
    monkeypatch.setattr(prequantize.Prequantized, "get", record_get)
    r = Recipe.from_name("auto-like-Q3_K_M")
    fast = {k: int(v) for k, v in (o.split("=") for o in FAST[1::2])}
    recipe = dataclasses.replace(
        r, options={**r.options, **fast, "seed": int(tmp_path.stat().st_ino % 100000) + 7}
    )
    calib = run.calibration_for(tiny_calibration)
    outcomes = run.quantize_all(tiny_checkpoint, [recipe], tmp_path / "v", calib=calib)
    assert outcomes[0].status == "built", outcomes[0].reason
    # one Prequantized, started by prepare(): 7 matrices per block; every probe quantization came from it
    n_layers = int(ckpt.config["num_hidden_layers"])
    assert len(started) == 1 and len([k for k in started[0]._jobs if k[3] == 1]) == 7 * n_layers
    # the probes took every matrix it had quantized; only what it had not started when they began
    # (on a model this small, how much that is depends on the machine) they quantized themselves
    assert len(taken) == len(started[0]._jobs) and all(ok or cancelled for ok, cancelled in taken)
    assert any(ok for ok, _ in taken)
