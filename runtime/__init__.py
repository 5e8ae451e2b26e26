"""Execution backends, memory planner and stage scheduler (DESIGN.md §4-5)."""
