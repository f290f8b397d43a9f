"""Experiments of the peft field."""
