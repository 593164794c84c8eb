"""Functional core: sampling, gathering and attention math (no parameters)."""
