"""Standalone measurement scripts, run as `python -m orlik.benchmarks.scripts.<name>`: each records a
figure in docs/benchmarks.md (speed, memory, parity with llama.cpp). None is imported by the library
or the tests; their timings depend on the machine."""
