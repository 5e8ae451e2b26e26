"""Distances between two runs' outputs: relative L2 error of a tensor (dense, or sparse rows matched
by their voxel coordinates) and, for meshes, Chamfer distance and F-score on surface samples.

Meshes are compared on points sampled area-weighted on their triangles with a seeded generator on
the host, in float64, so two identical meshes give identical samples (Chamfer 0, F-score 1) on any
device. Nearest neighbours come from scipy's cKDTree when scipy is installed, else from chunked
exact distances in torch; both are exact.

    chamfer  = ½ (mean over A of d(a, B) + mean over B of d(b, A))
    F-score@τ = 2PR / (P + R), P = share of A within τ of B, R = share of B within τ of A

Distances are in the frame of the vertices (the pipeline's grid frame: the object inside
[-0.5, 0.5]³, so τ = 0.01 is 1 % of the box).
"""
from __future__ import annotations

import torch

DEFAULT_POINTS = 100_000
DEFAULT_TAU = 0.01


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖, in float64 (0.0 when both are zero)."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    x, ref = x.detach().double(), ref.detach().double()
    den = float(ref.norm())
    num = float((x - ref).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def match_rows(coords: torch.Tensor, ref_coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of `coords`, rows of `ref_coords`) holding equal integer coordinates (rows [N, D], each
    set without repeats), in `ref_coords` order."""
    a, b = coords.detach().long().cpu(), ref_coords.detach().long().cpu()
    if a.shape[0] == 0 or b.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    lo = torch.minimum(a.min(0).values, b.min(0).values)
    a, b = a - lo, b - lo
    base = int(max(a.max(), b.max())) + 1
    key_a, key_b = torch.zeros(a.shape[0], dtype=torch.long), torch.zeros(b.shape[0], dtype=torch.long)
    for j in range(a.shape[1]):  # one int64 key per row (base**D stays far below 2**63 for voxel grids)
        key_a, key_b = key_a * base + a[:, j], key_b * base + b[:, j]
    order = torch.argsort(key_a)
    pos = torch.searchsorted(key_a[order], key_b).clamp_max(a.shape[0] - 1)
    hit = key_a[order][pos] == key_b
    return order[pos[hit]], torch.nonzero(hit).flatten()


def sparse_rel_l2(coords: torch.Tensor, feats: torch.Tensor, ref_coords: torch.Tensor, ref_feats: torch.Tensor) -> dict:
    """Relative L2 error over the rows both sets hold (matched by coordinates), and how far the sets
    agree: coord_iou = |A ∩ B| / |A ∪ B| (1.0 when both ran at the same voxels)."""
    ia, ib = match_rows(coords, ref_coords)
    n = int(ia.numel())
    union = coords.shape[0] + ref_coords.shape[0] - n
    out = {"coord_iou": n / union if union else 1.0, "rows": int(coords.shape[0]), "ref_rows": int(ref_coords.shape[0]),
           "matched_rows": n}
    out["rel_l2"] = rel_l2(feats.detach().cpu()[ia], ref_feats.detach().cpu()[ib]) if n else None
    return out


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, n: int = DEFAULT_POINTS, seed: int = 0) -> torch.Tensor:
    """n points [n, 3] (float64, host) on the triangles, area-weighted, from a generator seeded with
    `seed`; the same mesh gives the same points."""
    v = vertices.detach().double().cpu()
    f = faces.detach().long().cpu()
    if f.shape[0] == 0:
        return torch.zeros(0, 3, dtype=torch.float64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = torch.linalg.cross(b - a, c - a).norm(dim=1)
    cdf = torch.cumsum(area, 0)
    if float(cdf[-1]) <= 0:
        return torch.zeros(0, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.searchsorted(cdf, torch.rand(n, generator=gen, dtype=torch.float64) * cdf[-1]).clamp_max(f.shape[0] - 1)
    u, w = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    flip = u + w > 1  # reflect into the triangle: uniform over its area
    u, w = torch.where(flip, 1 - u, u), torch.where(flip, 1 - w, w)
    return a[pick] + u[:, None] * (b[pick] - a[pick]) + w[:, None] * (c[pick] - a[pick])


def nearest_distances(points: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """For each row of `points` [N, 3], the distance to the nearest row of `to` [M, 3] (float64)."""
    p, q = points.detach().double().cpu(), to.detach().double().cpu()
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        return _nearest_torch(p, q)
    d, _ = cKDTree(q.numpy()).query(p.numpy(), k=1)
    return torch.from_numpy(d)


def _nearest_torch(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    rows = max(1, (1 << 25) // max(q.shape[0], 1))  # about 256 MB of float64 distances per chunk
    # the difference form, not |a|²+|b|²-2ab: a point on itself is at exactly 0, as with cKDTree
    return torch.cat([torch.cdist(p[s : s + rows], q, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
                      for s in range(0, p.shape[0], rows)])


def chamfer_fscore(points: torch.Tensor, ref_points: torch.Tensor, tau: float = DEFAULT_TAU) -> dict:
    """Chamfer distance and F-score@tau between two point sets (see the module docstring)."""
    if points.shape[0] == 0 or ref_points.shape[0] == 0:
        return {"chamfer": None, "f_score": None, "precision": None, "recall": None, "tau": tau,
                "note": "an empty surface"}
    d_ab, d_ba = nearest_distances(points, ref_points), nearest_distances(ref_points, points)
    precision, recall = float((d_ab <= tau).double().mean()), float((d_ba <= tau).double().mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"chamfer": 0.5 * (float(d_ab.mean()) + float(d_ba.mean())), "f_score": f, "precision": precision,
            "recall": recall, "tau": tau}


def mesh_distance(vertices, faces, ref_vertices, ref_faces, n: int = DEFAULT_POINTS, seed: int = 0,
                  tau: float = DEFAULT_TAU) -> dict:
    """Chamfer and F-score@tau of a mesh against a reference mesh, on n area-weighted samples each."""
    out = chamfer_fscore(sample_surface(vertices, faces, n, seed), sample_surface(ref_vertices, ref_faces, n, seed), tau)
    out.update({"points": n, "seed": seed, "faces": int(faces.shape[0]), "ref_faces": int(ref_faces.shape[0])})
    return out
