"""Narrow-band dual-contouring remesh (what upstream's `to_glb(remesh=True)` does with CuMesh), in torch.

The new surface is the boundary of the band {x : udf(x) < band * h} around the input mesh, where udf
is the unsigned distance to the input's triangles and h the side of a cell of the remesh grid. The
grid is upstream's: `resolution` cells across the input box enlarged by 3 * band cells
(scale = (resolution + 3 band) / resolution * box size), centred on the box. Every grid corner gets
the value udf - band * h (negative inside the band); every cell with corners of both signs gets one
vertex, the mean of the points where its edges cross zero (linear interpolation); every grid edge that
crosses zero gets a quad of the four cells around it, wound so its normal points out of the band, and
split into two triangles along the diagonal whose halves bend least. `project_back` then moves each
vertex that fraction of the way to its nearest point on the input (upstream's `project_back`;
Pixal3D exports with 0).

Differences from CuMesh, on purpose:
  - the distances come from triangles bucketed on the grid (project.py), not from a BVH, and are
    exact wherever the crossings need them (udf < band * h + h); corners farther out are "outside";
  - every cell next to a negative corner is used, not only cells kept by a coarse-to-fine test of
    cell centres, so no quad loses one of its cells (upstream can leave holes there);
  - the corner signs are made well-composed before contouring: a face of a cell whose two negative
    corners sit on a diagonal (and the cell whose only two negative, or only two positive, corners
    are opposite) is the one configuration where one vertex per cell makes a non-manifold edge or
    vertex; there the positive corner nearest to the band is made negative (the band grows by less
    than a cell), repeated until none is left. Then each cell's negative corners are edge-connected
    and so are its positive ones, its surface piece is one disc, and the output is a closed,
    consistently oriented 2-manifold: every edge in exactly two triangles.

The result is the band's boundary: an input that encloses a volume (thicker than the band) gives an
outer surface and an inner, inward-facing one; an open sheet gives one closed shell around it; the
signed volume is positive.

`remesh_narrow_band_dc` runs on the device of its inputs (CPU: the reference; CUDA: the same torch
code, chunked so the pair buffers stay bounded). Grid neighbours are found by adding key steps to
packed keys, and the big per-corner and per-cell steps go in slices, so its memory beyond the result
stays a small multiple of the band's corner table.
"""
from __future__ import annotations

import math
import time

import torch

from .project import TriangleGrid, closest_points

# corner i of a cell sits at offset (i & 1, (i >> 1) & 1, (i >> 2) & 1); corner 7 - i is opposite
_CORNER8 = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.int64, device="cpu")
# the six faces of a cell, corners in cyclic order
_FACES = torch.tensor([[0, 2, 6, 4], [1, 3, 7, 5], [0, 1, 5, 4], [2, 3, 7, 6], [0, 1, 3, 2], [4, 5, 7, 6]],
                      dtype=torch.int64, device="cpu")
# the twelve edges of a cell: (corner, corner, axis)
_EDGES = torch.tensor([[i, i | (1 << a), a] for a in range(3) for i in range(8) if not (i >> a) & 1],
                      dtype=torch.int64, device="cpu")
# cells around a grid edge along axis a from corner p, in counter-clockwise order seen from +a:
# offsets in the (a+1, a+2) plane, cyclic axes so the order is right-handed for every axis
_RING = torch.tensor([[-1, -1], [0, -1], [0, 0], [-1, 0]], dtype=torch.int64, device="cpu")

_KEY_BITS = 21
_KEY_OFF = 1 << (_KEY_BITS - 1)
# the keys pack the offset coordinates linearly, so key(c + d) = key(c) + key step of d while c + d
# stays within +-2^20: neighbours are found by adding key steps to keys, with no [N*k,3] coordinates
_AXIS_STEP = (1 << (2 * _KEY_BITS), 1 << _KEY_BITS, 1)


def _key(c: torch.Tensor) -> torch.Tensor:
    """64-bit key of integer points [N,3] (each coordinate within +-2^20)."""
    c = c + _KEY_OFF
    return (c[:, 0] << (2 * _KEY_BITS)) | (c[:, 1] << _KEY_BITS) | c[:, 2]


