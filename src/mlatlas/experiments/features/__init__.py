"""Experiments of the features field."""
