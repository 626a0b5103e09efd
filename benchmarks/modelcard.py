"""Model cards: a README.md per variant with Hugging Face YAML front matter, its Table 8 rows,
the calibration card it was built from, and how to run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orlik import __version__, progress
from orlik.benchmarks.report import HEADER, _md_table, fmt_size, table_cells, texts_in_order
from orlik.checkpoint import Checkpoint, declares_sentencepiece_llama
from orlik.errors import OutputError
from orlik.fsutil import atomic_write_text
from orlik.manifest import Variant

DEFAULT_LICENSE = "other"  # HF's value for "see the base model"; orlik does not guess a license


def base_license(ckpt: Checkpoint) -> str | None:
    """The license: field of the base checkpoint's own README front matter, if it has one."""
    readme = ckpt.path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        if line.strip().startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None


def calibration_card(v: Variant, ckpt: Checkpoint) -> str | None:
    """card.md of the calibration set whose hash the variant records (searched beside the
    variant and the checkpoint), or None."""
    if not v.calibration_hash:
        return None
    roots = [v.path, v.path.parent.parent / "calib" if v.path else None, ckpt.path.parent / "calib"]
    extra = v.extra.get("calibration_dir") if isinstance(v.extra, dict) else None
    if isinstance(extra, str):
        roots.insert(0, Path(extra))
    for root in roots:
        if root is None or not (root / "card.json").is_file() or not (root / "card.md").is_file():
            continue
        try:
            card = json.loads((root / "card.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if card.get("calibration_sha256") == v.calibration_hash:
            # One level deeper, so the card's headings sit under the model card's section.
            lines = (root / "card.md").read_text(encoding="utf-8").splitlines()
            if lines and lines[0].startswith("# "):
                lines = lines[1:]  # its title; the model card's "## Calibration" replaces it
            return "\n".join("#" + ln if ln.startswith("#") else ln for ln in lines)
    return None


def usage(v: Variant, name: str, *, sentencepiece: bool = False) -> str:
    rel = f"{name}/{next(iter(v.files))}"
    lines = ["```bash", f"orlik serve {v.path}", "# OpenAI-compatible API at http://127.0.0.1:8080/v1", "```"]
    if v.format == "gguf":
        lines += ["", "```python", "from llama_cpp import Llama", "",
                  f'llm = Llama(model_path="{rel}", n_ctx=4096)',
                  'print(llm("Stolicą Polski jest", max_tokens=32)["choices"][0]["text"])', "```", "",
                  "```bash", f"llama-server -m {rel} -c 4096", "```"]  # fmt: skip
    elif v.format in ("gptq", "awq", "hqq"):
        # transformers 5 maps some model types (qwen2) to their own byte-level tokenizer whatever the
        # config declares; a SentencePiece vocabulary declared as LlamaTokenizer must be loaded as one.
        tok = "LlamaTokenizer" if sentencepiece else "AutoTokenizer"
        lines += ["", "```python", f"from transformers import AutoModelForCausalLM, {tok}", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                  f'tok = {tok}.from_pretrained("{name}")', "```"]  # fmt: skip
    elif v.format == "mlx":
        lines += ["", "```bash", f'mlx_lm.generate --model {name} --prompt "Stolicą Polski jest"', "```"]
    return "\n".join(lines)


def render(result: dict[str, Any], results: dict[str, Any], v: Variant, ckpt: Checkpoint, *,
           license: str, base_model: str) -> str:  # fmt: skip
    tags = ["orlik", "quantized", v.format, str(v.recipe.get("qtype") or v.recipe.get("name") or v.name),
            "polish", "english"]  # fmt: skip
    if v.imatrix_hash:
        tags.append("imatrix")
    front = ["---", f"base_model: {base_model}", f"quantized_by: orlik {__version__}", f"license: {license}",
             "language:", "- pl", "- en", "tags:", *(f"- {t}" for t in dict.fromkeys(tags)),
             "pipeline_tag: text-generation", "---"]  # fmt: skip
    fp16 = results["variants"][0]
    s = results["settings"]
    body = [f"# {base_model} · {v.name}", "",
            f"{v.format.upper()} quantization (`{v.recipe.get('name', v.name)}`) of `{base_model}`, made with orlik "
            f"{__version__}: {fmt_size(v.bytes)} GiB ({v.bytes:,} bytes), {v.bpw:.2f} bits per weight.", "",
            "## Quality against FP16 (Table 8)", "",
            f"Measured with `orlik bench` (the method of llama-perplexity --kl-divergence, ctx {s['ctx']}) on "
            + ", ".join(f"{k} ({t['source']}, {t['scored_tokens']:,} scored tokens)" for k, t in results["texts"].items())
            + ".", ""]  # fmt: skip
    for name in texts_in_order(results):
        body += [
            f"**{name}**",
            "",
            _md_table(HEADER, [table_cells(fp16, name), table_cells(result, name)]),
            "",
        ]
    sp = result.get("speed")
    if sp and "error" not in sp:
        m = results["machine"]
        body += [f"Speed on {m['cpu']} ({sp['threads']} threads): prompt {sp['prompt_tps']:.0f} tok/s, decode "
                 f"{sp['decode_tps']:.1f} tok/s, time to first token {1000 * sp['ttft_s']:.0f} ms (512-token "
                 f"prompt), peak RSS {sp['peak_rss_gen_bytes'] / (1 << 20):.0f} MiB.", ""]  # fmt: skip
    body += ["## Provenance", "", f"- base checkpoint sha256 (orlik content hash): `{v.base_hash}`",
             *(f"- {k}: {val}" for k, val in v.tools.items()),
             f"- calibration set sha256: `{v.calibration_hash}`" if v.calibration_hash else "- no calibration data",
             f"- importance matrix sha256: `{v.imatrix_hash}`" if v.imatrix_hash else "- no importance matrix",
             *(f"- `{f}` sha256 `{h}`" for f, h in {**v.files, **v.logs}.items()), ""]  # fmt: skip
    card = calibration_card(v, ckpt)
    if card:
        body += ["## Calibration", "", card.strip(), ""]
    spm = declares_sentencepiece_llama(ckpt.path)
    body += ["## Usage", "", usage(v, v.path.name if v.path else v.name, sentencepiece=spm), ""]
    return "\n".join([*front, "", *body])


def write_all(results: dict[str, Any], variants: list[Variant], ckpt: Checkpoint, out: Path, *,
              license: str | None = None, base_model: str | None = None) -> dict[str, str]:  # fmt: skip
    """README.md in each variant directory (in reports/cards/<name>/ when that is read-only)."""
    lic = license or base_license(ckpt) or DEFAULT_LICENSE
    base = base_model or ckpt.name
    by_name = {r["name"]: r for r in results["variants"]}
    written = {}
    for v in variants:
        text = render(by_name[v.name], results, v, ckpt, license=lic, base_model=base)
        target = (v.path or out) / "README.md"
        try:
            atomic_write_text(target, text)
        except OutputError:
            target = out / "cards" / v.name / "README.md"
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, text)
            progress.info(f"[yellow]{v.path} is read-only; wrote its model card to {target}[/]")
        written[v.name] = str(target)
    return written
