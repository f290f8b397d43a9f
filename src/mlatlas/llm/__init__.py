"""Language models and their training: LLaMA, packing, gradient checkpointing."""
