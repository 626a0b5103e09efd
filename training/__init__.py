"""orlik.training: corpus, tokenizer and tiny-model pretraining that end at an FP16 checkpoint."""
