"""Embedded data: generated or shipped inside installed packages, never downloaded."""
