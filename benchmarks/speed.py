"""Speed and memory of each variant, measured through its serving runtime in a fresh child process:
prompt processing (512 tokens), decoding (128 tokens), time to first token, peak RSS during load
and during generation.

`python -m orlik.benchmarks.speed PATH --prompt-file F` is the child; `measure_all` runs one child
per model, one after another, so no two measurements compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orlik import progress
from orlik.errors import InputError
from orlik.sysinfo import usable_cores

PROMPT_TOKENS = 512
GEN_TOKENS = 128
REPS = 3
CHILD_TIMEOUT_S = 3600


def _rss_now() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak()


def _rss_peak() -> int:
    """Peak RSS of this process image. Linux: VmHWM, which starts afresh at exec; ru_maxrss would
    carry over the high-water mark of the parent that spawned us."""
    try:
        with open("/proc/self/status") as f:
            return int(next(ln.split()[1] for ln in f if ln.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _reset_peak() -> bool:
    """Restart the peak-RSS count (Linux clear_refs 5), so generation's peak is measured on its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prompts(ids: list[int], bos: int | None, reps: int = REPS, n: int = PROMPT_TOKENS) -> list[list[int]]:
    """`reps` distinct prompts of n tokens from the evaluation text, so no run reuses another's
    KV cache prefix (beyond BOS)."""
    body = n - (1 if bos is not None else 0)
    start = 1 if bos is not None and ids and ids[0] == bos else 0
    if len(ids) - start < reps * body:
        raise InputError(f"the evaluation text has {len(ids)} tokens; --speed needs {reps * body + start}")
    out = []
    for r in range(reps):
        seg = ids[start + r * body : start + (r + 1) * body]
        out.append(([bos] if bos is not None else []) + seg)
    return out


def _generate_timed(rt: Any, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """(time to first token, the gaps between later tokens). When the model ends a sequence early
    the run continues from the text so far (the EOS included, as between training documents), and
    the gap spanning that restart is left out."""
    from orlik.serving.runtimes.base import Sampling

    seq = list(prompt)
    gaps: list[float] = []
    ttft = 0.0
    produced = 0
    while produced < n:
        t0 = time.perf_counter()
        last = None
        for tok in rt.generate(seq, Sampling(max_tokens=n - produced, temperature=0.0)):
            now = time.perf_counter()
            if produced == 0:
                ttft = now - t0
            elif last is not None:
                gaps.append(now - last)
            last = now
            produced += 1
            seq.append(tok.id)
    return ttft, gaps


def measure(path: Path, prompt_sets: list[list[int]], gen_tokens: int, threads: int | None) -> dict[str, Any]:
    """Runs in the child: load, warm up, then time each prompt; returns medians and RSS peaks."""
    from orlik.manifest import Variant
    from orlik.serving.runtimes.base import open_source, runtime_class

    src = open_source(path)
    cls = runtime_class(src.format if isinstance(src, Variant) else "fp16")
    if cls.name == "transformers":
        import torch  # imported before the baseline so the library is not counted as model memory
    rss_base = _rss_now()
    t0 = time.perf_counter()
    n_ctx = max(len(p) for p in prompt_sets) + gen_tokens + 8
    rt = cls.load(src, n_ctx=n_ctx, threads=threads)
    load_s = time.perf_counter() - t0
    rss_load = _rss_peak()
    separate = _reset_peak()
    _generate_timed(rt, prompt_sets[0][:32], 4)  # warm-up: first-call allocations, thread pools
    ttfts, rates = [], []
    for p in prompt_sets:
        ttft, gaps = _generate_timed(rt, p, gen_tokens)
        ttfts.append(ttft)
        rates.append(len(gaps) / sum(gaps) if gaps else float("nan"))
    used = getattr(rt, "threads", None) or threads
    if used is None and cls.name == "transformers":
        import torch

        used = torch.get_num_threads()
    rt.close()
    ttft = statistics.median(ttfts)
    return {
        "runtime": cls.name,
        "threads": used,
        "load_s": load_s,
        "ttft_s": ttft,
        "prompt_tokens": len(prompt_sets[0]),
        "prompt_tps": len(prompt_sets[0]) / ttft,
        "gen_tokens": gen_tokens,
        "decode_tps": statistics.median(rates),
        "reps": len(prompt_sets),
        "rss_base_bytes": rss_base,
        "peak_rss_load_bytes": rss_load,
        # Without clear_refs the generation peak includes the load peak (it is the process's peak).
        "peak_rss_gen_bytes": _rss_peak(),
        "peak_rss_gen_separate": separate,
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": usable_cores(), "memory_bytes": mem, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}  # fmt: skip


def measure_all(paths: list[tuple[str, Path]], prompt_sets: list[list[int]], *, gen_tokens: int = GEN_TOKENS,
                threads: int | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One child process per (name, path), sequentially. A failed child is reported, not hidden."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="orlik-speed-") as tmp:
        pf = Path(tmp) / "prompts.json"
        pf.write_text(json.dumps(prompt_sets))
        with progress.bar("speed", total=len(paths)) as bar:
            for name, path in paths:
                cmd = [sys.executable, "-m", "orlik.benchmarks.speed", str(path), "--prompt-file", str(pf),
                       "--gen", str(gen_tokens)] + (["--threads", str(threads)] if threads else [])  # fmt: skip
                env = {**os.environ, "ORLIK_QUIET": "1"}
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
                except subprocess.TimeoutExpired:
                    out[name] = {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
                    bar.advance()
                    continue
                lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
                if r.returncode != 0 or not lines:
                    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    out[name] = {"error": f"exit {r.returncode}: {tail}"}
                    progress.info(f"[yellow]speed of {name} not measured: {out[name]['error']}[/]")
                else:
                    out[name] = json.loads(lines[-1])
                bar.advance()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m orlik.benchmarks.speed", description=__doc__)
    ap.add_argument("path", type=Path, help="variant directory or FP16 checkpoint")
    ap.add_argument("--prompt-file", type=Path, required=True, help="JSON list of token-id prompts")
    ap.add_argument("--gen", type=int, default=GEN_TOKENS)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    prompt_sets = json.loads(a.prompt_file.read_text())
    print(json.dumps(measure(a.path, prompt_sets, a.gen, a.threads)), flush=True)


if __name__ == "__main__":
    main()
