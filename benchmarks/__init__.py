"""orlik.benchmarks."""
