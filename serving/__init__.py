"""orlik.serving."""
