"""UV unwrapping of the reference mug's simplified surface: the export's unwrap (python/pixal3d_rt/mesh/uv.py:
clusters handed to one xatlas atlas as separate meshes, charts computed per cluster on xatlas's own
threads, packed once) against charts computed per cluster in worker processes and packed once
afterwards (xatlas repack of the precomputed charts).

    python benchmarks/bench_uv_clusters.py --grid 512 --faces 200000 --texture-size 2048 [--workers N]
        [--out benchmarks/results/uv_clusters_cpu.json]

Per variant: wall seconds, CPU seconds (this process; the workers' own), charts, texel coverage at the
texture size (rasterised), texel density (texels per unit length), and a check that no texel centre
lies in two charts. Also measured: the CPU time xatlas's own threads spend in one generate (per thread, from /proc), and
whether the binding releases the GIL (a Python thread counting during a second generate).
"""
import argparse
import json
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch


def clusters(v, f):
    from pixal3d_rt.mesh.uv import cluster_faces

    label = cluster_faces(v, f, 1000)
    order = np.argsort(label, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(label[order])) + 1)


def pack_options(resolution=0, texels_per_unit=0.0, padding=2):
    import xatlas

    po = xatlas.PackOptions()
    po.resolution, po.texels_per_unit, po.padding, po.bilinear = resolution, texels_per_unit, padding, True
    return po


def chart_options():
    import xatlas

    co = xatlas.ChartOptions()
    co.max_iterations = 0
    return co


def worker_charts(meshes, texels_per_unit):
    """One worker: its clusters as meshes of one atlas at a fixed texel density (so every worker's
    charts share one scale), charts and a local pack; returns per cluster (vmapping, faces, uv in
    units of length) and the CPU seconds spent."""
    import xatlas

    c0 = time.process_time()
    atlas = xatlas.Atlas()
    for pos, idx in meshes:
        atlas.add_mesh(pos, idx)
    atlas.generate(chart_options(), pack_options(0, texels_per_unit))
    scale = np.array([atlas.width, atlas.height], np.float32) / texels_per_unit
    out = [(vm, fi, uvs * scale) for vm, fi, uvs in (atlas[i] for i in range(len(meshes)))]
    return out, time.process_time() - c0


def unwrap_per_cluster_pool(v, f, texture_size, workers, pool):
    """Charts per cluster in `workers` processes, then one xatlas pack of all of them."""
    import xatlas

    groups = clusters(v, f)
    meshes, used_of = [], []
    for g in groups:
        used, local = np.unique(f[g], return_inverse=True)
        used_of.append(used)
        meshes.append((np.ascontiguousarray(v[used]), local.reshape(-1, 3).astype(np.uint32)))
    tri = v[f].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    tpu = texture_size * np.sqrt(0.8 / area)  # about the density of the final atlas; only the scale matters
    shares = [list(range(k, len(meshes), workers)) for k in range(workers)]
    t = time.perf_counter()
    futures = [pool.submit(worker_charts, [meshes[i] for i in s], tpu) for s in shares]
    results = [fu.result() for fu in futures]
    t_charts = time.perf_counter() - t
    per_cluster = [None] * len(meshes)
    for s, (out, _) in zip(shares, results):
        for i, r in zip(s, out):
            per_cluster[i] = r
    t = time.perf_counter()
    atlas = xatlas.Atlas()
    for vm, fi, uvs in per_cluster:
        atlas.add_uv_mesh(np.ascontiguousarray(uvs, dtype=np.float32), fi.astype(np.uint32))
    atlas.generate(chart_options(), pack_options(texture_size))
    t_pack = time.perf_counter() - t
    vmaps, faces, uvs, offset = [], [], [], 0
    for i, (vm, fi, _) in enumerate(per_cluster):
        vm_final, fo, uo = atlas[i]  # into the charts' vertices, which map into the cluster's
        vmaps.append(used_of[i][vm.astype(np.int64)[vm_final.astype(np.int64)]])
        faces.append(fo.astype(np.int64) + offset)
        uvs.append(uo)
        offset += len(uo)
    return (np.concatenate(vmaps), np.concatenate(faces), np.concatenate(uvs).astype(np.float32),
            {"charts_s": round(t_charts, 3), "pack_s": round(t_pack, 3), "atlases": atlas.atlas_count,
             "worker_cpu_s": [round(c, 3) for _, c in results]})


def quality(v, f, vmap, fu, uvs, texture_size):
    from pixal3d_rt.mesh.bake import rasterize_uv
    from pixal3d_rt.mesh.glb import count_charts

    fid, _ = rasterize_uv(torch.from_numpy(uvs), torch.from_numpy(fu), texture_size)
    covered = int((fid >= 0).sum())
    tri = v[f].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    return {"charts": count_charts(fu, len(vmap)), "coverage": round(covered / texture_size ** 2, 4),
            "texel_density": round(float(np.sqrt(covered / area)), 1),
            "uv_in_unit_square": bool(uvs.min() >= 0 and uvs.max() <= 1),
            "texels_in_two_charts": texels_in_two_charts(fu, uvs, len(vmap), 512)}


