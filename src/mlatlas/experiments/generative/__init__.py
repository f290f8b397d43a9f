"""Experiments of the generative field."""
