"""The golden fixtures in tests/golden: complete, and identical to the source CI points PIXAL3D_GOLDEN at."""
import filecmp
import os

import pytest

from golden_fixtures import GOLDEN, REPO_GOLDEN


def _files(root):
    """Every file under root, relative; the top-level README is each copy's own."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"README.md"}


def test_repository_copy_is_complete():
    files = _files(REPO_GOLDEN)
    meta = {f.removesuffix(".json") for f in files if "/" not in f and f.endswith(".json")}
    data = {f.removesuffix(".safetensors") for f in files if "/" not in f and f.endswith(".safetensors")}
    assert meta, f"no fixtures in {REPO_GOLDEN}"
    assert meta == data, "every fixture is a .json + .safetensors pair"
    assert any(f.startswith("schema/") for f in files)
    assert (REPO_GOLDEN / "README.md").is_file()


@pytest.mark.skipif(GOLDEN == REPO_GOLDEN, reason="PIXAL3D_GOLDEN does not name another copy to compare with")
def test_repository_copy_equals_the_source():
    assert GOLDEN.is_dir(), f"PIXAL3D_GOLDEN={os.environ.get('PIXAL3D_GOLDEN')!r} is not a directory"
    src, repo = _files(GOLDEN), _files(REPO_GOLDEN)
    assert src == repo, f"only in {GOLDEN}: {sorted(src - repo)}; only in tests/golden: {sorted(repo - src)}"
    differ = [f for f in sorted(src) if not filecmp.cmp(GOLDEN / f, REPO_GOLDEN / f, shallow=False)]
    assert not differ, f"tests/golden differs from {GOLDEN} in {differ}: copy the source again"