def texels_in_two_charts(fu, uvs, n_vertices, res):
    """Texel centres of a res x res grid that lie inside triangles of two different charts."""
    from pixal3d_rt.mesh.simplify import _union_labels

    lab = _union_labels(n_vertices, np.repeat(fu[:, 0], 2), fu[:, 1:].reshape(-1))  # charts share no vertex
    chart = lab[fu[:, 0]]
    tri = uvs[fu].astype(np.float64) * res
    lo = np.clip(np.floor(tri.min(axis=1) - 0.5), 0, res - 1).astype(np.int64)
    hi = np.clip(np.ceil(tri.max(axis=1) - 0.5), 0, res - 1).astype(np.int64)
    nx, ny = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    n = nx * ny
    t = np.repeat(np.arange(len(fu)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    x, y = lo[t, 0] + k % nx[t], lo[t, 1] + k // nx[t]
    p = np.stack([x + 0.5, y + 0.5], 1)
    a, b, c = tri[t, 0], tri[t, 1], tri[t, 2]

    def cross(o, d, q):
        return (d[:, 0] - o[:, 0]) * (q[:, 1] - o[:, 1]) - (d[:, 1] - o[:, 1]) * (q[:, 0] - o[:, 0])

    d1, d2, d3 = cross(a, b, p), cross(b, c, p), cross(c, a, p)
    inside = ((d1 > 0) & (d2 > 0) & (d3 > 0)) | ((d1 < 0) & (d2 < 0) & (d3 < 0))
    texel = (y * res + x)[inside]
    pairs = np.unique(np.stack([texel, chart[t[inside]]], 1), axis=0)
    return int((np.bincount(pairs[:, 0]) > 1).sum())


def _thread_cpu() -> dict:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            st = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[tid] = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return out


def xatlas_threads_and_gil(v, f, texture_size):
    """One xatlas generate of the export's clusters: CPU seconds each thread spent in it (sampled from
    /proc while it runs; xatlas's worker threads exist only meanwhile), then, in a second generate, the
    iterations a counting Python thread managed meanwhile (near zero: the binding holds the GIL)."""
    import xatlas

    def build():
        atlas = xatlas.Atlas()
        for g in clusters(v, f):
            used, local = np.unique(f[g], return_inverse=True)
            atlas.add_mesh(np.ascontiguousarray(v[used]), local.reshape(-1, 3).astype(np.uint32))
        return atlas

    atlas = build()
    me = str(threading.get_native_id())
    base = _thread_cpu()
    seen, done = {}, [False]

    def sample():
        while not done[0]:
            seen.update(_thread_cpu())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sampler_id = None
    while sampler_id is None:
        sampler_id = str(sampler.native_id) if sampler.native_id else None
    t = time.perf_counter()
    atlas.generate(chart_options(), pack_options(texture_size))
    wall = time.perf_counter() - t
    seen.update(_thread_cpu())
    done[0] = True
    sampler.join()
    spent = {tid: c - base.get(tid, 0.0) for tid, c in seen.items() if tid != sampler_id}
    main_s = round(spent.pop(me, 0.0), 2)
    others = sorted((round(c, 2) for c in spent.values() if c > 0.01), reverse=True)

    atlas = build()
    ticks, stop = [0], [False]

    def count():
        while not stop[0]:
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.2)
    c0 = ticks[0]
    t = time.perf_counter()
    atlas.generate(chart_options(), pack_options(texture_size))
    gil_wall = time.perf_counter() - t
    during = ticks[0] - c0
    time.sleep(0.2)
    after = ticks[0] - c0 - during
    stop[0] = True
    counter.join()
    return {"wall_s": round(wall, 3), "main_thread_cpu_s": main_s, "xatlas_thread_cpu_s": others,
            "counter_iterations_during_generate": during, "counter_generate_wall_s": round(gil_wall, 3),
            "counter_iterations_in_0.2s_after": after}


def main():
    from pixal3d_rt.mesh import glb, simplify, uv
    from common import reference_surface

    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=512)
    ap.add_argument("--faces", type=int, default=200_000)
    ap.add_argument("--texture-size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cache", default=None, help="npz of the cleaned surface (written if missing)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    workers = a.workers or simplify.usable_cores()
    v, f = reference_surface(a.grid, a.cache)
    v, f, _ = glb.prepare_mesh(v, f, decimation_target=a.faces)
    print(f"grid {a.grid}: {len(f):,} faces after prepare_mesh", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    res = {"grid": a.grid, "faces": int(len(f)), "texture_size": a.texture_size,
           "usable_cores": simplify.usable_cores(), "workers": workers, "host": platform.node(), "commit": commit,
           "xatlas_one_generate": xatlas_threads_and_gil(v, f, a.texture_size), "runs": []}
    print(json.dumps(res["xatlas_one_generate"]), flush=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(int, range(workers)))  # start the workers before timing
        for rep in range(a.repeat):
            for variant in ("export_unwrap", "per_cluster_pool"):
                load = os.getloadavg()[0]
                c0 = time.process_time()
                t = time.perf_counter()
                extra = {}
                if variant == "export_unwrap":
                    vmap, fu, uvs = uv.uv_unwrap(v, f, texture_size=a.texture_size)
                else:
                    vmap, fu, uvs, extra = unwrap_per_cluster_pool(v, f, a.texture_size, workers, pool)
                row = {"variant": variant, "repeat": rep, "seconds": round(time.perf_counter() - t, 3),
                       "cpu_seconds_self": round(time.process_time() - c0, 3), "load_avg_1min_before": round(load, 2),
                       **extra, **quality(v, f, vmap, fu, uvs, a.texture_size)}
                print(json.dumps(row), flush=True)
                res["runs"].append(row)
                if a.out:
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
