"""Parameter-efficient fine-tuning: LoRA, prefix tuning and bottleneck adapters."""
