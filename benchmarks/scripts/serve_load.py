"""Load test of `orlik serve`: many requests at a concurrency above what the server admits.

Passes when every answer is a 200 or a 429 (with Retry-After), no connection hangs, and the server is
healthy and idle afterwards. Reports latency percentiles.

    python -m orlik.benchmarks.scripts.serve_load runs/tiny/variants/Q4_K_M --requests 200 --concurrency 16 --queue-size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from orlik.benchmarks.serving_proc import orlik_serve


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))], 4)


def run_load(
    url: str, model: str, n: int, concurrency: int, max_tokens: int, timeout: float
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=timeout)
        body = {"model": model, "messages": [{"role": "user", "content": f"Opowiedz mi historię numer {i}."}],
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i}  # fmt: skip
        t0 = time.monotonic()
        rec: dict[str, Any] = {"i": i}
        try:
            r = local.c.post(f"{url}/v1/chat/completions", json=body)
            rec.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
            if r.status_code == 200:
                rec["tokens"] = r.json()["usage"]["completion_tokens"]
        except httpx.TimeoutException:
            rec["status"] = "hung"
        except httpx.HTTPError as e:
            rec["status"] = f"error: {e}"
        rec["latency"] = time.monotonic() - t0
        with lock:
            results.append(rec)

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.monotonic() - t0
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    ok = [r["latency"] for r in results if r["status"] == 200]
    rejected = [r["latency"] for r in results if r["status"] == 429]
    health = httpx.get(f"{url}/health", timeout=10)
    after = httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                       json={"model": model, "messages": [{"role": "user", "content": "hej"}], "max_tokens": 4})  # fmt: skip
    return {
        "requests": n, "concurrency": concurrency, "statuses": statuses, "wall_s": round(wall, 2),
        "latency_200_p50_s": pct(ok, 50), "latency_200_p95_s": pct(ok, 95), "latency_200_max_s": pct(ok, 100),
        "latency_429_p50_s": pct(rejected, 50), "latency_429_p95_s": pct(rejected, 95),
        "retry_after_present": all(r["retry_after"] for r in results if r["status"] == 429),
        "completion_tokens": sum(r.get("tokens", 0) for r in results),
        "tokens_per_s": round(sum(r.get("tokens", 0) for r in results) / wall, 1) if wall else None,
        "mean_latency_200_s": round(statistics.mean(ok), 4) if ok else None,
        "healthy_after": health.status_code == 200 and health.json().get("running") == 0
        and health.json().get("queued") == 0 and after.status_code == 200,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="variant dir, FP16 checkpoint or .gguf")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout: longer counts as hung")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)
    args = ["--queue-size", str(a.queue_size), "--parallel", str(a.parallel)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    with orlik_serve([f"m={a.model}"], *args) as url:
        res = run_load(url, "m", a.requests, a.concurrency, a.max_tokens, a.timeout)
    res.update(model=str(a.model), queue_size=a.queue_size, parallel=a.parallel)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    good = set(res["statuses"]) <= {"200", "429"} and res["healthy_after"] and res["retry_after_present"]
    print("PASS" if good else "FAIL: statuses other than 200/429, or unhealthy after", file=sys.stderr)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
