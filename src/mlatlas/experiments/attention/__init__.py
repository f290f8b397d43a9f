"""Experiments of the attention field."""
