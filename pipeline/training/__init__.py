"""Training: the method-agnostic trainer, its optimiser and schedule, and pre-training."""
