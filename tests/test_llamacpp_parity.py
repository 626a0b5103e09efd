"""llama.cpp accepts orlik's FP16 output: convert_hf_to_gguf.py makes an F16 GGUF of each family,
and llama-cpp-python gives the same tokens and, within a stated tolerance, the same logits as
transformers on held-out text.

Tolerance (F16 GGUF vs the FP16 checkpoint run in float32 by transformers), measured on 200 Polish
held-out tokens with the test models: max |logit diff| about 5e-4, per-token KL divergence at most
about 2e-8 (mean 3e-9). llama.cpp rounds activations to F16 in its matmuls, hence the nonzero gap.
Asserted with wide margins: max |diff| < 1e-2, max KLD < 1e-5, mean KLD < 1e-6, and the same argmax
at every position whose top-two logit gap exceeds 2e-2 (twice the diff bound, so no tie can flip).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orlik import corpus

MAX_ABS = 1e-2
MAX_KLD = 1e-5
MEAN_KLD = 1e-6

pytestmark = pytest.mark.usefixtures("gguf_cache")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def family_path(tiny_checkpoint: Path, family_checkpoint: Callable[[str], Path]) -> Callable[[str], Path]:
    return lambda arch: tiny_checkpoint if arch == "llama" else family_checkpoint(arch)


@pytest.fixture(scope="module")
def f16(family_path: Callable[[str], Path]) -> Callable[[str], Path]:
    """The F16 GGUF of each family, converted once by llama.cpp's own convert_hf_to_gguf.py."""
    from orlik import gguf_convert, llamacpp
    from orlik.checkpoint import Checkpoint
    from orlik.errors import MissingDependencyError

    try:
        llamacpp.converter()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = gguf_convert.f16_gguf(Checkpoint.open(family_path(arch)), outtype="f16")
        return made[arch]

    return get


@pytest.fixture
def llama(f16: Callable[[str], Path]) -> Iterator[Callable[[str], Any]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    opened: list[Any] = []

    def load(arch: str) -> Any:
        m = llama_cpp.Llama(model_path=str(f16(arch)), n_ctx=512, logits_all=True, n_threads=1, verbose=False)
        opened.append(m)
        return m

    yield load
    for m in opened:
        m.close()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_gguf_metadata(arch: str, f16: Callable[[str], Path], family_path: Callable[[str], Path]) -> None:
    import json

    from gguf import GGUFReader

    r = GGUFReader(str(f16(arch)))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = json.loads((family_path(arch) / "config.json").read_text())
    # Mistral without a sliding window is converted as llama; qwen2 keeps its own graph (q/k/v biases).
    gguf_arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[arch]
    assert field("general.architecture") == gguf_arch
    assert field(f"{gguf_arch}.embedding_length") == cfg["hidden_size"]
    assert field(f"{gguf_arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field("tokenizer.ggml.model") == "llama"  # SentencePiece, from tokenizer.model
    assert field("tokenizer.chat_template") == (family_path(arch) / "chat_template.jinja").read_text()
    assert field("general.file_type") == 1  # MOSTLY_F16
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    control = 3
    for marker in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(marker)] == control, marker
    names = {t.name for t in r.tensors}
    assert ("output.weight" in names) is (arch != "qwen2")  # qwen2 ties the output to token_embd


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llamacpp_logits_match_transformers(
    arch: str, family_path: Callable[[str], Path], llama: Any
) -> None:
    import torch

    from orlik.checkpoint import Checkpoint

    ckpt = Checkpoint.open(family_path(arch))
    tok, model = ckpt.load_tokenizer(), ckpt.load_model(torch.float32)
    llm = llama(arch)
    for lang, n in (("pl", 200), ("en", 100)):
        passage = corpus.heldout_text(lang)[:2000]
        ids = tok.encode(passage)
        assert llm.tokenize(passage.encode("utf-8"), add_bos=True, special=False) == ids, lang
        ids = ids[:n]
        assert len(ids) == n

        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[:n], dtype=np.float64)
        with torch.inference_mode():
            ref = model(torch.tensor([ids])).logits[0].double().numpy()
        assert got.shape == ref.shape == (n, len(tok))

        lp_ref, lp_got = log_softmax(ref), log_softmax(got)
        kld = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1)
        top2 = np.sort(ref, -1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > 2 * MAX_ABS
        assert np.abs(got - ref).max() < MAX_ABS, (lang, np.abs(got - ref).max())
        assert kld.max() < MAX_KLD and kld.mean() < MEAN_KLD, (lang, kld.max(), kld.mean())
        assert decided.mean() > 0.8  # the argmax check below covers most positions
        assert (got.argmax(-1) == ref.argmax(-1))[decided].all(), lang


def test_chatml_markers_are_single_tokens_in_llamacpp(llama: Any) -> None:
    llm = llama("qwen2")
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(llm.tokenize(marker.encode(), add_bos=False, special=True)) == 1


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_chat_prompt_tokens_match_llamacpp(arch: str, family_path: Callable[[str], Path], llama: Any) -> None:
    """A rendered chat prompt tokenizes to the same ids in transformers and llama.cpp, so the HF and
    GGUF runtimes serve the same prompt (llama.cpp puts a "▁" after every special token; the
    checkpoint's tokenizer is exported with the same legacy SentencePiece spacing)."""
    from orlik.checkpoint import Checkpoint

    tok = Checkpoint.open(family_path(arch)).load_tokenizer()
    messages = [{"role": "system", "content": "Odpowiadaj krótko."},
                {"role": "user", "content": "Jaka jest stolica Polski?"},
                {"role": "assistant", "content": "Warszawa."},
                {"role": "user", "content": "A Czech? Żółć, gęślą jaźń."}]  # fmt: skip
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    assert llama(arch).tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == ids