def _unkey(k: torch.Tensor) -> torch.Tensor:
    m = (1 << _KEY_BITS) - 1
    return torch.stack([k >> (2 * _KEY_BITS), (k >> _KEY_BITS) & m, k & m], 1) - _KEY_OFF


def _key_step(d) -> int:
    """Key difference of an integer step d = (dx, dy, dz)."""
    return sum(int(x) * s for x, s in zip(d, _AXIS_STEP))


_CORNER8_STEP = [_key_step(c) for c in _CORNER8.tolist()]


def _find(sorted_keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Index of each key in sorted_keys, -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(k, -1)
    pos = torch.searchsorted(sorted_keys, k).clamp_max_(sorted_keys.numel() - 1)
    return pos.masked_fill_(sorted_keys[pos] != k, -1)


def _dilate(keys: torch.Tensor, steps) -> torch.Tensor:
    """Sorted unique keys of keys + s for s in steps, one axis at a time (steps [(axis, offsets)]):
    the same set as all combinations, with unique over a few times the set instead of its product."""
    for a, offs in steps:
        keys = torch.unique(torch.cat([keys + o * _AXIS_STEP[a] for o in offs]))
    return keys


def _band_corners(grid: TriangleGrid, m: int) -> torch.Tensor:
    """Integer grid corners that may lie within reach of a triangle: every corner of the buckets
    (m corners a side) next to a bucket holding a triangle."""
    dev = grid.keys.device
    buckets = _dilate(_key(grid.occupied_cells()), [(a, (-1, 0, 1)) for a in range(3)])
    steps = torch.tensor([_key_step((i, j, k)) for i in range(m) for j in range(m) for k in range(m)], device=dev)
    # the buckets' blocks of corners are disjoint: the unique only sorts
    return torch.unique((_key(_unkey(buckets) * m)[:, None] + steps).reshape(-1))


def _insert(ck: torch.Tensor, cv: torch.Tensor, new: torch.Tensor, value: float):
    """The sorted table ck (values cv) with the sorted keys `new` (absent from it) added as `value`."""
    at = torch.searchsorted(ck, new) + torch.arange(new.numel(), device=ck.device)  # their merged places
    old = torch.ones(ck.numel() + new.numel(), dtype=torch.bool, device=ck.device)
    old[at] = False
    keys = torch.empty(old.shape, dtype=ck.dtype, device=ck.device)
    keys[at], keys[old] = new, ck
    vals = torch.full(old.shape, value, dtype=cv.dtype, device=cv.device)
    vals[old] = cv
    return keys, vals


def _cell_values(ck, cv, cells, far):
    """Corner values [C,8] of the cells (sorted keys), corners added to the table as `far` where
    missing. One corner slot at a time, so the transients are [C] arrays. Returns (ck, cv, values)."""
    vals = torch.empty((cells.numel(), 8), dtype=cv.dtype, device=cv.device)
    missing = torch.empty((cells.numel(), 8), dtype=torch.bool, device=cv.device)
    for i, step in enumerate(_CORNER8_STEP):
        at = _find(ck, cells + step)
        missing[:, i] = at < 0
        vals[:, i] = cv[at.clamp_min_(0)].masked_fill_(missing[:, i], far)
        del at
    if bool(missing.any()):  # corners not in the table are beyond the reach: add them as outside
        new = torch.unique(torch.cat([(cells + step)[missing[:, i]] for i, step in enumerate(_CORNER8_STEP)]))
        ck, cv = _insert(ck, cv, new, far)
    return ck, cv, vals


def _cells_of(corner_keys: torch.Tensor) -> torch.Tensor:
    """Sorted keys of the cells that have one of the corners."""
    return _dilate(corner_keys, [(a, (0, -1)) for a in range(3)])


def _critical_flips(cells, vals):
    """Corner keys to make negative so the cells (sorted keys [C], corner values [C,8]) lose their
    critical configurations (empty when none): per diagonal face, the face's positive corner with the
    smaller value; per cell whose only two negative (or positive) corners are opposite, its positive
    corner with the smallest value. Ties go to the smaller key, so the two cells of a face choose the
    same corner."""
    dev = vals.device
    lab = vals < 0
    faces = _FACES.to(dev)
    corner_step = torch.tensor(_CORNER8_STEP, device=dev)
    big = torch.iinfo(torch.int64).max
    crit = torch.empty((lab.shape[0], 6), dtype=torch.bool, device=dev)
    for j, (a, b, c, d) in enumerate(_FACES.tolist()):  # a face at a time: [C] temporaries
        la, lb, lc, ld = lab[:, a], lab[:, b], lab[:, c], lab[:, d]
        crit[:, j] = (la & lc & ~lb & ~ld) | (lb & ld & ~la & ~lc)
    # cells whose only two negative (or positive) corners are opposite (corner i and 7 - i)
    n_in = lab.sum(1, dtype=torch.int32)
    opp_in = opp_out = torch.zeros_like(n_in, dtype=torch.bool)
    for i in range(4):
        opp_in = opp_in | (lab[:, i] & lab[:, 7 - i])
        opp_out = opp_out | ~(lab[:, i] | lab[:, 7 - i])
    crit3 = ((n_in == 2) & opp_in) | ((n_in == 6) & opp_out)
    del n_in, opp_in, opp_out
    out = []
    for rows, slots in ((torch.nonzero(crit, as_tuple=True)), (torch.nonzero(crit3).squeeze(1), None)):
        if rows.numel() == 0:
            continue
        corner = faces[slots] if slots is not None else torch.arange(8, device=dev).expand(rows.numel(), 8)
        vv, ll = vals[rows[:, None], corner], lab[rows[:, None], corner]
        kk = cells[rows][:, None] + corner_step[corner]
        cand = torch.where(ll, torch.full_like(vv, math.inf), vv)
        tie = (cand == cand.amin(1, keepdim=True)) & ~ll
        out.append(torch.where(tie, kk, torch.full_like(kk, big)).amin(1))
    return torch.unique(torch.cat(out)) if out else torch.zeros(0, dtype=torch.int64, device=dev)


def _well_composed(ck: torch.Tensor, cv: torch.Tensor, far: float, neg: float, max_rounds: int = 10_000):
    """Make the corner signs well-composed (module docstring). ck sorted corner keys, cv values
    (< 0 inside); corners not in the table have value `far`. After the first pass only cells holding
    a corner flipped in the previous round can change, so later rounds look at those alone.
    Returns (ck, cv, cells [C] sorted keys of the cells with a negative corner, vals [C,8], flips)."""
    flips = 0
    cells = _cells_of(ck[cv < 0])
    for _ in range(max_rounds):
        ck, cv, vals = _cell_values(ck, cv, cells, far)
        fk = _critical_flips(cells, vals)
        if fk.numel() == 0:
            break
        cv[_find(ck, fk)] = neg
        flips += int(fk.numel())
        del vals
        cells = _cells_of(fk)
    else:
        raise RuntimeError("remesh: could not make the band's corner signs well-composed")
    if flips:  # else the first round's cells and values are the final ones
        del vals
        cells = _cells_of(ck[cv < 0])
        ck, cv, vals = _cell_values(ck, cv, cells, far)
    return ck, cv, cells, vals, flips


def remesh_narrow_band_dc(vertices, faces, resolution: int, *, band: float = 1.0, project_back: float = 0.0,
                          aabb=((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)), max_pairs: int = 1 << 23,
                          chunk: int = 1 << 20, timings: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed, oriented, manifold surface of the band of half-width `band` cells around the mesh.

    vertices [V,3] float, faces [F,3] int (torch, any device; numpy accepted); resolution: cells
    across the (enlarged) box; band, project_back: upstream's `remesh_band`, `remesh_project`;
    aabb: the box the mesh lives in. Returns (vertices [N,3] float32, faces [M,3] int64) on the
    inputs' device. Distances are asked `max_pairs // 8` corners at a time and the vertices made
    `chunk` cells at a time, so the memory beyond the result is a few bytes per band corner and cell.
    """
    t0 = time.perf_counter()
    timings = timings if timings is not None else {}
    V = torch.as_tensor(vertices).float()
    dev = V.device
    F = torch.as_tensor(faces).to(dev).long()
    if F.shape[0] == 0 or V.shape[0] == 0:
        return torch.zeros((0, 3), device=dev), torch.zeros((0, 3), dtype=torch.int64, device=dev)
    box = torch.as_tensor(aabb, dtype=torch.float32, device=dev)
    R = int(resolution)
    scale = (R + 3 * band) / R * float((box[1] - box[0]).max())
    h = scale / R
    origin = box.mean(0) - scale / 2
    eps = band * h
    reach = eps + h  # a crossing edge has one corner below eps, so the other is below eps + h
    m = max(1, math.ceil(reach / h - 1e-9))
    grid = TriangleGrid(V, F, cell=m * h, origin=origin)

    ck = _band_corners(grid, m)
    cv = torch.empty(ck.shape, dtype=torch.float32, device=dev)  # in cell units from here on
    step = max(1, max_pairs // 8)  # the points, and the unused faces and weights, of a slice only
    for a in range(0, ck.numel(), step):
        d, _, _ = closest_points(origin + h * _unkey(ck[a:a + step]).float(), V, F, m * h, grid=grid,
                                 max_pairs=max_pairs)
        cv[a:a + step] = (d.clamp_max(reach) - eps) / h
        del d
    del grid
    far = (reach - eps) / h
    timings["remesh_udf"] = time.perf_counter() - t0
    t = time.perf_counter()
    ck, cv, cells, vals, flips = _well_composed(ck, cv, far, neg=-1e-3)
    inside = ck[cv < 0]  # sorted keys of the negative corners
    del ck, cv
    timings["remesh_signs"] = time.perf_counter() - t
    t = time.perf_counter()

    # one vertex per mixed cell: mean of its edges' zero crossings (cell-local coordinates), `chunk`
    # cells at a time (the [C,12,3] crossing points are the big transient)
    n_in = (vals < 0).sum(1)
    mixed = (n_in > 0) & (n_in < 8)
    del n_in
    mixed_cells = cells[mixed]
    verts = torch.empty((mixed_cells.numel(), 3), dtype=torch.float32, device=dev)
    e = _EDGES.to(dev)
    c8 = _CORNER8.to(dev).float()
    o = 0
    for a in range(0, cells.numel(), chunk):
        sel = mixed[a:a + chunk]
        cv8 = vals[a:a + chunk][sel]
        lab = cv8 < 0
        va, vb = cv8[:, e[:, 0]], cv8[:, e[:, 1]]  # [C,12]
        cross = lab[:, e[:, 0]] != lab[:, e[:, 1]]
        tpar = (va / (va - vb).masked_fill_(~cross, 1.0)).clamp_(0, 1)
        del va, vb
        pts = (tpar[..., None] * (c8[e[:, 1]] - c8[e[:, 0]])).add_(c8[e[:, 0]])  # [C,12,3]
        w = cross.float()
        local = pts.mul_(w[..., None]).sum(1) / w.sum(1, keepdim=True)
        del pts
        n = local.shape[0]
        verts[o:o + n] = origin + h * (_unkey(cells[a:a + chunk][sel]).float() + local)
        o += n
    del cells, vals, mixed

    # one quad per crossing grid edge, from its negative end: normal along +axis when the edge
    # leaves the band going up the axis. The crossing edges (their lower corners) of all six
    # (axis, direction) groups first, so the faces are written into one array, a group at a time
    groups = []
    for a in range(3):
        for sgn in (1, -1):
            nb = inside + sgn * _AXIS_STEP[a]
            out = _find(inside, nb) < 0
            groups.append((a, sgn, (inside if sgn > 0 else nb)[out]))
            del nb, out
    del inside
    out_f = torch.empty((2 * sum(low.numel() for _, _, low in groups), 3), dtype=torch.int64, device=dev)
    lost = torch.zeros((), dtype=torch.bool, device=dev)

    def bend(p, i0, i1, i2, j0, j1, j2):
        n1 = torch.linalg.cross(p[:, i1] - p[:, i0], p[:, i2] - p[:, i0])
        n2 = torch.linalg.cross(p[:, j1] - p[:, j0], p[:, j2] - p[:, j0])
        return (n1 * n2).sum(1) / (n1.norm(dim=1) * n2.norm(dim=1) + 1e-30)

    o = 0
    for a, sgn, low in groups:
        # cells around the edge in counter-clockwise order seen from +axis, reversed for -axis
        u, v = (a + 1) % 3, (a + 2) % 3
        ring = torch.tensor([ru * _AXIS_STEP[u] + rv * _AXIS_STEP[v] for ru, rv in _RING.tolist()], device=dev)
        quads = _find(mixed_cells, low[:, None] + (ring if sgn > 0 else ring.flip(0)))  # [Q,4]
        lost |= (quads < 0).any()
        # split along the diagonal whose two triangles bend least
        p = verts[quads]  # [Q,4,3]
        use02 = bend(p, 0, 1, 2, 0, 2, 3) >= bend(p, 0, 1, 3, 1, 2, 3)
        del p
        n = quads.shape[0]
        out_f.view(-1, 6)[o:o + n] = torch.where(use02[:, None], quads[:, [0, 1, 2, 0, 2, 3]],
                                                 quads[:, [0, 1, 3, 1, 2, 3]])
        o += n
        del quads, use02
    del groups
    if bool(lost):
        raise RuntimeError("remesh: a quad lost a cell (internal error)")
    timings["remesh_contour"] = time.perf_counter() - t
    if project_back > 0:
        t = time.perf_counter()
        _, fid, bc = closest_points(verts, V, F, 3 * h, max_pairs=max_pairs)
        ok = fid >= 0
        q = (bc[:, :, None] * V[F[fid.clamp_min(0)]]).sum(1)
        verts = torch.where(ok[:, None], verts - project_back * (verts - q), verts)
        timings["remesh_project"] = time.perf_counter() - t
    timings["remesh"] = time.perf_counter() - t0
    timings["remesh_flips"] = flips
    return verts.float(), out_f


def prepare_remeshed(vertices, faces, grid_size: int, *, decimation_target: int = 1_000_000, band: float = 1.0,
                     project_back: float = 0.0, max_hole_perimeter: float = 3e-2, device=None,
                     timings: dict | None = None):
    """Upstream's remesh branch of `to_glb`: fill small holes, remesh the band at the grid resolution,
    simplify to `decimation_target` faces (pinches undone); then clean and orient.

    Returns (vertices [V,3] float32, faces [F,3] int64, closed [F] bool, surface, info): numpy arrays;
    `surface` = (vertices, faces) of the hole-filled decoded mesh, which the bake projects texels onto
    (upstream builds its BVH at the same point); info = remeshed faces, vertices, sign flips.
    """
    import numpy as np

    from . import glb

    timings = timings if timings is not None else {}
    t = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    v, f = glb.clean_mesh(vertices, faces, device=dev)
    f, _ = glb.orient_faces(v, f, outward=False, device=glb.gpu_or_none(dev))
    v, f, _ = glb.fill_small_holes(v, f, max_hole_perimeter, device=glb.gpu_or_none(dev))
    timings["clean"] = time.perf_counter() - t
    surface = (v, f)
    if len(f) == 0:
        return v, f, np.zeros(0, bool), surface, {"faces": 0, "vertices": 0, "sign_flips": 0}
    t = time.perf_counter()
    steps: dict = {}
    rv, rf = remesh_narrow_band_dc(torch.from_numpy(v).to(dev), torch.from_numpy(f).to(dev), int(grid_size),
                                   band=band, project_back=project_back, timings=steps)
    if not glb.use_torch_simplifier(dev):  # fast-simplification takes host arrays; the torch one the device's
        rv, rf = rv.cpu().numpy(), rf.cpu().numpy()
    info = {"faces": int(len(rf)), "vertices": int(len(rv)), "sign_flips": int(steps.pop("remesh_flips"))}
    timings.update(steps)
    timings["remesh"] = time.perf_counter() - t
    t = time.perf_counter()
    rv, rf = glb.simplify_mesh(rv, rf, decimation_target, device=dev)
    timings["simplify"] = time.perf_counter() - t
    t = time.perf_counter()
    rv, rf = glb.clean_mesh(rv, rf, merge_vertices=False, device=glb.gpu_or_none(dev))
    rf, oriented = glb.orient_faces(rv, rf, device=glb.gpu_or_none(dev))
    timings["orient"] = time.perf_counter() - t
    return rv, rf, oriented["closed"], surface, info
