"""Shared helpers of the scripts kept in benchmarks/ (export, engine and mesh checks; the measurements
of the pipeline and its kernels are sections of `pixal3d-rt bench`): the package from this checkout,
the environment record, results written to `benchmarks/results/<name>.json` and, when `$OUT` is set
(the lent GPU machine), a copy under `$OUT` so that it comes back from the run.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# setup.py maps these folders into the one package `pixal3d_rt` (DESIGN.md §2)
_PACKAGE_ROOTS = {
    "pixal3d_rt": REPO / "python" / "pixal3d_rt",
    "pixal3d_rt.runtime": REPO / "runtime",
    "pixal3d_rt.kernels": REPO / "kernels",
    "pixal3d_rt.export": REPO / "export",
}


def ensure_package() -> None:
    """Make `import pixal3d_rt` work from this checkout even where it is not pip-installed.

    An installed package is used as is; otherwise the folders are mapped into the package the way
    setup.py maps them, by loading each root's `__init__.py` under its package name.
    """
    try:
        importlib.import_module("pixal3d_rt")
        return
    except ImportError:
        pass
    for name, root in _PACKAGE_ROOTS.items():
        init = root / "__init__.py"
        if name in sys.modules or not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)


ensure_package()

from pixal3d_rt.bench_sections.common import default_schema_dir, environment, load_config  # noqa: E402,F401


def write_result(name: str, data: dict) -> list[Path]:
    """Write `benchmarks/results/<name>.json` (and `$OUT/<name>.json` when `$OUT` is set)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    paths = [RESULTS / f"{name}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"{name}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths


def reference_surface(grid: int, cache: str | None = None):
    """The reference mug's surface at `grid`, cleaned as the export cleans it: (vertices, faces) numpy
    arrays, read from / written to the npz `cache` when given (building it takes minutes at 1024)."""
    import numpy as np

    from pixal3d_rt.mesh import glb
    from pixal3d_rt.reference_shape import ReferenceStructure

    if cache and Path(cache).exists():
        d = np.load(cache)
        return d["v"], d["f"]
    v, f = glb.clean_mesh(*ReferenceStructure().surface_mesh(grid))
    if cache:
        np.savez(cache, v=v, f=f)
    return v, f
