"""Helpers of the engine-directory tests (TensorRT engines and AOTInductor packages alike)."""
import json
import shutil
from pathlib import Path


def one_network_copy(src: Path, dst: Path, name: str, file: str) -> Path:
    """A private copy of engine directory `src` at `dst` holding network `name` (its `file`) only."""
    dst.mkdir()
    shutil.copy(src / file, dst / file)
    m = json.loads((src / "manifest.json").read_text())
    m["networks"] = {name: m["networks"][name]}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))
