"""Where `orlik serve` spends its time per streamed token: py-spy on the server while a client streams.

Starts `orlik serve` on the GGUF (optionally another orlik version with --checkout, as
serve_speed's --baseline), streams completions back to back from one client, records the server
with `py-spy record --gil` (samples holding the GIL: Python work, not waiting) and prints orlik's
CPU seconds per 1,000 tokens and the share of samples by category. Needs py-spy (pip install py-spy;
root or ptrace permission).

    python -m orlik.benchmarks.scripts.serve_profile VARIANT --seconds 40 --raw prof.txt
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from orlik.benchmarks.scripts.serve_speed import PROMPT
from orlik.benchmarks.serving_proc import orlik_serve_pid

# First match from the leaf frame upwards wins.
CATEGORIES = [
    (
        "reading llama-server's stream",
        ("http/client.py", "httpcore/", "httpx/", "socket.py", "h11/_readers", "llamaserver_stream.py"),
    ),
    ("JSON decoding of llama-server events", ("json/decoder.py", "json/__init__.py:3")),
    ("chunk encoding", ("formats.py", "json/encoder.py")),
    ("stop-string holdback / detokenization", ("textstream.py",)),
    ("orlik engine (events, Run queue)", ("engine.py", "streamrun.py", "llamaserver.py", "api.py")),
    ("uvicorn/h11 response writing", ("uvicorn/", "h11/", "httptools")),
    ("Starlette/FastAPI response and middleware", ("starlette/", "fastapi/", "anyio/", "app.py")),
    ("asyncio event loop", ("asyncio/", "selectors.py", "uvloop")),
    ("worker thread pool", ("concurrent/futures", "threading.py")),
]


def category(frames: list[str]) -> str:
    for f in reversed(frames):
        for name, keys in CATEGORIES:
            if any(k in f for k in keys):
                return name
    return "other"


def shares(raw: Path) -> dict[str, float]:
    """py-spy's raw (collapsed) output: 'frame;frame;... count' per line."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[category(stack.split(";"))] += int(n)
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()} | {"samples": total}


def _client(url: str, tokens: list[int], stop: threading.Event) -> None:
    with httpx.Client(timeout=600) as c:
        seed = 0
        while not stop.is_set():
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 64, "temperature": 0.8, "seed": seed,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"usage":{' in line:
                        tokens[0] += int(json.loads(line[6:])["usage"]["completion_tokens"])
            seed += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF variant directory or .gguf file")
    ap.add_argument("--seconds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw", type=Path, default=Path("serve-profile.txt"), help="py-spy's raw output")
    ap.add_argument(
        "--checkout", type=Path, default=None, help="serve another orlik version (see serve_speed)"
    )
    a = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    model = f"m={a.model.resolve()}"
    checkout = a.checkout.resolve() if a.checkout else None
    with orlik_serve_pid([model], "--parallel", "4", "--threads", str(a.threads), checkout=checkout) as (
        url,
        pid,
    ):
        stop, tokens = threading.Event(), [0]
        th = threading.Thread(target=_client, args=(url, tokens, stop))
        th.start()
        try:
            time.sleep(2)  # the first request's prompt and buffers
            proc, t0 = psutil.Process(pid), tokens[0]
            c0 = sum(proc.cpu_times()[:2])
            subprocess.run([spy, "record", "--gil", "-r", "200", "-d", str(a.seconds), "-f", "raw",
                            "-o", str(a.raw), "-p", str(pid), "--nonblocking"], check=True, capture_output=True)  # fmt: skip
            cpu, n = sum(proc.cpu_times()[:2]) - c0, tokens[0] - t0
        finally:
            stop.set()
            th.join()
    out = {"tokens": n, "cpu_s": round(cpu, 3), "cpu_s_per_1000_tokens": round(1000 * cpu / max(1, n), 3),
           "shares_percent": shares(a.raw)}  # fmt: skip
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
