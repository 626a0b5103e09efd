"""Decode speed through `orlik serve` against llama-server alone, on the same GGUF and threads.

Both sides run the identical llama-server command (orlik's child, and a bare one started the same
way); requests alternate between them. Reports single-stream decode tok/s and the aggregate
throughput of N concurrent streams, and orlik's ratio to llama-server for each (medians of the
repeats), with the p50/p99 gap between text chunks on both sides and the CPU seconds orlik's own
process (not its llama-server child) spends per 1,000 streamed tokens.

    python -m orlik.benchmarks.scripts.serve_speed runs/tiny/variants/Q8_0 --threads 2 --tokens 256 --streams 4 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from orlik.benchmarks.serving_proc import orlik_serve_pid
from orlik.serving.runtimes.llamaserver import LlamaServer, gguf_file

PROMPT = "Dawno, dawno temu, za siedmioma górami i za siedmioma lasami, żył sobie"


def _stream(client: httpx.Client, url: str, body: dict[str, Any], count: Any) -> dict[str, Any]:
    """POST a streaming request; returns start, first/last token times, the token count and the
    gaps between successive chunks that carried text (the inter-token latency a reader sees)."""
    t0 = time.monotonic()
    first = last = None
    n = 0
    gaps: list[float] = []
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            k, total = count(d)
            if k:
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                first = first or now
                last = now
            n = total if total is not None else n + k
    assert first is not None and last is not None, "no tokens streamed"
    return {"start": t0, "first": first, "last": last, "end": time.monotonic(), "tokens": n, "gaps": gaps}


def orlik_request(base: str, n: int, seed: int) -> tuple[str, dict[str, Any], Any]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": n, "temperature": 0.8, "seed": seed, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip

    def count(d: dict[str, Any]) -> tuple[int, int | None]:
        if "error" in d:
            raise RuntimeError(f"orlik streamed an error: {d['error']}")
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


class Tally:
    """Tokens, chunk gaps and (for orlik) the server process's CPU seconds over a set of runs."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid) if pid else None
        self.tokens, self.cpu = 0, 0.0
        self.gaps: list[float] = []

    def _cpu(self) -> float:
        t = self.proc.cpu_times() if self.proc else None
        return t.user + t.system if t else 0.0

    def measure(self, fn: Any, *args: Any) -> Any:
        c0 = self._cpu()
        out = fn(*args)
        self.cpu += self._cpu() - c0
        for s in out if isinstance(out, list) else [out]:
            self.tokens += s["tokens"]
            self.gaps += s["gaps"]
        return out

    def summary(self) -> dict[str, Any]:
        g = sorted(self.gaps)

        def pct(p: float) -> float | None:
            return round(1000 * g[min(len(g) - 1, round(p / 100 * (len(g) - 1)))], 2) if g else None

        out: dict[str, Any] = {"tokens": self.tokens, "itl_p50_ms": pct(50), "itl_p99_ms": pct(99)}
        if self.proc:
            out["cpu_s"] = round(self.cpu, 3)
            out["cpu_s_per_1000_tokens"] = round(1000 * self.cpu / max(1, self.tokens), 3)
        return out


def rate(s: dict[str, Any] | list[dict[str, Any]]) -> float:
    # Tokens over the whole request as the client sees it: token arrival times are bursty (either
    # server may flush several SSE events at once), the end of the stream is not. The prompt is ~20
    # tokens, so this is decode speed to within a percent. For several streams: from the first start
    # to the last end.
    runs = s if isinstance(s, list) else [s]
    return sum(x["tokens"] for x in runs) / (max(x["end"] for x in runs) - min(x["start"] for x in runs))


def single(client: httpx.Client, req: tuple[str, dict[str, Any], Any]) -> dict[str, Any]:
    return _stream(client, req[0], req[1], req[2])


