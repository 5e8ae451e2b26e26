"""Quadric edge collapse in torch, in rounds of independent collapses: the simplifier that runs where
the decoded mesh already is (the GPU after a GPU run).

Each round, on the whole mesh at once:
  1. per vertex the sum of its faces' area-weighted plane quadrics (Garland-Heckbert), kept across
     rounds (a kept vertex takes its partner's);
  2. per edge the collapse point (the quadric's minimiser, or the best of the endpoints and the
     midpoint where the 3x3 system is near-singular or its minimiser leaves the edge's reach) and its
     cost; edges on a border or shared by more than two faces never collapse (their vertices stay);
  3. among the cheapest share of the edges, in a random order, those first in that order among all
     edges touching either endpoint or a neighbour of one: no two of them share a face or a
     neighbouring vertex, so they collapse independently in one step;
  4. of those, the ones that keep the surface a manifold (the endpoints have exactly the two common
     neighbours of the faces on the edge: the link condition) and flip no face's normal, cheapest
     first, no more than the face count still to remove;
  5. the collapse: both endpoints become one vertex at the collapse point; the two faces on the edge
     vanish.
Rounds repeat until the face count reaches the target or no edge can collapse. Topology is kept
(closed stays closed, the genus stays), unlike a collapse without the link condition.

A round holds a few hundred bytes a face, so a mesh above PART_FACES faces is first simplified in
slabs of about that many faces (sorted along its longest axis), each to its share of the target: a
slab's cut edges are borders there, so their vertices stay and the slabs join up again; the rounds
on the whole mesh then finish the job, seams included.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

CHEAP_SHARE = 0.6  # of the edges that may collapse, the cheapest that are candidates in a round: a larger share
# spreads the collapses over the surface (rounder faces, fewer and larger UV charts), a smaller one is greedier
SELECTION_PASSES = 4
EDGE_CHUNK = 1 << 19  # edges whose collapse points are solved at once (~600 bytes each; fewer launches a round)
QUADRIC_CHUNK = 1 << 20  # faces whose plane quadrics are summed at once (~300 bytes each)
PART_FACES = 3 << 20  # faces of a slab simplified on its own first (a round holds ~400 bytes a face)
MIN_NORMAL_COS = 0.2  # a face around a collapse may turn by up to ~78 degrees, as fast-simplification allows
_UPPER = ((0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3))  # symmetric 4x4 as 10
_UPPER_I = [i for i, _ in _UPPER]
_UPPER_J = [j for _, j in _UPPER]
_UPPER_MULT = [1.0 if i == j else 2.0 for i, j in _UPPER]
_FULL = [_UPPER.index((min(i, j), max(i, j))) for i in range(4) for j in range(4)]  # the 16 entries from the 10


@functools.lru_cache(maxsize=None)
def _index_tensors(device: torch.device):
    """(upper i, upper j, full) index tensors and the off-diagonal weights on `device`: made once, not
    copied to the device for every chunk of every round."""
    idx = [torch.tensor(x, dtype=torch.int64, device=device) for x in (_UPPER_I, _UPPER_J, _FULL)]
    return (*idx, torch.tensor(_UPPER_MULT, dtype=torch.float64, device=device))


def _plane_quadrics(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """[F, 10] area-weighted quadrics p p^T of the faces' planes p = (n, -n.a), float64."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n = torch.linalg.cross(b - a, c - a)
    twice_area = n.norm(dim=1, keepdim=True)
    n = n / twice_area.clamp_min(1e-300)
    p = torch.cat([n, -(n * a).sum(1, keepdim=True)], 1)
    ui, uj, _, _ = _index_tensors(p.device)
    return (p[:, ui] * p[:, uj]) * (0.5 * twice_area)


