"""Experiments of the llm field."""
