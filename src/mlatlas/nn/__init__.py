"""Layers shared by several fields (activations, feed-forward blocks)."""
