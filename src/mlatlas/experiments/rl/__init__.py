"""Experiments of the rl field."""
