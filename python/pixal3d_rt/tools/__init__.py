"""Developer tools (golden parity checker)."""
