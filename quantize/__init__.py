"""orlik.quantize."""
