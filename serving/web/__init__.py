"""orlik.serving.web."""
