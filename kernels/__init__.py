"""Custom kernels and their pure-torch references (DESIGN.md §6)."""
