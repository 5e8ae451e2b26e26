"""UV unwrapping: clusters of faces that are height fields over an axis, charts from them, one packing.

Faces are grouped by their dominant normal direction (±x, ±y, ±z: every cluster lies inside a 55°
cone, so it is a height field over its axis) and by a spatial cell sized for about `cluster_size`
faces, cells halved where a cluster is still much larger (`cluster_faces`, on the export's device).

Two ways to chart and pack them:
- "planar" (the default): every connected piece of a cluster is projected onto its axis plane (a
  height field has no fold, so no triangle flips; stretch at most 1/cos 55° = 1.73 across the
  slope) and the chart rectangles are shelf-packed at one texel density found by bisection. All
  in torch on the export's device plus a short loop over shelves.
- "xatlas" (PIXAL3D_XATLAS_UV=1): upstream's unwrapper. As CuMesh does upstream, every cluster goes
  to one xatlas atlas as a separate mesh, so xatlas computes its (lower-stretch) charts per cluster on
  its threads and packs them all together; its chart growing is superlinear in the faces of a mesh,
  hence the clusters. Seconds where the planar charts take a fraction of one.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import env_flag

XATLAS_UV_ENV = "PIXAL3D_XATLAS_UV"


def _cluster_faces_t(v, f, target_faces: int, max_levels: int):
    """`cluster_faces` on torch tensors: (label [F] int64 ids 0..K-1, direction [F] int64 in 0..5 =
    2 * axis + (normal along +axis))."""
    import torch

    tri = v.double()[f]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = 0.5 * normal.norm(dim=1)
    axis = normal.abs().argmax(dim=1)
    direction = axis * 2 + (normal.gather(1, axis[:, None])[:, 0] > 0).long()
    centre = tri.mean(dim=1)
    lo = centre.min(dim=0).values
    extent = max(float((centre.max(dim=0).values - lo).max()), 1e-9)
    # a cell of side c cuts about c^2 / (mean face area) faces out of a surface
    mean_area = max(float(area.sum()) / max(f.shape[0], 1), 1e-18)
    cell = min(float(np.sqrt(target_faces * mean_area)), extent)
    label = torch.zeros(f.shape[0], dtype=torch.int64, device=f.device)
    active = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
    next_id = 0
    for level in range(max_levels + 1):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        n_cells = int(np.ceil(extent / cell)) + 1
        g = ((centre[idx] - lo) / cell).floor().long().clamp(0, n_cells - 1)
        key = ((direction[idx] * n_cells + g[:, 0]) * n_cells + g[:, 1]) * n_cells + g[:, 2]
        _, local, counts = torch.unique(key, return_inverse=True, return_counts=True)
        label[idx] = next_id + local
        next_id += int(counts.numel())
        active[:] = False
        if level < max_levels:
            active[idx[counts[local] > 4 * target_faces]] = True
        cell /= 2.0
    return torch.unique(label, return_inverse=True)[1], direction


def cluster_faces(vertices, faces, target_faces: int = 1000, max_levels: int = 8, *, device=None) -> np.ndarray:
    """Label every face with a cluster id (int64 [F], ids 0..K-1): same dominant normal direction and
    same spatial cell; cells are refined (halved) for clusters above 4 * target_faces."""
    import torch

    v = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=device)
    f = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=device)
    return _cluster_faces_t(v, f, target_faces, max_levels)[0].cpu().numpy()


def vertex_components(faces, n_vertices: int):
    """Component label of every vertex (the smallest vertex id of its component) over faces sharing
    vertices: min-label propagation with pointer jumping, in torch."""
    import torch

    lab = torch.arange(n_vertices, device=faces.device)
    flat = faces.reshape(-1)
    while True:
        corner = lab[faces]
        face_min = torch.minimum(torch.minimum(corner[:, 0], corner[:, 1]), corner[:, 2]).repeat_interleave(3)
        new = lab.scatter_reduce(0, flat, face_min, reduce="amin")
        new = new[new]  # jump: a label points at a vertex whose own label may be smaller still
        if torch.equal(new, lab):
            return lab
        lab = new


def _shelf_pack(widths: np.ndarray, heights: np.ndarray, size: int) -> Optional[np.ndarray]:
    """Rectangles (integer texels, sorted by height, tallest first) in rows across a size x size
    square: their corners [n,2] (x, y), or None if they do not fit."""
    corners = np.zeros((len(widths), 2), dtype=np.int64)
    if (widths > size).any():
        return None
    ends = np.cumsum(widths)
    start, y = 0, 0
    while start < len(widths):
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + size, side="right"))  # rectangles that fit in this row
        if y + heights[start] > size:
            return None
        corners[start:stop, 0] = ends[start:stop] - widths[start:stop] - base
        corners[start:stop, 1] = y
        y += int(heights[start])
        start = stop
    return corners


def _planar_unwrap(v, f, texture_size: int, padding: int, cluster_size: int):
    """The "planar" unwrap on torch tensors v [V,3], f [F,3]: (vmapping, faces, uvs) as `uv_unwrap`."""
    import torch

    label, direction = _cluster_faces_t(v, f, cluster_size, 8)
    n_v = v.shape[0]
    # every cluster its own copy of its vertices: the seams between clusters
    keys, split = torch.unique((label[:, None] * n_v + f).reshape(-1), return_inverse=True)
    vmap = keys % n_v
    split = split.reshape(-1, 3)
    vert_dir = torch.empty(keys.shape[0], dtype=torch.int64, device=v.device)
    vert_dir[split.reshape(-1)] = direction.repeat_interleave(3)  # a cluster has one direction
    axis, positive = vert_dir // 2, (vert_dir % 2) == 1
    p = v.double()[vmap]
    rows = torch.arange(p.shape[0], device=v.device)
    # onto the plane across the axis, mirrored for -axis so that every chart keeps its winding
    uv = torch.stack([p[rows, (axis + 1) % 3] * torch.where(positive, 1.0, -1.0), p[rows, (axis + 2) % 3]], 1)
    chart = torch.unique(vertex_components(split, keys.shape[0]), return_inverse=True)[1]
    n_charts = int(chart.max()) + 1
    lo = torch.full((n_charts, 2), float("inf"), dtype=torch.float64, device=v.device)
    hi = torch.full((n_charts, 2), float("-inf"), dtype=torch.float64, device=v.device)
    lo = lo.scatter_reduce(0, chart[:, None].expand(-1, 2), uv, reduce="amin")
    hi = hi.scatter_reduce(0, chart[:, None].expand(-1, 2), uv, reduce="amax")
    extent = (hi - lo).clamp_min(1e-12).cpu().numpy()
    turned = extent[:, 1] > extent[:, 0]  # lie every chart on its long side: lower rows pack tighter
    extent[turned] = extent[turned][:, ::-1]
    order = np.argsort(-extent[:, 1], kind="stable")

    def pack(scale, pad):
        w = np.ceil(extent[order, 0] * scale).astype(np.int64) + 1 + 2 * pad
        h = np.ceil(extent[order, 1] * scale).astype(np.int64) + 1 + 2 * pad
        return _shelf_pack(w, h, texture_size)

    for pad in sorted({int(padding), 0}, reverse=True):
        if pack(0.0, pad) is not None:
            break
    else:
        raise ValueError(f"{n_charts:,} UV charts do not fit a {texture_size}² texture: give a larger --texture-size")
    # the densest scale that fits, by bisection (the charts cannot cover more than the whole square)
    good, bad = 0.0, float(np.sqrt(texture_size ** 2 / float((extent[:, 0] * extent[:, 1]).sum())))
    if pack(bad, pad) is not None:
        good = bad
    for _ in range(24):
        if bad - good <= 1e-4 * bad:
            break
        mid = 0.5 * (good + bad)
        good, bad = (mid, bad) if pack(mid, pad) is not None else (good, mid)
    corners = np.empty((n_charts, 2), dtype=np.int64)
    corners[order] = pack(good, pad)
    dev = v.device
    turned_t, corner_t = torch.from_numpy(turned).to(dev), torch.from_numpy(corners).to(dev).double()
    local = (uv - lo[chart]) * good
    # a quarter turn, not a transpose: the winding stays that of every other chart
    quarter = torch.stack([local[:, 1], (hi - lo)[chart][:, 0] * good - local[:, 0]], 1)
    local = torch.where(turned_t[chart][:, None], quarter, local)
    texel = local + corner_t[chart] + pad + 0.5
    return vmap, split, (texel / texture_size).float()


def uv_unwrap(vertices: np.ndarray, faces: np.ndarray, *, texture_size: int = 2048, padding: int = 2,
              cluster_size: int = 1000, method: Optional[str] = None, device=None,
              max_chart_iterations: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unwrap a triangle mesh into one texture atlas.

    vertices [V,3] float, faces [F,3] int (F >= 1); method "planar" or "xatlas" (default: planar,
    xatlas with PIXAL3D_XATLAS_UV=1); device: torch device of the clustering (and of the planar charts).
    Returns (vmapping [V'] int64: source vertex of every output vertex (vertices are split along chart
    seams), faces [F,3] int64 into the output vertices (the same triangles; xatlas: in cluster order),
    uvs [V',2] float32 in [0,1]: u = column / atlas width, v = row / atlas height counted from the first
    (top) image row, i.e. glTF's TEXCOORD convention).
    """
    import torch

    method = method or ("xatlas" if env_flag(XATLAS_UV_ENV) else "planar")
    if method not in ("planar", "xatlas"):
        raise ValueError(f"method must be 'planar' or 'xatlas', got {method!r}")
    if method == "planar":
        v = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=device)
        f = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=device)
        vmap, f_uv, uvs = _planar_unwrap(v, f, int(texture_size), int(padding), int(cluster_size))
        return vmap.cpu().numpy(), f_uv.cpu().numpy(), uvs.cpu().numpy()
    import xatlas

    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    label = cluster_faces(vertices, faces, cluster_size, device=device)
    order = np.argsort(label, kind="stable")
    bounds = np.flatnonzero(np.diff(label[order])) + 1
    groups = np.split(order, bounds)

    def build(pack_options):
        atlas = xatlas.Atlas()
        cluster_vertices = []
        for g in groups:
            used, local = np.unique(faces[g], return_inverse=True)
            cluster_vertices.append(used)
            atlas.add_mesh(np.ascontiguousarray(vertices[used]), local.reshape(-1, 3).astype(np.uint32))
        chart = xatlas.ChartOptions()
        chart.max_iterations = max_chart_iterations
        atlas.generate(chart, pack_options)
        return atlas, cluster_vertices

    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas, cluster_vertices = build(pack)
    if atlas.atlas_count != 1:
        # the texel density xatlas estimated from `resolution` spilled into several atlases: repack sparser
        pack.texels_per_unit = float(atlas.texels_per_unit) / np.sqrt(atlas.atlas_count * 1.15)
        atlas, cluster_vertices = build(pack)
        if atlas.atlas_count != 1:
            raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected 1")

    vmaps, out_faces, uvs, offset = [], [], [], 0
    for i, used in enumerate(cluster_vertices):
        vm, f, uv = atlas[i]
        vmaps.append(used[vm.astype(np.int64)])
        out_faces.append(f.astype(np.int64) + offset)
        uvs.append(uv)
        offset += len(vm)
    out_faces = np.concatenate(out_faces)
    if len(out_faces) != len(faces):
        raise RuntimeError(f"xatlas returned {len(out_faces)} faces for {len(faces)} input faces")
    return np.concatenate(vmaps), out_faces, np.concatenate(uvs).astype(np.float32)
