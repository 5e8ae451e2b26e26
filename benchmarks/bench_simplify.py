"""Quadric decimation of the reference mug's decoded-style surface (python/pixal3d_rt/reference_shape.py):
one process vs the parallel parts (python/pixal3d_rt/mesh/simplify.py), plus the plain library call the
export used before (no repair), with the topology and distance checks the export relies on.

    python benchmarks/bench_simplify.py --grid 1024 --targets 200000,1000000 [--repeat 2]
        [--workers N] [--pre-decimate N] [--out benchmarks/results/simplify_cpu.json]

Per run: wall seconds, CPU seconds of this process and of each worker (their sum along the critical path
estimates the wall time on an idle machine: the machine may be shared), faces, edges not shared by exactly
two faces, closed (orient_faces), vertices with more than one fan, and distances in voxels between the
output and the input surface, both ways (sampled points, nearest-triangle search within 3 voxels;
"beyond" counts samples farther than that). The load average is recorded: the machine may be shared.
"""
import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch


def edge_fan_report(v, f):
    """(edges with a face count other than 2, vertices whose faces form more than one fan)."""
    from pixal3d_rt.mesh.glb import _edge_table
    from pixal3d_rt.mesh.simplify import _union_labels

    order, start, count, _ = _edge_table(f, len(v))
    bad_edges = int((count != 2).sum())
    two = start[count == 2]
    ea, eb = order[two], order[two + 1]
    fa, fb, ka, kb = ea // 3, eb // 3, ea % 3, eb % 3
    # corners of both faces at both ends of every two-face edge, matched by vertex
    ca = np.concatenate([3 * fa + ka, 3 * fa + (ka + 1) % 3])
    cb_tail, cb_head = 3 * fb + kb, 3 * fb + (kb + 1) % 3
    same = f[fb, kb] == f[fa, ka]
    cb = np.concatenate([np.where(same, cb_tail, cb_head), np.where(same, cb_head, cb_tail)])
    lab = _union_labels(3 * len(f), ca, cb)
    fans = np.bincount(f.reshape(-1)[lab == np.arange(3 * len(f))], minlength=len(v))
    return bad_edges, int((fans > 1).sum())


def sample_surface(v, f, n, rng):
    tri = v[f].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(f), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    return (w[:, :, None] * tri[pick]).sum(1).astype(np.float32)


def distance_voxels(points, v, f, grid, reach=3.0):
    from pixal3d_rt.mesh.project import closest_points

    d, _, _ = closest_points(torch.from_numpy(points), torch.from_numpy(v), torch.from_numpy(f), reach / grid)
    d = d.numpy() * grid
    found = np.isfinite(d)
    return {"max": round(float(d[found].max()), 3) if found.any() else None,
            "p99": round(float(np.quantile(d[found], 0.99)), 3) if found.any() else None,
            "mean": round(float(d[found].mean()), 4) if found.any() else None, "beyond": int((~found).sum())}


def main():
    from pixal3d_rt.mesh import glb, simplify
    from common import reference_surface

    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=1024)
    ap.add_argument("--targets", default="200000,1000000")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--modes", default="library,serial,parallel")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--cache", default=None, help="npz of the cleaned surface (written if missing)")
    ap.add_argument("--pre-decimate", type=int, default=0,
                    help="decimate the surface to this many faces first (one process, repaired): the input of "
                         "the export's second pass")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    workers = a.workers or simplify.usable_cores()
    t = time.perf_counter()
    v, f = reference_surface(a.grid, a.cache)
    if a.pre_decimate:
        v, f = simplify.simplify(v, f, a.pre_decimate, workers=1)
    print(f"grid {a.grid}: {len(f):,} faces ({time.perf_counter() - t:.1f}s)", flush=True)
    rng = np.random.default_rng(0)
    input_samples = sample_surface(v, f, a.samples, rng)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    res = {"grid": a.grid, "pre_decimated": a.pre_decimate or None, "faces_in": int(len(f)),
           "vertices_in": int(len(v)), "usable_cores": simplify.usable_cores(),
           "workers": workers, "host": platform.node(), "commit": commit, "runs": []}
    for target in [int(x) for x in a.targets.split(",")]:
        for rep in range(a.repeat):
            for mode in a.modes.split(","):
                load = os.getloadavg()[0]
                c0 = os.times()
                t = time.perf_counter()
                info = {}
                if mode == "library":  # what glb.simplify_mesh did before: one call, no repair
                    ov, of = simplify._decimate(v, f, target, 7.0, preserve_border=False)
                    ov, of = ov.astype(np.float32), of.astype(np.int64)
                else:
                    ov, of = simplify.simplify(v, f, target, workers=1 if mode == "serial" else workers, info=info)
                wall = time.perf_counter() - t
                c1 = os.times()
                cpu = (c1.user - c0.user) + (c1.system - c0.system)
                bad_edges, multi_fan = edge_fan_report(ov, of)
                _, oinfo = glb.orient_faces(ov, of)
                out_samples = np.concatenate([ov, sample_surface(ov, of, a.samples, rng)])
                worker_cpu = info.get("worker_cpu_s") or [0.0]
                row = {"mode": mode, "target": target, "repeat": rep, "seconds": round(wall, 3),
                       "cpu_seconds_self": round(cpu, 3), "cpu_seconds_workers": info.get("worker_cpu_s"),
                       # the wall time on an otherwise idle machine, about: this process waits while the
                       # workers run (one core each)
                       "critical_path_cpu_s": round(cpu + max(worker_cpu), 3),
                       "load_avg_1min_before": round(load, 2),
                       "faces": int(len(of)), "bad_edges": bad_edges, "multi_fan_vertices": multi_fan,
                       "closed": bool(oinfo["closed"].all()),
                       "components": int(len(np.unique(oinfo["components"]))),
                       "out_to_in_voxels": distance_voxels(out_samples, v, f, a.grid),
                       "in_to_out_voxels": distance_voxels(input_samples, ov, of, a.grid),
                       "stages": {k: (round(x, 3) if isinstance(x, float) else x) for k, x in info.items()}}
                print(json.dumps(row), flush=True)
                res["runs"].append(row)
                if a.out:
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out).write_text(json.dumps(res, indent=1))
    simplify.shutdown_workers()


if __name__ == "__main__":
    main()
