"""Optimizers: Adam and AdamW."""
