"""Decode speed through `orlik serve` against llama-server alone, on the same GGUF and threads.

Both sides run the identical llama-server command (orlik's child, and a bare one started the same
way); requests alternate between them. Reports single-stream decode tok/s and the aggregate
throughput of N concurrent streams, and orlik's ratio to llama-server for each.

    python -m orlik.benchmarks.serve_speed runs/tiny/variants/Q8_0 --threads 2 --tokens 256 --streams 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from orlik.benchmarks.serving_proc import orlik_serve
from orlik.serving.runtimes.llamaserver import LlamaServer, gguf_file

PROMPT = "Dawno, dawno temu, za siedmioma górami i za siedmioma lasami, żył sobie"


def _stream(client: httpx.Client, url: str, body: dict[str, Any], count: Any) -> dict[str, float]:
    """POST a streaming request; returns start, first/last token times and the token count."""
    t0 = time.monotonic()
    first = last = None
    n = 0
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            k, total = count(d)
            if k:
                now = time.monotonic()
                first = first or now
                last = now
            n = total if total is not None else n + k
    assert first is not None and last is not None, "no tokens streamed"
    return {"start": t0, "first": first, "last": last, "end": time.monotonic(), "tokens": n}


def orlik_request(base: str, n: int, seed: int) -> tuple[str, dict[str, Any], Any]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": n, "temperature": 0.8, "seed": seed, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip

    def count(d: dict[str, Any]) -> tuple[int, int | None]:
        if d.get("usage"):
            return 0, int(d["usage"]["completion_tokens"])
        return (1 if d["choices"] and d["choices"][0]["text"] else 0), None

    return f"{base}/v1/completions", body, count


def direct_request(base: str, n: int, seed: int) -> tuple[str, dict[str, Any], Any]:
    # The same sampling orlik forwards: OpenAI defaults, penalties off.
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0.8, "seed": seed, "ignore_eos": True, "stream": True,
            "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "cache_prompt": True}  # fmt: skip

    def count(d: dict[str, Any]) -> tuple[int, int | None]:
        if d.get("stop"):
            return 0, int(d.get("tokens_predicted", 0))
        return (1 if d.get("content") or d.get("tokens") else 0), None

    return f"{base}/completion", body, count


def single(client: httpx.Client, req: tuple[str, dict[str, Any], Any]) -> float:
    # Tokens over the whole request as the client sees it: token arrival times are bursty (either
    # server may flush several SSE events at once), the end of the stream is not. The prompt is ~20
    # tokens, so this is decode speed to within a percent.
    s = _stream(client, req[0], req[1], req[2])
    return s["tokens"] / (s["end"] - s["start"])


def aggregate(clients: list[httpx.Client], reqs: list[tuple[str, dict[str, Any], Any]]) -> float:
    out: list[dict[str, float]] = []
    barrier = threading.Barrier(len(reqs))

    def go(c: httpx.Client, r: tuple[str, dict[str, Any], Any]) -> None:
        barrier.wait()
        out.append(_stream(c, r[0], r[1], r[2]))

    threads = [threading.Thread(target=go, args=(c, r)) for c, r in zip(clients, reqs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(s["tokens"] for s in out) / (max(s["end"] for s in out) - min(s["start"] for s in out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF variant directory or .gguf file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from orlik.serving.runtimes.base import open_source

    src = a.model if a.model.suffix == ".gguf" else open_source(a.model)
    gguf = gguf_file(src)
    direct = LlamaServer(gguf, parallel=a.streams, threads=a.threads, ctx_per_slot=None, alias="m")
    direct.start()
    auth = {"Authorization": f"Bearer {direct.key}"}
    res: dict[str, Any] = {"gguf": str(gguf), "threads": a.threads, "tokens": a.tokens, "streams": a.streams,
                           "llama_server_command": " ".join(direct.command())}  # fmt: skip
    try:
        with orlik_serve([f"m={a.model}"], "--parallel", str(a.streams), "--threads", str(a.threads)) as url:
            oc = [httpx.Client(timeout=600) for _ in range(a.streams)]
            dc = [httpx.Client(timeout=600, headers=auth) for _ in range(a.streams)]
            # Warm both (first requests allocate buffers), then alternate so drift hits both alike.
            single(oc[0], orlik_request(url, 16, 0))
            single(dc[0], direct_request(direct.url, 16, 0))
            s_o, s_d, g_o, g_d = [], [], [], []
            for r in range(a.repeats):
                s_o.append(single(oc[0], orlik_request(url, a.tokens, r)))
                s_d.append(single(dc[0], direct_request(direct.url, a.tokens, r)))
                g_o.append(
                    aggregate(oc, [orlik_request(url, a.tokens, 100 * r + i) for i in range(a.streams)])
                )
                g_d.append(
                    aggregate(
                        dc, [direct_request(direct.url, a.tokens, 100 * r + i) for i in range(a.streams)]
                    )
                )
    finally:
        direct.stop()
    med = statistics.median
    res.update({
        "single_stream_decode_tok_s": {"orlik": round(med(s_o), 1), "llama_server": round(med(s_d), 1),
                                       "runs_orlik": [round(x, 1) for x in s_o], "runs_llama_server": [round(x, 1) for x in s_d]},
        f"aggregate_{a.streams}_streams_tok_s": {"orlik": round(med(g_o), 1), "llama_server": round(med(g_d), 1),
                                                 "runs_orlik": [round(x, 1) for x in g_o], "runs_llama_server": [round(x, 1) for x in g_d]},
        "ratio_single": round(med(s_o) / med(s_d), 3),
        f"ratio_aggregate_{a.streams}": round(med(g_o) / med(g_d), 3),
    })  # fmt: skip
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
