"""Mesh extraction and GLB export."""
