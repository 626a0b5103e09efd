"""timeline.py MODEL_DIR SEED [OUT_DIR]: one uncached `orlik quantize --recipe auto-like-Q4_K_M` (the
sensitivity pass made fresh through SEED) in this process, with the start, end and length of each
phase (header reads, the pass's steps, llama.cpp tools) and the process's CPU use in 2-second steps
(children's CPU is counted when they exit)."""

import functools
import os
import sys
import threading
import time

T0 = time.time()
marks: list[tuple[str, float, float]] = []


def wrap(owner: object, name: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*a: object, **k: object) -> object:
        t = time.time()
        try:
            return f(*a, **k)
        finally:
            marks.append((name, t - T0, time.time() - T0))

    setattr(owner, name, timed)


def main() -> None:
    model, seed = sys.argv[1], sys.argv[2]
    out = sys.argv[3] if len(sys.argv) > 3 else "/tmp/timeline"
    from orlik import gguf_read, llamacpp
    from orlik.cli import main as orlik
    from orlik.quantize import gguf_tokens, probes, sensitivity
    from orlik.quantize.backends import gguf as gguf_backend
    from orlik.quantize.backends import gguf_auto

    for owner, name in [(gguf_read, "summarize"), (sensitivity, "split_windows"), (sensitivity, "load_model"),
                        (sensitivity, "fisher"), (probes, "measure"), (gguf_auto, "plan"),
                        (gguf_tokens, "warn_if_different"), (gguf_backend.GGUFBackend, "prepare")]:  # fmt: skip
        wrap(owner, name)
    run_tool = llamacpp.run_tool

    def tool(name: str, args: list[str], *a: object, **k: object) -> tuple[int, str]:
        t = time.time()
        try:
            return run_tool(name, args, *a, **k)
        finally:
            marks.append((name, t - T0, time.time() - T0))

    llamacpp.run_tool = tool
    cpu: list[tuple[float, float]] = []

    def sample() -> None:
        while True:
            t = os.times()
            cpu.append((time.time() - T0, t.user + t.system + t.children_user + t.children_system))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    args = ["quantize", f"{model}/fp16", "--recipe", "auto-like-Q4_K_M", "--calib", f"{model}/calib", "--out", out,
            "--force", "--option", f"seed={seed}"]  # fmt: skip
    try:
        orlik(args)
    except SystemExit:
        pass
    end = time.time() - T0
    print("  start    end  length  phase")
    for name, a, b in sorted(marks, key=lambda m: m[1]):
        print(f"{a:7.2f} {b:6.2f} {b - a:7.2f}  {name}")
    print(f"{end:7.2f}  end")
    for i in range(0, len(cpu) - 4, 4):
        (t0, c0), (t1, c1) = cpu[i], cpu[i + 4]
        print(f"{t0:5.1f}-{t1:5.1f} s: {(c1 - c0) / (t1 - t0):.2f} cores")


if __name__ == "__main__":
    main()
