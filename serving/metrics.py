"""Prometheus metrics in the text exposition format: requests, tokens, queue depth, latency.

Kept dependency-free: a few counters and histograms guarded by one lock, rendered on GET /metrics.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.n += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)
        self.gauges: dict[str, Callable[[], dict[tuple[tuple[str, str], ...], float]]] = {}

    def request(self, endpoint: str, model: str, status: int) -> None:
        with self._lock:
            self.requests[(("endpoint", endpoint), ("model", model), ("status", str(status)))] += 1

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.completion_tokens[model] += completion

    def timing(self, model: str, latency: float, ttft: float | None) -> None:
        with self._lock:
            self.latency[model].observe(latency)
            if ttft is not None:
                self.ttft[model].observe(ttft)

    def gauge(self, name: str, read: Callable[[], dict[tuple[tuple[str, str], ...], float]]) -> None:
        """A value read at scrape time (queue depth, running requests, loaded models)."""
        self.gauges[name] = read

    def render(self) -> str:
        out: list[str] = []

        def head(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("orlik_requests_total", "counter", "HTTP requests by endpoint, model and status code.")
            for labels, v in sorted(self.requests.items()):
                out.append(f"orlik_requests_total{_labels(labels)} {v}")
            for name, table, what in (("orlik_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                                      ("orlik_completion_tokens_total", self.completion_tokens, "Tokens generated.")):  # fmt: skip
                head(name, "counter", what)
                for model, v in sorted(table.items()):
                    out.append(f"{name}{_labels((('model', model),))} {v}")
            for name, hists, what in (
                ("orlik_request_latency_seconds", self.latency, "Time from request to last byte."),
                ("orlik_time_to_first_token_seconds", self.ttft, "Time from request to the first token."),
            ):
                head(name, "histogram", what)
                for model, h in sorted(hists.items()):
                    for b, c in zip(h.buckets, h.counts, strict=True):
                        out.append(f"{name}_bucket{_labels((('model', model), ('le', f'{b:g}')))} {c}")
                    out.append(f"{name}_bucket{_labels((('model', model), ('le', '+Inf')))} {h.n}")
                    out.append(f"{name}_sum{_labels((('model', model),))} {h.sum:.6f}")
                    out.append(f"{name}_count{_labels((('model', model),))} {h.n}")
        for name, read in sorted(self.gauges.items()):
            head(name, "gauge", name.replace("orlik_", "").replace("_", " ") + ".")
            for labels, v in sorted(read().items()):
                out.append(f"{name}{_labels(labels)} {v:g}")
        return "\n".join(out) + "\n"
