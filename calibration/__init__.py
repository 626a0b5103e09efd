"""orlik.calibration."""