def aggregate(
    clients: list[httpx.Client], reqs: list[tuple[str, dict[str, Any], Any]]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    barrier = threading.Barrier(len(reqs))

    def go(c: httpx.Client, r: tuple[str, dict[str, Any], Any]) -> None:
        barrier.wait()
        out.append(_stream(c, r[0], r[1], r[2]))

    threads = [threading.Thread(target=go, args=(c, r)) for c, r in zip(clients, reqs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def measure(url: str, direct_url: str, auth: dict[str, str], pid: int, a: argparse.Namespace,
            baseline: tuple[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Alternate orlik and llama-server (and the baseline orlik, if any), `a.repeats` times each:
    single stream, then N streams."""
    sides = {"o": (url, pid, orlik_request), "d": (direct_url, None, direct_request)}
    if baseline is not None:
        sides["b"] = (baseline[0], baseline[1], orlik_request)
    clients = {k: [httpx.Client(timeout=600, headers=auth if k == "d" else None) for _ in range(a.streams)]
               for k in sides}  # fmt: skip
    # Warm each side (first requests allocate buffers), then alternate so drift hits all alike.
    for k, (u, _, req) in sides.items():
        single(clients[k][0], req(u, 16, 0))
    t = {k + m: Tally(p) for k, (_, p, _) in sides.items() for m in "sg"}
    rates: dict[str, list[float]] = {k: [] for k in t}
    for r in range(a.repeats):
        for k, (u, _, req) in sides.items():
            rates[k + "s"].append(rate(t[k + "s"].measure(single, clients[k][0], req(u, a.tokens, r))))
        for k, (u, _, req) in sides.items():
            reqs = [req(u, a.tokens, 100 * r + i) for i in range(a.streams)]
            rates[k + "g"].append(rate(t[k + "g"].measure(aggregate, clients[k], reqs)))
    med = statistics.median

    def side(m: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, name in (("o", "orlik"), ("d", "llama_server"), ("b", "orlik_baseline")):
            if k in sides:
                out[name] = round(med(rates[k + m]), 1)
                out[f"runs_{name}"] = [round(x, 1) for x in rates[k + m]]
                out[f"{name}_detail"] = t[k + m].summary()
        return out

    res = {
        "single_stream_decode_tok_s": side("s"),
        f"aggregate_{a.streams}_streams_tok_s": side("g"),
        "ratio_single": round(med(rates["os"]) / med(rates["ds"]), 3),
        f"ratio_aggregate_{a.streams}": round(med(rates["og"]) / med(rates["dg"]), 3),
    }
    if baseline is not None:
        res["ratio_single_baseline"] = round(med(rates["bs"]) / med(rates["ds"]), 3)
        res[f"ratio_aggregate_{a.streams}_baseline"] = round(med(rates["bg"]) / med(rates["dg"]), 3)
    return res


def _check_checkout(root: Path) -> None:
    """The baseline must really import its own serving code: a plain git worktree maps orlik.serving
    through the installed (editable) package, i.e. this checkout's; link orlik/serving -> ../serving
    (and benchmarks, quantize, calibration, training) in it first."""
    code = "import orlik.serving.api as m; print(m.__file__)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    where = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if where.returncode != 0 or not Path(where.stdout.strip()).resolve().is_relative_to(root):
        raise SystemExit(f"--baseline {root}: orlik.serving imports from {where.stdout.strip() or where.stderr[-300:]}, "
                         "not from there; link orlik/serving -> ../serving (and the other stage folders) in it")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF variant directory or .gguf file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also measure `orlik serve` with the orlik package found in DIR (another version, e.g. "
                         "a git worktree), in the same alternation; reported as orlik_baseline")  # fmt: skip
    a = ap.parse_args(argv)
    from orlik.serving.runtimes.base import open_source

    src = a.model if a.model.suffix == ".gguf" else open_source(a.model)
    gguf = gguf_file(src)
    direct = LlamaServer(gguf, parallel=a.streams, threads=a.threads, ctx_per_slot=None, alias="m")
    direct.start()
    auth = {"Authorization": f"Bearer {direct.key}"}
    res: dict[str, Any] = {"gguf": str(gguf), "threads": a.threads, "tokens": a.tokens, "streams": a.streams,
                           "repeats": a.repeats, "llama_server_command": " ".join(direct.command())}  # fmt: skip
    # No request timeout: on a loaded machine 4 streams can run past the default 120 s.
    args = ["--parallel", str(a.streams), "--threads", str(a.threads), "--timeout", "3600"]
    try:
        with contextlib.ExitStack() as stack:
            base = None
            if a.baseline is not None:
                _check_checkout(a.baseline.resolve())
                model = f"m={a.model.resolve()}"
                base = stack.enter_context(orlik_serve_pid([model], *args, checkout=a.baseline.resolve()))
                res["baseline"] = str(a.baseline)
            url, pid = stack.enter_context(orlik_serve_pid([f"m={a.model}"], *args))
            res.update(measure(url, direct.url, auth, pid, a, base))
    finally:
        direct.stop()
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
