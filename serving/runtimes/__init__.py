"""orlik.serving.runtimes."""
