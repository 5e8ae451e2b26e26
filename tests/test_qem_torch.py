"""The torch simplifier (mesh/qem_torch.py) against what a simplifier must keep: the face budget, the
surface (distance to the analytic shape), closedness, winding and genus, open borders; on awkward
sizes, on the CPU and (where present) the GPU; and its place behind PIXAL3D_TORCH_SIMPLIFY."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from pixal3d_rt.mesh import glb
from pixal3d_rt.mesh.qem_torch import simplify_torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def _torus(n_major: int, n_minor: int, R: float = 0.3, r: float = 0.1):
    u, w = np.meshgrid(np.arange(n_major) * 2 * np.pi / n_major, np.arange(n_minor) * 2 * np.pi / n_minor, indexing="ij")
    v = np.stack([(R + r * np.cos(w)) * np.cos(u), r * np.sin(w), (R + r * np.cos(w)) * np.sin(u)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n_major), np.arange(n_minor), indexing="ij")
    a, b = i * n_minor + j, ((i + 1) % n_major) * n_minor + j
    c, d = ((i + 1) % n_major) * n_minor + (j + 1) % n_minor, i * n_minor + (j + 1) % n_minor
    f = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    return v.astype(np.float32), f, lambda p: np.abs(np.hypot(np.hypot(p[:, 0], p[:, 2]) - R, p[:, 1]) - r)


def _sphere(subdivisions: int):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
    return m.vertices.astype(np.float32), m.faces, lambda p: np.abs(np.linalg.norm(p, axis=1) - 0.4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,target", [("sphere", 1_999), ("torus", 3_001), ("sphere_small", 77)])
def test_reaches_the_target_and_keeps_the_surface_and_its_topology(device, shape, target):
    v, f, dist = {"sphere": lambda: _sphere(5), "torus": lambda: _torus(157, 61), "sphere_small": lambda: _sphere(2)}[shape]()
    sv, sf = simplify_torch(v, f, target, device=device)
    assert target - 40 <= len(sf) <= target and sv.dtype == np.float32 and sf.dtype == np.int64
    assert len(np.unique(sf)) == len(sv)  # no unreferenced vertex
    before, after = trimesh.Trimesh(v, f, process=False), trimesh.Trimesh(sv, sf, process=False)
    assert after.is_watertight and after.is_winding_consistent and after.euler_number == before.euler_number
    coarse = 0.08 if target < 100 else 0.02  # a 76-face sphere is a polyhedron well inside it
    assert after.volume * before.volume > 0 and abs(after.volume / before.volume - 1) < coarse  # same side out
    pts, _ = trimesh.sample.sample_surface(after, 20_000, seed=0)
    edge = np.linalg.norm(v[f[:, 0]] - v[f[:, 1]], axis=1).mean()
    assert dist(sv).max() < 0.5 * edge * np.sqrt(len(f) / target) and dist(pts).mean() < 0.1 * edge * np.sqrt(len(f) / target)


@pytest.mark.parametrize("device", DEVICES)
def test_open_borders_and_non_manifold_edges_stay_where_they_are(device):
    v, f, _ = _sphere(4)
    keep = v[f].mean(1)[:, 1] < 0.13  # a bowl: the sphere below a cut
    f = f[keep]
    extra = np.array([[f[0, 0], f[0, 1], len(v)]])  # a third face on one edge: not a manifold there
    v = np.concatenate([v, [[0.0, 0.9, 0.0]]]).astype(np.float32)
    f = np.concatenate([f, extra])
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    keys, counts = np.unique(e, axis=0, return_counts=True)
    fixed = np.unique(keys[counts != 2])
    sv, sf = simplify_torch(v, f, len(f) // 4, device=device)
    assert len(sf) < len(f) // 2
    kept = {tuple(p) for p in sv.tolist()}
    assert all(tuple(p) in kept for p in v[fixed].tolist())  # every border / non-manifold vertex, exactly


def test_meshes_at_or_below_the_target_come_back_whole():
    v, f, _ = _sphere(1)
    sv, sf = simplify_torch(v, f, len(f))
    assert np.array_equal(sv, v) and np.array_equal(sf, f)
    sv, sf = simplify_torch(v[:0], f[:0], 10)
    assert sv.shape == (0, 3) and sf.shape == (0, 3)


def test_export_takes_it_behind_its_switch(monkeypatch):
    monkeypatch.delenv(glb.TORCH_SIMPLIFY_ENV, raising=False)
    assert glb.use_torch_simplifier("cuda:0") and not glb.use_torch_simplifier("cpu")
    assert not glb.use_torch_simplifier(None)
    monkeypatch.setenv(glb.TORCH_SIMPLIFY_ENV, "0")
    assert not glb.use_torch_simplifier("cuda:0")
    monkeypatch.delenv(glb.TORCH_SIMPLIFY_ENV)
    v, f, _ = _torus(83, 29)
    plain = glb.simplify_mesh(v, f, 1_000, device="cpu")
    monkeypatch.setenv(glb.TORCH_SIMPLIFY_ENV, "1")
    switched = glb.simplify_mesh(v, f, 1_000, device="cpu")
    ours = simplify_torch(v, f, 1_000, device="cpu")
    assert np.array_equal(switched[0], ours[0]) and np.array_equal(switched[1], ours[1])
    assert not (len(plain[1]) == len(ours[1]) and np.array_equal(plain[1], ours[1]))  # fast-simplification's differs


def test_faces_stay_as_even_as_fast_simplifications_on_a_voxel_surface():
    """A voxel-staircase surface (the reference mug) cut to a twentieth: collapses spread over the
    surface, so the faces' areas vary about as much as after fast-simplification's, and xatlas makes
    no more charts of it (a greedy order left huge faces on the flats and many small charts)."""
    from pixal3d_rt.mesh.uv import uv_unwrap
    from pixal3d_rt.reference_shape import ReferenceStructure

    v, f = ReferenceStructure().surface_mesh(128)
    v, f = glb.clean_mesh(v.numpy(), f.numpy())
    target = len(f) // 20

    def spread_and_charts(sv, sf):
        tri = sv[sf].astype(np.float64)
        area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        vmap, uf, _ = uv_unwrap(sv, sf, texture_size=1024, method="xatlas")
        return area.std() / area.mean(), glb.count_charts(uf, len(vmap))

    ours = simplify_torch(v, f, target)
    assert target - 40 <= len(ours[1]) <= target
    spread, charts = spread_and_charts(*ours)
    ref_spread, ref_charts = spread_and_charts(*glb.simplify_mesh(v, f, target))
    assert spread < 1.5 * ref_spread and charts <= 1.1 * ref_charts


def test_collapse_points_solved_in_chunks_give_the_same_mesh(monkeypatch):
    """Edges solved a few at a time (an awkward chunk size) give the mesh of one solve for all."""
    from pixal3d_rt.mesh import qem_torch

    v, f, _ = _torus(61, 23)
    whole = simplify_torch(v, f, 501)
    monkeypatch.setattr(qem_torch, "EDGE_CHUNK", 97)
    chunked = simplify_torch(v, f, 501)
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])
    assert len(whole[1]) <= 501


def test_a_large_mesh_is_simplified_in_slabs_first(monkeypatch):
    """Above part_faces the first rounds see one slab at a time; the slabs join up into the same kind
    of surface: closed, same genus, on the input."""
    from pixal3d_rt.mesh import qem_torch

    seen = []
    real = qem_torch._one_round
    monkeypatch.setattr(qem_torch, "_one_round", lambda v, f, q, n: (seen.append(int(f.shape[0])), real(v, f, q, n))[1])
    v, f, dist = _torus(157, 61)  # 19,154 faces
    sv, sf = simplify_torch(v, f, 2_000, part_faces=5_000)
    assert max(seen) <= 5_000 and seen[0] < 5_000  # no round on the whole mesh before the slabs
    assert 1_960 <= len(sf) <= 2_000
    before, after = trimesh.Trimesh(v, f, process=False), trimesh.Trimesh(sv, sf, process=False)
    assert after.is_watertight and after.is_winding_consistent and after.euler_number == before.euler_number
    edge = np.linalg.norm(v[f[:, 0]] - v[f[:, 1]], axis=1).mean()
    assert dist(sv).max() < 0.5 * edge * np.sqrt(len(f) / 2_000)
    seen.clear()
    whole = simplify_torch(v, f, 2_000)
    assert max(seen) == len(f) and not np.array_equal(whole[1], sf)  # the default: one piece at this size


def test_collapse_points_minimise_the_quadric_or_fall_back_to_the_edge():
    """The adjugate solve gives linalg.solve's minimiser where it lies within the edge's reach, with
    cost x^T Q x; a singular system (one plane) or a far minimiser gives the best of mid, a, b."""
    from pixal3d_rt.mesh.qem_torch import _FULL, _collapse_points, _plane_quadrics

    gen = torch.Generator().manual_seed(3)
    n = 1_003
    a = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.rand(n, 3, generator=gen, dtype=torch.float64)
    # three planes through a point near the edge: a well-posed minimiser there
    target = a + (b - a) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    q = torch.zeros(n, 10, dtype=torch.float64)
    for _ in range(3):
        tri = target[:, None, :] + 0.2 * torch.randn(n, 3, 3, generator=gen, dtype=torch.float64)
        tri[:, 0] = target
        q += _plane_quadrics(tri.reshape(-1, 3), torch.arange(3 * n).view(n, 3))
    point, cost = _collapse_points(q, a, b)
    Q = q[:, _FULL].view(-1, 4, 4)
    ref = torch.linalg.solve(Q[:, :3, :3], -Q[:, :3, 3])
    within = (ref - 0.5 * (a + b)).norm(dim=1) <= (b - a).norm(dim=1)
    assert within.float().mean() > 0.9
    torch.testing.assert_close(point[within], ref[within], rtol=1e-6, atol=1e-9)
    h = torch.cat([point, torch.ones(n, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(cost, torch.einsum("ni,nij,nj->n", h, Q, h).clamp_min(0), rtol=1e-9, atol=1e-12)
    # one plane only: singular, the point is one of mid, a, b (all on or off the plane alike: mid by the tie rule)
    flat = _plane_quadrics(torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64), torch.arange(3).view(1, 3))
    pa, pb = torch.tensor([[0.1, 0.2, 0.5]], dtype=torch.float64), torch.tensor([[0.3, 0.1, 0.0]], dtype=torch.float64)
    point, cost = _collapse_points(flat, pa, pb)
    torch.testing.assert_close(point, pb)
    assert float(cost) == 0.0
