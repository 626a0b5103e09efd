"""orlik.training: tokenizer and tiny-model pretraining on orlik.corpus that end at an FP16 checkpoint."""
