"""paired.py F16.gguf OUT.json NAME=model.gguf ...

Per-chunk KLD, same top token and mean delta-p of every file against the F16 GGUF on the corpus'
held-out Polish text, scored as `llama-perplexity --kl-divergence` does: the text tokenized once
(with BOS), cut into 512-token chunks, each chunk's first token set to BOS, the logits at positions
256..510 scored against tokens 257..511. Every file is scored on the same tokens, so differences
between files are paired per chunk."""

import json
import sys

import numpy as np
from llama_cpp import Llama

from orlik.corpus import heldout_text

CTX = 512


def logprobs(llm: Llama, chunk: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(chunk)
    z = np.array(llm.scores[: len(chunk)], dtype=np.float64)[CTX // 2 : CTX - 1]
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main() -> None:
    f16, out = sys.argv[1], sys.argv[2]
    files = dict(a.split("=", 1) for a in sys.argv[3:])
    kw = {"n_ctx": CTX, "n_batch": CTX, "logits_all": True, "n_threads": 2, "verbose": False}
    base = Llama(f16, **kw)
    toks = base.tokenize(heldout_text("pl").encode(), add_bos=True)
    n_chunks = len(toks) // CTX
    models = {n: Llama(p, **kw) for n, p in files.items()}
    res: dict[str, dict[str, list[float]]] = {n: {"kld": [], "same_top": [], "dp": []} for n in files}
    for c in range(n_chunks):
        chunk = toks[c * CTX : (c + 1) * CTX]
        chunk[0] = base.token_bos()
        lb = logprobs(base, chunk)
        pb = np.exp(lb)
        nxt = np.array(chunk[CTX // 2 + 1 : CTX])
        idx = np.arange(len(nxt))
        for n, llm in models.items():
            lq = logprobs(llm, chunk)
            res[n]["kld"].append(float((pb * (lb - lq)).sum(-1).mean()))
            res[n]["same_top"].append(float((lb.argmax(-1) == lq.argmax(-1)).mean()))
            res[n]["dp"].append(float((np.exp(lq[idx, nxt]) - pb[idx, nxt]).mean()))
        print(f"chunk {c + 1}/{n_chunks}", flush=True)
    doc = {"chunks": n_chunks, "tokens_scored": n_chunks * (CTX // 2 - 1), "files": files, "results": res}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
