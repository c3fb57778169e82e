"""Training: full or LoRA fine-tuning of keyed, plain and volumized models with checkpoints every epoch,
exact resume, DDP and the orthogonality regularizer (:mod:`.loop`), and curriculum batch ordering
(:mod:`.curriculum`)."""
