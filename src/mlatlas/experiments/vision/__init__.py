"""Experiments of the vision field."""
