"""Export modes timed on the reference mug (python/pixal3d_rt/reference_shape.py): the decoded-style
closed surface and its PBR voxels at a grid, through `export_glb` in each mode, step by step
(`pixal3d-rt bench --section export_modes`).

    pixal3d-rt bench --section export_modes --section-arg=--grid=256 [--section-arg=--device=cuda]
        [--section-arg=--modes=fast,fast_projected,fast_remesh,upstream] [--section-arg=--texture-size=N] [--out DIR]
    (writes DIR/export_<cpu|gpu>.json)

Variants: fast = the default mode (the decoded surface simplified, texels sampled where they land);
fast_projected = fast + texels re-projected onto the decoded surface (as upstream's bake);
fast_remesh = the remesh at fast's face count and texture; upstream = --export upstream;
fast_torch_simplify / upstream_torch_simplify = those with the torch simplifier on the export's device
(PIXAL3D_TORCH_SIMPLIFY=1, mesh/qem_torch.py; the default on a GPU), fast_cpp_simplify /
upstream_cpp_simplify = fast-simplification (=0); fast_xatlas / upstream_xatlas = xatlas's charts
(PIXAL3D_XATLAS_UV=1) instead of the planar ones; upstream_torch_closest = the nearest-triangle
queries in torch instead of the Triton kernel (PIXAL3D_DISABLE_TRITON_CLOSEST=1).
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from .common import git_commit, gpu_slug

VARIANTS = {
    "fast": {"export": "fast"},
    "fast_projected": {"export": "fast", "project_texels": True},
    "fast_remesh": {"export": "fast", "remesh": True, "double_sided": False},
    "upstream": {"export": "upstream"},
    "fast_torch_simplify": {"export": "fast", "env": {"PIXAL3D_TORCH_SIMPLIFY": "1"}},
    "upstream_torch_simplify": {"export": "upstream", "env": {"PIXAL3D_TORCH_SIMPLIFY": "1"}},
    "fast_cpp_simplify": {"export": "fast", "env": {"PIXAL3D_TORCH_SIMPLIFY": "0"}},
    "fast_xatlas": {"export": "fast", "env": {"PIXAL3D_XATLAS_UV": "1"}},
    "upstream_xatlas": {"export": "upstream", "env": {"PIXAL3D_XATLAS_UV": "1"}},
    "upstream_torch_closest": {"export": "upstream", "env": {"PIXAL3D_DISABLE_TRITON_CLOSEST": "1"}},
    "upstream_cpp_simplify": {"export": "upstream", "env": {"PIXAL3D_TORCH_SIMPLIFY": "0"}},
}


def main(argv=None):
    from pixal3d_rt.mesh.glb import export_glb
    from pixal3d_rt.mesh.modes import export_settings
    from pixal3d_rt.reference_shape import ReferenceStructure

    ap = argparse.ArgumentParser(prog="pixal3d-rt bench --section export_modes")
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="fast,fast_projected,fast_remesh,upstream")
    ap.add_argument("--texture-size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default="bench-out", help="folder of the result file")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("export_modes --device cuda: no CUDA GPU is visible")
    out = Path(a.out) / f"export_{gpu_slug() if dev.type == 'cuda' else 'cpu'}.json"
    t = time.perf_counter()
    rs = ReferenceStructure()
    v, f = rs.surface_mesh(a.grid, device=dev)
    coords = rs.voxels(a.grid, device=dev).long()
    c = (coords.float() + 0.5) / a.grid - 0.5
    attrs = torch.cat([0.5 + 0.5 * torch.sin(9 * c + torch.tensor([0, 1.0, 2.0], device=dev)),
                       0.3 + 0.2 * torch.cos(7 * c[:, :1]), 0.6 + 0.3 * torch.sin(5 * c[:, 1:2]),
                       torch.ones(len(c), 1, device=dev)], 1)
    setup = time.perf_counter() - t
    print(f"grid {a.grid}: {len(f):,} faces, {len(coords):,} voxels (setup {setup:.1f}s)", flush=True)
    commit = git_commit()["commit"]  # PIXAL3D_COMMIT on the GPU machine's copy of the tree
    res = {"grid": a.grid, "device": str(dev), "faces_in": int(len(f)), "voxels": int(len(coords)),
           "torch": torch.__version__, "host": platform.node(), "commit": commit,
           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
           "cpu_threads": torch.get_num_threads(), "runs": {}}
    defaults = {"texture_size": 2048, "decimation_target": 200_000, "device": dev if dev.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.modes.split(","):
            kw = dict(VARIANTS[name])
            env = kw.pop("env", {})
            args = export_settings(kw.pop("export"), defaults, texture_size=a.texture_size, **kw)
            for rep in range(a.repeat):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    t = time.perf_counter()
                    stats = export_glb(Path(tmp) / f"{name}.glb", v, f, coords, attrs, a.grid, **args)
                    total = time.perf_counter() - t
                finally:
                    for k, old in saved.items():
                        if old is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = old
                row = {"seconds": round(total, 3), "faces": stats["faces"], "closed": stats["closed"],
                       "double_sided": stats["double_sided"], "coverage": round(stats["coverage"], 4),
                       "charts": stats.get("charts"), "texels_per_voxel": round(stats.get("texels_per_voxel", 0.0), 3),
                       "texture_size": stats["texture_size"], "bytes": stats["bytes"],
                       "remesh": stats.get("remesh"), "projected": stats.get("projected"),
                       "steps": {k: round(x, 3) for k, x in stats["timings"].items()},
                       "settings": {k: str(x) for k, x in args.items()}}
                if dev.type == "cuda":
                    row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                print(name, json.dumps(row), flush=True)
                res["runs"][name if a.repeat == 1 else f"{name}#{rep}"] = row
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(res, indent=1))  # after every run: a later failure keeps it


if __name__ == "__main__":
    main()
