"""orlik.quantize.backends."""
