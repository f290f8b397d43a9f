"""Experiments of the alignment field."""
