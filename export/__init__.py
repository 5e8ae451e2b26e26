"""Per-network export specs, ONNX export and engine builds (DESIGN.md §4)."""
