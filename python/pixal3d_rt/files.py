"""File helpers shared by the weights code, the engine runner and the engine builder (one definition each)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, progress=None) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks; `progress(n)` is told the size of each chunk read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
            if progress is not None:
                progress(len(b))
    return h.hexdigest()
