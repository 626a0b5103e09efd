"""Chaos test of `orlik serve`: a load test while the llama-server child is killed at random times.

Bounded in requests and in time, on 127.0.0.1 only. Every request must end (no hangs); a request
that meets a dead child gets a clean 503 (or an error event in its stream), never a 500; after each
kill the server restarts the child by itself. Reports the requests sent, the status counts, hangs
and the time to recover after each kill (until /health is 200 again, and until the next 200).

    python -m orlik.benchmarks.scripts.serve_chaos runs/tiny/variants/Q4_K_M --requests 300 --duration 120
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from orlik.benchmarks.serving_proc import orlik_serve_pid

OK_STATUSES = {"200", "429", "503", "504", "stream:backend_died", "stream:backend_stalled"}


def _child(server_pid: int) -> psutil.Process | None:
    kids = [p for p in psutil.Process(server_pid).children(recursive=True) if "llama-server" in p.name()]
    return kids[0] if kids else None


def one_request(c: httpx.Client, url: str, i: int, max_tokens: int) -> tuple[str, float | None, str]:
    """One request, streamed or not; (outcome, time it ended, error message) where outcome is a
    status or 'stream:<error code>' for an error reported inside a 200 stream, or 'hung'."""
    body = {"model": "m", "messages": [{"role": "user", "content": f"Opowiedz historię numer {i}."}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": i % 2 == 0}  # fmt: skip
    try:
        if not body["stream"]:
            r = c.post(f"{url}/v1/chat/completions", json=body)
            return str(r.status_code), time.monotonic(), _message(r.text) if r.status_code != 200 else ""
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return str(r.status_code), time.monotonic(), _message(r.read().decode("utf-8", "replace"))
            outcome, done, msg = "stream:no_done", False, ""
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line:
                    outcome = "stream:" + str(json.loads(line[6:])["error"].get("code"))
                    msg = _message(line[6:])
            return ("200" if outcome == "stream:no_done" and done else outcome), time.monotonic(), msg
    except httpx.TimeoutException:
        return "hung", None, ""
    except httpx.HTTPError as e:
        return f"transport:{type(e).__name__}", time.monotonic(), str(e)


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300]


def run_chaos(url: str, server_pid: int, a: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(a.seed)
    stop_at = time.monotonic() + a.duration
    counter = iter(range(a.requests))
    lock = threading.Lock()
    outcomes: list[tuple[str, float | None, str]] = []
    kills: list[float] = []
    load_done = threading.Event()

    def worker() -> None:
        with httpx.Client(timeout=a.client_timeout) as c:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                res = one_request(c, url, i, a.max_tokens)
                with lock:
                    outcomes.append(res)

    def killer() -> None:
        while not load_done.wait(rng.expovariate(1.0 / a.kill_every)):
            child = _child(server_pid)
            if child is not None:
                child.kill()
                kills.append(time.monotonic())

    t0 = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    kt = threading.Thread(target=killer)
    for t in [*workers, kt]:
        t.start()
    for t in workers:
        t.join()
    load_done.set()
    kt.join()
    wall = time.monotonic() - t0
    return _report(url, outcomes, kills, wall, a.client_timeout)


def _recovery(kills: list[float], oks: list[float]) -> list[float]:
    """Seconds from each kill to the next request that ended 200 (kills with none after: left out)."""
    out = []
    for k in kills:
        later = [t for t in oks if t > k]
        if later:
            out.append(round(min(later) - k, 2))
    return out


def _report(url: str, outcomes: list[tuple[str, float | None, str]], kills: list[float], wall: float,
            client_timeout: float) -> dict[str, Any]:  # fmt: skip
    counts = Counter(o for o, _, _ in outcomes)
    messages = Counter(f"{o}: {m}" for o, _, m in outcomes if o != "200")
    t_end = time.monotonic()
    deadline = t_end + 120
    while time.monotonic() < deadline:  # the last kill's restart, at most two minutes
        h = httpx.get(f"{url}/health", timeout=10)
        if h.status_code == 200 and all(v == "loaded" for v in h.json()["models"].values()):
            break
        time.sleep(0.1)
    after = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       json={"model": "m", "messages": [{"role": "user", "content": "hej"}], "max_tokens": 4})  # fmt: skip
    rec = _recovery(kills, [t for o, t, _ in outcomes if o == "200" and t is not None])
    health = h.json()
    return {
        "requests_sent": len(outcomes), "wall_s": round(wall, 1), "kills": len(kills),
        "statuses": dict(sorted(counts.items())), "hangs": counts.get("hung", 0),
        "errors": dict(messages.most_common()),
        "client_timeout_s": client_timeout,
        "recovery_to_next_200_s": {"median": statistics.median(rec) if rec else None,
                                   "max": max(rec) if rec else None, "all": rec},
        "healthy_after_s": round(time.monotonic() - t_end, 2),
        "healthy_after": h.status_code == 200 and health["running"] == 0 and health["queued"] == 0
        and after.status_code == 200,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF variant directory or .gguf file")
    ap.add_argument("--requests", type=int, default=300, help="at most this many requests")
    ap.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between kills")
    ap.add_argument("--stall-timeout", type=float, default=5.0)
    ap.add_argument("--client-timeout", type=float, default=120.0, help="longer than this counts as hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)
    args = [
        "--queue-size",
        str(a.queue_size),
        "--parallel",
        str(a.parallel),
        "--stall-timeout",
        str(a.stall_timeout),
    ]
    if a.threads:
        args += ["--threads", str(a.threads)]
    with orlik_serve_pid([f"m={a.model}"], *args) as (url, pid):
        res = run_chaos(url, pid, a)
    res.update(model=str(a.model), concurrency=a.concurrency, parallel=a.parallel, queue_size=a.queue_size,
               max_tokens=a.max_tokens, kill_every_s=a.kill_every, seed=a.seed)  # fmt: skip
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    bad = set(res["statuses"]) - OK_STATUSES
    good = res["hangs"] == 0 and not bad and res["healthy_after"]
    print("PASS" if good else f"FAIL: hangs {res['hangs']}, unexpected {sorted(bad)}, healthy_after "
          f"{res['healthy_after']}", file=sys.stderr)  # fmt: skip
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
