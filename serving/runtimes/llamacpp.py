"""GGUF variants through llama-cpp-python: full-vocabulary logits for the evaluator, and
token streaming with llama.cpp's own sampler chain (penalties, top-k/p, min-p, grammar) for serving.

One instance owns one llama.cpp context with one sequence; callers serialize requests to it.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from orlik.checkpoint import Checkpoint
from orlik.errors import InputError, ManifestError, ToolError
from orlik.manifest import Variant
from orlik.serving.runtimes.base import Runtime, Sampling, Token
from orlik.sysinfo import usable_cores

# llama.cpp's default repetition window (common_params_sampling.penalty_last_n).
PENALTY_LAST_N = 64

# Runtimes still open at exit are closed while llama_cpp's module is intact; left to the garbage
# collector during interpreter shutdown, llama-cpp-python's __del__ raises into stderr.
_OPEN: weakref.WeakSet[LlamaCppRuntime] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for rt in list(_OPEN):
        rt.close()


def gguf_file(source: Variant | Checkpoint | str | Path) -> Path:
    """The .gguf file of a variant (the first .gguf its manifest lists: a variant also holds its
    README.md model card), or a path to a .gguf file itself; what both GGUF runtimes load."""
    if isinstance(source, Checkpoint):
        raise InputError(f"{source.path} is a checkpoint, not a GGUF variant or file")
    if isinstance(source, Variant):
        assert source.path is not None
        ggufs = [n for n in source.files if n.endswith(".gguf")]
        if not ggufs:
            raise ManifestError(f"{source.path}: a gguf variant lists no .gguf file")
        path = source.path / ggufs[0]
    else:
        path = Path(source)
    if not path.is_file():
        raise InputError(f"{path} is not a GGUF file (it does not exist or is a directory)")
    return path


class LlamaCppRuntime(Runtime):
    name = "llama.cpp"
    formats = ("gguf",)
    supports_json_schema = True  # through llama.cpp's grammar sampler (GBNF from the schema)

    def __init__(self, llm: Any, path: Path, threads: int) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.llm, self.path, self.threads = llm, path, threads
        self._vocab = llm._model.vocab
        self._n_vocab = int(llm.n_vocab())
        self._n_batch = int(llm.n_batch)
        self._batch = llm._batch.batch
        # Tokens whose keys/values are in the KV cache, so a new prompt can reuse their prefix.
        self._cached: list[int] = []
        self._eos: set[int] | None = None
        _OPEN.add(self)

    @classmethod
    def missing(cls) -> str | None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return 'llama-cpp-python is not installed; run `make llamacpp` (or pip install "orlik[gguf]")'
        except OSError as e:  # the shared library is there but does not load
            return f"llama-cpp-python cannot load its library ({e}); rerun `make llamacpp`"
        return None

    @classmethod
    def load(cls, source: Variant | Checkpoint | Path, **options: Any) -> LlamaCppRuntime:
        """Options: n_ctx (0 = the model's training context), threads, n_batch, n_gpu_layers,
        flash_attn (default: on where the backend supports it), verbose."""
        import llama_cpp

        if isinstance(source, Checkpoint):
            raise InputError(f"{source.path} is an FP16 checkpoint; llama.cpp runs GGUF variants")
        path = gguf_file(source)
        threads = int(options.get("threads") or usable_cores())
        n_ctx = int(options.get("n_ctx") or 0)
        n_batch = int(options.get("n_batch") or 512)
        kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512), n_threads=threads,
                      n_threads_batch=threads, n_gpu_layers=int(options.get("n_gpu_layers") or 0),
                      logits_all=False,  # outputs are requested per batch position instead
                      verbose=bool(options.get("verbose", False)))  # fmt: skip
        # llama.cpp's tools default to flash attention where the backend has it (-fa auto); it
        # is 15-30% faster on CPU at 512 tokens. llama-cpp-python only offers on or off, so "on" is
        # tried first and a context the backend cannot build that way is made without it.
        flash = options.get("flash_attn")
        tries = [bool(flash)] if flash is not None else [True, False]
        for i, fa in enumerate(tries):
            try:
                llm = llama_cpp.Llama(str(path), flash_attn=fa, **kwargs)
                break
            except ValueError as e:  # llama-cpp-python reports load failures as ValueError
                if i + 1 == len(tries):
                    raise ToolError(f"llama.cpp cannot load {path}: {e}") from None
        if n_ctx and llm.n_ctx() < n_ctx:
            raise ToolError(f"llama.cpp gave a context of {llm.n_ctx()} tokens for {path}, not {n_ctx}")
        return cls(llm, path, threads)

    # ------------------------------------------------------------------ model facts
    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def bos_id(self) -> int | None:
        bos = int(self._lc.llama_vocab_bos(self._vocab))
        return bos if bos >= 0 else None

    @property
    def adds_bos(self) -> bool:
        return bool(self._lc.llama_vocab_get_add_bos(self._vocab))

    @property
    def eos_ids(self) -> set[int]:
        """Every end-of-generation token llama.cpp knows (EOS, EOT, <|im_end|> and the like)."""
        if self._eos is None:
            is_eog = self._lc.llama_vocab_is_eog
            self._eos = {t for t in range(self._n_vocab) if is_eog(self._vocab, t)}
        return set(self._eos)

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        # add_bos maps to llama.cpp's add_special, which adds BOS only where the vocab asks for it,
        # exactly as llama-perplexity and llama-server tokenize.
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: list[int]) -> str:
        """llama.cpp's own llama_detokenize: special tokens rendered, and the leading space that
        SentencePiece adds to the first word removed, as transformers' decode does."""
        arr = (self._lc.llama_token * len(tokens))(*[int(t) for t in tokens])
        size = 8 * len(tokens) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lc.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n  # too small: llama.cpp says how many bytes it needs
        raise ToolError("llama_detokenize failed")

    def token_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._lc.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, True)
        if n < 0:  # piece longer than the buffer: ask again with the size llama.cpp reported
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, True)
        return bytes(buf.raw[:n])

    # ------------------------------------------------------------------ decoding
    def _clear(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self._cached = []

    def _decode(
        self, tokens: list[int], n_past: int, first_output: int, out: list[np.ndarray] | None
    ) -> None:
        """Decode `tokens` at positions n_past.. in n_batch pieces. Positions >= first_output
        (relative to `tokens`) produce logits, copied into `out` when given; the others only fill
        the KV cache."""
        b = self._batch
        for i in range(0, len(tokens), self._n_batch):
            piece = tokens[i : i + self._n_batch]
            b.n_tokens = len(piece)
            for j, t in enumerate(piece):
                b.token[j] = t
                b.pos[j] = n_past + i + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = i + j >= first_output
            rc = self._lc.llama_decode(self.llm._ctx.ctx, b)
            if rc != 0:
                self._cached = []
                raise ToolError(
                    f"llama_decode failed with code {rc} (context {self.n_ctx}, batch {len(piece)})"
                )
            n_out = len(piece) - min(len(piece), max(0, first_output - i))
            if n_out and out is not None:
                ptr = self._lc.llama_get_logits(self.llm._ctx.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n_out, self._n_vocab)).copy())
        self._cached = self._cached[:n_past] + list(tokens)

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.logits_from(tokens, 0)

    def logits_from(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits of positions first..len-1 only; llama.cpp skips the output layer for the rest,
        as llama-perplexity does for the unscored first half of each chunk."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return np.zeros((0, self._n_vocab), dtype=np.float32)
        if len(tokens) > self.n_ctx:
            raise InputError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}; load with n_ctx=")
        self._clear()
        out: list[np.ndarray] = []
        self._decode(tokens, 0, first, out)
        return np.concatenate(out) if out else np.zeros((0, self._n_vocab), np.float32)

    def _prefill(self, tokens: list[int]) -> None:
        """Bring the KV cache to `tokens`, reusing the longest cached prefix (as llama-server does)."""
        keep = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # re-decode at least the last token to get its logits
        if keep <= 0 or not self.llm._ctx.kv_cache_seq_rm(0, keep, -1):
            self._clear()
            keep = 0
        self._cached = self._cached[:keep]
        self._decode(tokens[keep:], keep, len(tokens) - keep - 1, None)

    def _sampler(self, s: Sampling, prompt: list[int]) -> Any:
        """llama.cpp's sampler chain in llama-server's order: penalties, top-k, top-p, min-p,
        temperature, then greedy or seeded dist. A grammar, when given, runs first."""
        from llama_cpp import _internals

        lc = self._lc
        chain = _internals.LlamaSampler()
        grammar = self._grammar(s)
        if grammar is not None:
            lc.llama_sampler_chain_add(chain.sampler, grammar)
        if s.ignore_eos:  # as llama-server does it: a -inf bias on every end-of-generation token
            eos = sorted(self.eos_ids)
            biases = (lc.llama_logit_bias * len(eos))(*(lc.llama_logit_bias(t, float("-inf")) for t in eos))
            lc.llama_sampler_chain_add(
                chain.sampler, lc.llama_sampler_init_logit_bias(self._n_vocab, len(eos), biases)
            )
        if s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            pen = lc.llama_sampler_init_penalties(
                self._n_vocab, PENALTY_LAST_N, s.repetition_penalty, s.frequency_penalty, s.presence_penalty
            )
            # llama-server feeds the prompt to the penalties (not to the grammar) before sampling.
            for t in prompt[-PENALTY_LAST_N:]:
                lc.llama_sampler_accept(pen, t)
            lc.llama_sampler_chain_add(chain.sampler, pen)
        if s.temperature <= 0:
            chain.add_greedy()
            return chain
        if s.top_k and s.top_k > 0:
            chain.add_top_k(int(s.top_k))
        if s.top_p < 1.0:
            chain.add_top_p(float(s.top_p), 1)
        if s.min_p > 0:
            chain.add_min_p(float(s.min_p), 1)
        chain.add_temp(float(s.temperature))
        seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed) & 0xFFFFFFFF
        chain.add_dist(seed)
        return chain

    def _grammar(self, s: Sampling) -> Any:
        """A llama.cpp grammar sampler for Sampling.grammar (GBNF) or .json_schema, or None."""
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        if s.grammar:
            gbnf = s.grammar
        elif s.json_schema is not None:
            try:
                gbnf = json_schema_to_gbnf(json.dumps(s.json_schema))
            except (ValueError, KeyError, TypeError, NotImplementedError) as e:
                raise InputError(f"unsupported JSON schema: {e}") from None
        else:
            return None
        smpl = self._lc.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), b"root")
        if not smpl:  # llama.cpp returns NULL when the grammar does not parse
            raise InputError("the grammar does not parse as GBNF (llama.cpp rejected it)")
        return smpl

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InputError("an empty prompt cannot be continued")
        if len(tokens) >= self.n_ctx:
            raise InputError(f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}")
        chain = self._sampler(sampling, tokens)
        eos = self.eos_ids
        ctx = self.llm._ctx.ctx
        try:
            self._prefill(tokens)
            for _ in range(sampling.max_tokens):
                tok = int(self._lc.llama_sampler_sample(chain.sampler, ctx, -1))  # also accepts it
                yield self._token(tok, sampling.logprobs)
                if tok in eos or len(self._cached) + 1 >= self.n_ctx:
                    return
                self._decode([tok], len(self._cached), 0, None)
        finally:
            chain.close()

    def _token(self, tok: int, logprobs: int | None) -> Token:
        if logprobs is None:
            return Token(id=tok)
        ptr = self._lc.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        m = row.max()
        lp = row - m - np.log(np.exp(row - m).sum())
        top: list[tuple[int, float]] = []
        if logprobs > 0:
            k = min(int(logprobs), lp.size)
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(i), float(lp[i])) for i in idx]
        return Token(id=tok, logprob=float(lp[tok]), top_logprobs=top)

    def close(self) -> None:
        self.llm.close()
        self._cached = []
        _OPEN.discard(self)


RUNTIME = LlamaCppRuntime