def _vertex_quadrics(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """[V, 10] sums of the quadrics of each vertex's faces (float64), QUADRIC_CHUNK faces at a time:
    the per-face quadrics take ten times the faces' own memory."""
    q = torch.zeros(v.shape[0], 10, dtype=torch.float64, device=v.device)
    for s in range(0, f.shape[0], QUADRIC_CHUNK):
        fc = f[s:s + QUADRIC_CHUNK]
        qf = _plane_quadrics(v, fc)
        for k in range(3):
            q.index_add_(0, fc[:, k], qf)
    return q


def _collapse_points(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per edge (quadric sum q [E,10], endpoints a, b [E,3] float64): the collapse point and its cost.
    The 3x3 system is solved by its adjugate (symmetric: its columns are cross products of the rows),
    and the four candidates are evaluated together: a few large kernels per chunk."""
    ui, uj, full, mult = _index_tensors(q.device)
    Q = q[:, full].view(-1, 4, 4)
    r0, r1, r2 = Q[:, 0, :3], Q[:, 1, :3], Q[:, 2, :3]
    c0, c1, c2 = torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)
    det = (r0 * c0).sum(1, keepdim=True)
    rhs = -Q[:, :3, 3]
    x = (c0 * rhs[:, 0:1] + c1 * rhs[:, 1:2] + c2 * rhs[:, 2:3]) / det
    mid = 0.5 * (a + b)
    reach = (b - a).norm(dim=1)
    ok = (det[:, 0] != 0) & torch.isfinite(x).all(1) & ((x - mid).norm(dim=1) <= reach)
    x = torch.where(ok[:, None], x, mid)
    candidates = torch.stack([x, mid, a, b], 1)  # ties go to the midpoint: rounder faces
    h = torch.cat([candidates, torch.ones_like(candidates[..., :1])], 2)  # [E,4,4] homogeneous
    # x^T Q x per candidate from the 10 upper entries (elementwise: a batched 4x4 matmul runs as a GEMM)
    w = q * mult
    costs = torch.stack([(h[:, c, ui] * h[:, c, uj]).mul_(w).sum(1) for c in range(4)], 1)
    costs[:, 0] = torch.where(ok, costs[:, 0], torch.inf)
    cost, best = costs.min(1)
    point = candidates.gather(1, best[:, None, None].expand(-1, 1, 3))[:, 0]
    return point, cost.clamp_min(0)


def _edge_collapses(v: torch.Tensor, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, part: int) -> torch.Tensor:
    """Collapse points (part 0) or costs (part 1) of the edges (a, b), solved EDGE_CHUNK edges at a
    time: the solve's float64 temporaries take hundreds of bytes an edge."""
    out = []
    for s in range(0, len(a), EDGE_CHUNK):
        x, y = a[s:s + EDGE_CHUNK], b[s:s + EDGE_CHUNK]
        out.append(_collapse_points(q[x] + q[y], v[x].double(), v[y].double())[part])
    return torch.cat(out)


def _unique_edges(f: torch.Tensor, n_v: int):
    """(lo [E], hi [E], faces per edge [E], sorted keys lo * n_v + hi [E])."""
    nxt = f[:, [1, 2, 0]]
    keys = torch.minimum(f, nxt) * n_v + torch.maximum(f, nxt)
    del nxt
    keys, counts = torch.unique(keys.view(-1), return_counts=True)
    return keys // n_v, keys % n_v, counts, keys


def _has_edge(keys: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_v: int) -> torch.Tensor:
    k = torch.minimum(x, y) * n_v + torch.maximum(x, y)
    i = torch.searchsorted(keys, k).clamp_max(len(keys) - 1)
    return keys[i] == k


def _one_round(v: torch.Tensor, f: torch.Tensor, q: torch.Tensor, to_remove: int):
    """One round of independent collapses. Returns (v, f, q, collapses)."""
    n_v, dev = v.shape[0], v.device
    lo, hi, count, keys = _unique_edges(f, n_v)
    locked = torch.zeros(n_v, dtype=torch.bool, device=dev)
    locked[lo[count != 2]] = True
    locked[hi[count != 2]] = True
    del count
    cost = _edge_collapses(v, q, lo, hi, 1)  # the points later, for the chosen edges only
    cost = torch.where(locked[lo] | locked[hi], torch.inf, cost)
    live = torch.isfinite(cost)
    if not bool(live.any()):
        return v, f, q, 0
    n_e = len(lo)
    rank = torch.empty(n_e, dtype=torch.int64, device=dev)
    rank[torch.argsort(cost, stable=True)] = torch.arange(n_e, device=dev)
    # candidates: the cheapest share of the edges, in a random order among themselves (neighbouring costs
    # are alike: by cost alone few edges are the smallest of their neighbourhood)
    n_live = int(live.sum())
    cand = live & (rank < max(1, int(n_live * CHEAP_SHARE)))
    del cost, live  # the round holds several edge- and face-sized arrays: each goes once it is used
    gen = torch.Generator(device=dev).manual_seed(n_v * 7919 + n_e)
    prio = torch.empty(n_e, dtype=torch.int64, device=dev)
    prio[torch.randperm(n_e, generator=gen, device=dev)] = torch.arange(n_e, device=dev)
    chosen = torch.zeros(n_e, dtype=torch.bool, device=dev)
    blocked = torch.zeros(n_v, dtype=torch.bool, device=dev)
    for _ in range(SELECTION_PASSES):  # each pass adds the local minima of what earlier picks leave free
        p = torch.where(cand & ~blocked[lo] & ~blocked[hi], prio, n_e)
        at = torch.full((n_v,), n_e, dtype=torch.int64, device=dev)
        at.scatter_reduce_(0, lo, p, "amin")
        at.scatter_reduce_(0, hi, p, "amin")
        near = at.clone()
        near.scatter_reduce_(0, lo, at[hi], "amin")
        near.scatter_reduce_(0, hi, at[lo], "amin")
        pick = (p < n_e) & (p == near[lo]) & (p == near[hi])
        if not bool(pick.any()):
            break
        chosen |= pick
        ends = torch.zeros(n_v, dtype=torch.bool, device=dev)
        ends[lo[pick]] = ends[hi[pick]] = True
        blocked |= ends  # the picks' endpoints and their neighbours
        blocked[lo[ends[hi]]] = True
        blocked[hi[ends[lo]]] = True
    del p, at, near, pick, cand, prio, blocked
    ids = chosen.nonzero()[:, 0]
    del chosen
    if len(ids) == 0:
        return v, f, q, 0
    slot = torch.full((n_e,), -1, dtype=torch.int64, device=dev)
    slot[ids] = torch.arange(len(ids), device=dev)
    chosen_point = _edge_collapses(v, q, lo[ids], hi[ids], 0)
    partner = torch.full((n_v,), -1, dtype=torch.int64, device=dev)
    partner[lo[ids]], partner[hi[ids]] = hi[ids], lo[ids]
    edge_of = torch.full((n_v,), -1, dtype=torch.int64, device=dev)
    edge_of[lo[ids]] = edge_of[hi[ids]] = ids
    # link condition: an endpoint's neighbours shared with its partner are only the two faces' apexes
    common = torch.zeros(n_e, dtype=torch.int64, device=dev)
    for u, w in ((lo, hi), (hi, lo)):  # every edge from a chosen endpoint u to a w other than its partner
        m = ((edge_of[u] >= 0) & (w != partner[u])).nonzero()[:, 0]
        common.index_add_(0, edge_of[u[m]], _has_edge(keys, w[m], partner[u[m]], n_v).long())
    ok = common == 4  # each apex counted once from each endpoint
    del common, m
    # no face around a collapse may flip
    corner_edge = edge_of[f]  # [F, 3]
    moving = (corner_edge >= 0).any(1)
    both = (f[:, :, None] == partner[f][:, None, :]).any(2).any(1)  # the faces on the edge: they vanish
    test = (moving & ~both).nonzero()[:, 0]
    tf = f[test]
    ce = corner_edge[test].max(1).values
    tri = v[tf].double()
    new = torch.where((corner_edge[test] >= 0)[:, :, None], chosen_point[slot[ce]][:, None, :], tri)
    n_old = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n_new = torch.linalg.cross(new[:, 1] - new[:, 0], new[:, 2] - new[:, 0])
    flips = (n_old * n_new).sum(1) <= MIN_NORMAL_COS * n_old.norm(dim=1) * n_new.norm(dim=1)
    del corner_edge, moving, both, test, tf, tri, new, n_old, n_new
    bad = torch.zeros(n_e, dtype=torch.bool, device=dev)
    bad.index_put_((ce[flips],), torch.ones_like(ce[flips], dtype=torch.bool), accumulate=True)
    ok &= ~bad
    accepted = ids[ok[ids]]
    accepted = accepted[torch.argsort(rank[accepted])][: max(1, (to_remove + 1) // 2)]
    if len(accepted) == 0:
        return v, f, q, 0
    keep, drop = lo[accepted], hi[accepted]
    v[keep] = chosen_point[slot[accepted]].to(v.dtype)  # in place: simplify_torch owns these copies
    q[keep] += q[drop]
    remap = torch.arange(n_v, device=dev)
    remap[drop] = keep
    f = remap[f]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    return v, f, q, len(accepted)


def _rounds(v, f, q, target_faces: int, max_rounds: int):
    for _ in range(max_rounds):
        if f.shape[0] <= target_faces:
            break
        v, f, q, n = _one_round(v, f, q, int(f.shape[0] - target_faces))
        if n == 0:
            break
    return v, f, q


def _simplify_in_slabs(v, f, q, target_faces: int, part_faces: int, max_rounds: int):
    """Each slab of about part_faces faces (by centroid along the longest axis) simplified on its
    own to its share of the target; v and q updated in place. Returns the joined faces."""
    centre = v[f].mean(1)
    axis = int((centre.amax(0) - centre.amin(0)).argmax())
    order = torch.argsort(centre[:, axis])
    del centre
    n_parts = -(-f.shape[0] // part_faces)
    joined = []
    for idx in order.tensor_split(n_parts):
        used, local = torch.unique(f[idx], return_inverse=True)
        share = int(round(len(idx) * target_faces / f.shape[0]))
        pv, pf, pq = _rounds(v[used], local, q[used], share, max_rounds)  # indexing copies: the slab's own
        v[used], q[used] = pv, pq  # the cut's vertices are borders there: unchanged
        joined.append(used[pf])
    return torch.cat(joined)


def simplify_torch(vertices, faces, target_faces: int, *, device=None, max_rounds: int = 200,
                   part_faces: int | None = None):
    """Simplify to at most about `target_faces` faces (fewer collapses where none keeps the surface a
    manifold without flipping a face). vertices [V,3] float, faces [F,3] int (numpy or torch);
    part_faces: slab size of a large mesh's first pass (default PART_FACES).
    Returns numpy (vertices float32 [V',3] without unreferenced ones, faces int64 [F',3])."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    part_faces = PART_FACES if part_faces is None else int(part_faces)
    # a copy: the rounds move vertices in place, and as_tensor may share the caller's memory
    v = torch.as_tensor(vertices).to(device=dev, dtype=torch.float32).reshape(-1, 3).clone()
    f = torch.as_tensor(faces).to(device=dev, dtype=torch.int64).reshape(-1, 3)
    if f.shape[0] > target_faces and f.shape[0] > 0:
        q = _vertex_quadrics(v.double(), f)
        if f.shape[0] > part_faces:
            f = _simplify_in_slabs(v, f, q, target_faces, part_faces, max_rounds)
        v, f, q = _rounds(v, f, q, target_faces, max_rounds)
    used = torch.zeros(v.shape[0], dtype=torch.bool, device=dev)
    used[f.reshape(-1)] = True
    remap = torch.cumsum(used, 0) - 1
    return v[used].cpu().numpy().astype(np.float32), remap[f].cpu().numpy()
