"""Data preparation before training: cleaning, Polish PII anonymization, stylometric quality scoring."""
