"""pixal3d-rt: Pixal3D inference runtime (image -> textured PBR GLB)."""
__version__ = "0.1.0"
