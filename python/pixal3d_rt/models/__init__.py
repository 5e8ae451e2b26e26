"""Reference networks: one plain-PyTorch definition of every Pixal3D network."""
