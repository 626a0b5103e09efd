"""Helpers for the data and model-surgery tests: the CLI in-process, random-weight tiny checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The one in-process CLI runner (conftest.py's, also the `orlik_cli` fixture), under the names these tests use.
from conftest import CliResult as Result  # noqa: F401
from conftest import run_cli as cli  # noqa: F401


def random_checkpoint(tokenizer_dir: Path, out: Path, arch: str = "llama", seed: int = 0, **cfg: Any) -> Path:
    """A random-weight FP16 checkpoint of the tiny shape (overridable), with `tokenizer_dir`'s tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orlik.training import configs, tokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    config = configs.make_config(arch, "tiny", vocab)
    for k, v in cfg.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(str(out))
    tokenizer.copy_into(tokenizer_dir, out)
    return out


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
