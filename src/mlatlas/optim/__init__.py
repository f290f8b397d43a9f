"""Optimizers: Adam (L2 in the gradient) and AdamW (decoupled weight decay)."""

from mlatlas.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
