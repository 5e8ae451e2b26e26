"""Where the tests read the golden parity fixtures: tests/golden, the copy of the project's shared
golden set that travels with the tests (golden/README.md), or the directory PIXAL3D_GOLDEN names."""
import os
from pathlib import Path

import pytest

REPO_GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN = Path(os.environ.get("PIXAL3D_GOLDEN") or REPO_GOLDEN).resolve()


def golden(*parts: str) -> Path:
    """A file of the fixture set. Missing fails rather than skips: the fixtures ship with the tests,
    so a run without them would silently stop checking parity."""
    path = GOLDEN.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"golden file {path} is missing (PIXAL3D_GOLDEN={os.environ.get('PIXAL3D_GOLDEN')!r})")
    return path
