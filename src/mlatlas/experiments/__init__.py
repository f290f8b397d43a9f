"""Experiments: one module per catalog row, ``<field>/<id with _>.py``."""
