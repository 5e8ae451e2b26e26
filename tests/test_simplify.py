"""Quadric decimation in parallel parts and the pinch repair (pixal3d_rt.mesh.simplify), CPU only.

The parallel path is forced on small meshes (PARALLEL_MIN_FACES lowered) with 2 or 3 worker processes.
Topology is checked independently of the module: every edge in exactly two faces, each directed edge
once (consistent winding), and every vertex's link one cycle (walked in Python).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pixal3d_rt.mesh import glb, simplify
from pixal3d_rt.mesh.project import closest_points
from test_glb import dual_grid_mesh, sphere_sdf, torus_sdf

pytest.importorskip("fast_simplification")


@pytest.fixture(autouse=True)
def parallel_on_small_meshes(monkeypatch):
    monkeypatch.setattr(simplify, "PARALLEL_MIN_FACES", 0)
    monkeypatch.delenv(simplify.DISABLE_PARALLEL_ENV, raising=False)


@pytest.fixture(scope="module", autouse=True)
def stop_workers():
    yield
    simplify.shutdown_workers()


def edge_counts(f):
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return counts


def vertex_links_are_single_cycles(f) -> bool:
    """Every vertex's link (the edges opposite it in its faces) is one cycle, or one path on a border."""
    links: dict[int, list] = {}
    for a, b, c in f.tolist():
        links.setdefault(a, []).append((b, c))
        links.setdefault(b, []).append((c, a))
        links.setdefault(c, []).append((a, b))
    for edges in links.values():
        adj: dict[int, list] = {}
        for x, y in edges:
            adj.setdefault(x, []).append(y)
            adj.setdefault(y, []).append(x)
        if any(len(n) > 2 for n in adj.values()):
            return False
        # connected: walk from one link vertex
        start = next(iter(adj))
        seen, stack = {start}, [start]
        while stack:
            for y in adj[stack.pop()]:
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
        if len(seen) != len(adj):
            return False
    return True


def assert_closed_oriented_manifold(v, f):
    assert (edge_counts(f) == 2).all()
    directed = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    assert len(np.unique(directed, axis=0)) == len(directed), "inconsistent winding"
    assert vertex_links_are_single_cycles(f)
    _, info = glb.orient_faces(v, f)
    assert info["closed"].all()


def oriented(v, f):
    v, f = glb.clean_mesh(v, f)
    f, info = glb.orient_faces(v, f)
    assert info["closed"].all()
    return v, f


@pytest.fixture(scope="module")
def mug():
    """The reference mug's decoded-style surface at grid 96: closed, genus 1 (the handle), ~50k faces."""
    from pixal3d_rt.reference_shape import ReferenceStructure

    v, f = ReferenceStructure().surface_mesh(96)
    return oriented(v, f) + (96,)


def hausdorff_voxels(v_out, f_out, v_in, f_in, grid, samples=4000):
    """Largest distance in voxels, both ways, from vertices and face centroids (at most `samples` of
    them, seeded) to the other surface; searched within 2 voxels, a point without a triangle in reach
    counts as infinitely far."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for (pv, pf), (qv, qf) in [((v_out, f_out), (v_in, f_in)), ((v_in, f_in), (v_out, f_out))]:
        pts = np.concatenate([pv, pv[pf].mean(axis=1)]).astype(np.float32)
        if len(pts) > samples:
            pts = pts[rng.choice(len(pts), samples, replace=False)]
        d, _, _ = closest_points(torch.from_numpy(pts), torch.from_numpy(qv), torch.from_numpy(qf), 2.0 / grid)
        worst = max(worst, float(d.max()) * grid)
    return worst


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_keeps_a_closed_mesh_closed_near_target(mug, workers):
    v, f, grid = mug
    target = len(f) // 8
    info = {}
    v2, f2 = simplify.simplify(v, f, target, workers=workers, info=info)
    assert info["parts"] == workers and info["stitched_faces"] > target  # the seams were dense before their pass
    assert 0.97 * target <= len(f2) <= target
    f2, _ = glb.orient_faces(v2, f2)
    assert_closed_oriented_manifold(v2, f2)
    assert hausdorff_voxels(v2, f2, v, f, grid) < 1.5


def test_serial_result_is_repaired_too(mug):
    v, f, _ = mug
    target = len(f) // 8
    info = {}
    v2, f2 = simplify.simplify(v, f, target, workers=1, info=info)
    assert info["parts"] == 1
    f2, _ = glb.orient_faces(v2, f2)
    assert_closed_oriented_manifold(v2, f2)
    assert 0.97 * target <= len(f2) <= target


def test_parallel_is_deterministic(mug):
    v, f, _ = mug
    a = simplify.simplify(v, f, len(f) // 6, workers=2)
    simplify.shutdown_workers()  # fresh processes the second time
    b = simplify.simplify(v, f, len(f) // 6, workers=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_default_workers_and_env_switch(mug, monkeypatch):
    v, f, _ = mug
    target = len(f) // 4

    def parts(cores, env):
        monkeypatch.setattr(simplify, "usable_cores", lambda: cores)
        monkeypatch.setenv(simplify.DISABLE_PARALLEL_ENV, env)
        info = {}
        simplify.simplify(v, f, target, info=info)
        return info["parts"]

    assert parts(4, "0") == 4 and parts(4, "") == 4
    assert parts(4, "1") == 1 and parts(4, "yes") == 1
    assert parts(simplify.PARALLEL_MIN_CORES - 1, "0") == 1  # too few cores to gain


def test_several_components_each_stay_closed():
    # two tori side by side and a sphere between them: every cut runs through several of them
    v1, f1, _ = dual_grid_mesh(lambda p: torus_sdf(p - np.array([0.2, 0.0, 0.0]), 0.15, 0.06), 64)
    v2, f2, _ = dual_grid_mesh(lambda p: torus_sdf(p + np.array([0.2, 0.0, 0.0]), 0.15, 0.06), 64)
    v3, f3, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.05, (0.0, 0.3, 0.0)), 64)
    v = np.concatenate([v1, v2, v3])
    f = np.concatenate([f1, f2 + len(v1), f3 + len(v1) + len(v2)]).astype(np.int64)
    v, f = oriented(v, f)
    _, info0 = glb.orient_faces(v, f)
    assert len(np.unique(info0["components"])) == 3
    target = len(f) // 5
    v2_, f2_ = simplify.simplify(v, f, target, workers=3)
    f2_, info = glb.orient_faces(v2_, f2_)
    assert_closed_oriented_manifold(v2_, f2_)
    assert len(np.unique(info["components"])) == 3
    assert 0.97 * target <= len(f2_) <= target
    assert hausdorff_voxels(v2_, f2_, v, f, 64) < 1.5


def test_mesh_at_or_below_target_is_returned_unchanged(mug):
    v, f, _ = mug
    out = glb.simplify_mesh(v, f, len(f))
    assert out[0] is v and out[1] is f
    # a tiny target is honoured and the result stays closed (a handle may pinch off: still closed)
    v2, f2 = simplify.simplify(v, f, 200, workers=2)
    assert 0 < len(f2) <= 200
    f2, _ = glb.orient_faces(v2, f2)
    assert_closed_oriented_manifold(v2, f2)


@pytest.mark.parametrize("workers", [1, 2])
def test_thin_wall_stays_closed(workers):
    # a bowl (half a spherical shell) 1.4 voxels thick: decimation collapses its two sides onto each
    # other in hundreds of places (edges of 4, 6, 8 faces before the repair)
    G = 64
    v, f, _ = dual_grid_mesh(lambda p: np.maximum(np.abs(np.linalg.norm(p, axis=-1) - 0.35) - 0.7 / G, p[..., 1]), G)
    v, f = oriented(v, f)
    target = len(f) // 10
    raw = simplify.simplify(v, f, target, workers=workers, repair=False)
    assert (edge_counts(raw[1]) > 2).sum() > 50
    v2, f2 = simplify.simplify(v, f, target, workers=workers)
    f2, _ = glb.orient_faces(v2, f2)
    assert_closed_oriented_manifold(v2, f2)
    # the repair drops the coincident face pairs of collapsed fins (zero area), up to about a fifth here
    assert 0.75 * target <= len(f2) <= target
    assert hausdorff_voxels(v2, f2, v, f, G) < 1.5


def test_pairs_that_land_in_one_fan_swap_partners():
    # on the decimated bowl, pairing the faces around each shared edge as sheets is not enough: a few
    # edges keep two pairs in the same fans at both ends until the pairs swap partners
    G = 64
    v, f, _ = dual_grid_mesh(lambda p: np.maximum(np.abs(np.linalg.norm(p, axis=-1) - 0.35) - 0.7 / G, p[..., 1]), G)
    v, f = oriented(v, f)
    rv, rf = simplify.simplify(v, f, len(f) // 10, workers=1, repair=False)
    _, f0 = simplify.make_manifold(rv, rf, max_rounds=0)
    assert (edge_counts(f0) > 2).any()
    v1, f1 = simplify.make_manifold(rv, rf)
    f1, _ = glb.orient_faces(v1, f1)
    assert_closed_oriented_manifold(v1, f1)


def test_coincident_vertices_on_a_cut_are_told_apart(monkeypatch):
    # a repaired result holds coincident vertex copies (sheets that touch); decimating it again in
    # parts (as the export's second pass does) must keep them apart where a cut runs through them
    G = 64
    v, f, _ = dual_grid_mesh(lambda p: np.maximum(np.abs(np.linalg.norm(p, axis=-1) - 0.35) - 0.7 / G, p[..., 1]), G)
    v, f = oriented(v, f)
    v1, f1 = simplify.simplify(v, f, len(f) // 3, workers=1)
    f1, _ = glb.orient_faces(v1, f1)
    group, _ = glb._row_groups(v1.view(np.uint32))
    coincident = np.bincount(group)[group] > 1
    part = np.repeat(simplify.partition_faces(simplify.face_centroids(v1, f1), 2), 3)
    in_part = [np.bincount(f1.reshape(-1)[part == p], minlength=len(v1)) > 0 for p in (0, 1)]
    assert (coincident & in_part[0] & in_part[1]).any()  # the case happens on this input
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = {}
        v2, f2 = simplify.simplify(v1, f1, len(f1) // 3, workers=2, info=info)
    assert info["parts"] == 2
    f2, _ = glb.orient_faces(v2, f2)
    assert_closed_oriented_manifold(v2, f2)
    # without telling them apart, a part holding such a vertex on its cut could not find it again
    pieces, _ = simplify._pieces(f1, part[::3], 2, len(v1))
    p = next(i for i, piece in enumerate(pieces) if coincident[piece[1][piece[3]]].any())
    fid, used, local, locked = pieces[p]
    assert simplify._decimate_part(v1[used], local, len(fid) // 3, 7.0, locked)[2] is not None
    monkeypatch.setattr(simplify, "_separate_coincident", lambda x: x)
    assert simplify._decimate_part(v1[used], local, len(fid) // 3, 7.0, locked)[2] is None


def test_open_mesh_keeps_its_holes_and_stays_manifold():
    G = 64
    v, f, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.35), G)
    v, f = oriented(v, f)
    c = v[f].mean(axis=1)
    # two round holes, one on each side of the median cut across x
    holes = (np.linalg.norm(c - np.array([0.3, 0.0, 0.0]) * (0.35 / 0.3), axis=1) < 0.12) | \
            (np.linalg.norm(c - np.array([0.0, 0.35, 0.0]), axis=1) < 0.1)
    v, f = glb._compact(v, f[~holes])
    counts = edge_counts(f)
    assert (counts == 1).sum() > 0 and counts.max() == 2
    target = len(f) // 8
    v2, f2 = simplify.simplify(v, f, target, workers=2)
    counts2 = edge_counts(f2)
    assert counts2.max() == 2 and (counts2 == 1).sum() > 0  # still open, never more than two faces an edge
    assert vertex_links_are_single_cycles(f2)
    _, info = glb.orient_faces(v2, f2)
    # the sphere stays one open piece (a collapse along a border can leave a lone triangle hanging
    # by a vertex, which the repair detaches)
    assert not info["closed"].any() and np.bincount(info["components"]).max() >= 0.99 * len(f2)
    assert 0.97 * target <= len(f2) <= target
    assert hausdorff_voxels(v2, f2, v, f, G) < 1.5


def test_cut_through_a_pinched_vertex_falls_back_to_serial(monkeypatch):
    # two spheres welded at one vertex, one per part: that vertex is interior to both parts (not on
    # their borders), so a part may move it; the parallel path must notice and decimate serially
    G = 48
    va, fa, _ = dual_grid_mesh(lambda p: sphere_sdf(p, 0.2, (-0.21, 0.0, 0.0)), G)
    va, fa = oriented(va, fa)
    vb = va * np.array([-1.0, 1.0, 1.0], dtype=np.float32)
    fb = fa[:, ::-1]
    ia, ib = int(np.argmax(va[:, 0])), int(np.argmin(vb[:, 0]))
    vb = vb - (vb[ib] - va[ia])  # the two extreme vertices coincide
    v = np.concatenate([va, vb])
    f = np.concatenate([fa, fb + len(va)])
    f[f == len(va) + ib] = ia
    v, f = glb._compact(v, f)
    monkeypatch.setattr(simplify, "partition_faces",
                        lambda centroid, parts: (np.arange(len(centroid)) >= len(fa)).astype(np.int64))
    target = len(f) // 6
    pieces, shared = simplify._pieces(f, simplify.partition_faces(v[f].mean(axis=1), 2), 2, len(v))
    assert shared.sum() == 1
    fid, used, local, locked = pieces[0]
    assert simplify._decimate_part(v[used], local, len(fid) // 6, 7.0, locked)[2] is None  # it moved
    with pytest.warns(RuntimeWarning, match="non-manifold vertex.*simplifying serially"):
        _, f2 = simplify.simplify(v, f, target, workers=2)
    assert 0.97 * target <= len(f2) <= target
    assert (edge_counts(f2) == 2).all()


def test_a_worker_that_dies_mid_job_means_serial_this_time(mug, monkeypatch):
    v, f, _ = mug
    target = len(f) // 6
    expected = simplify.simplify(v, f, target, workers=1)
    real_receive = simplify._Worker.receive

    def die_then_receive(self):
        self.proc.kill()
        self.proc.wait()
        return real_receive(self)

    monkeypatch.setattr(simplify._Worker, "receive", die_then_receive)
    with pytest.warns(RuntimeWarning, match="EOFError.*simplifying serially"):
        out = simplify.simplify(v, f, target, workers=2)
    assert np.array_equal(out[0], expected[0]) and np.array_equal(out[1], expected[1])
    monkeypatch.setattr(simplify._Worker, "receive", real_receive)
    info = {}
    simplify.simplify(v, f, target, workers=2, info=info)  # fresh workers next time
    assert info["parts"] == 2


def test_threads_share_the_workers_one_at_a_time(mug):
    import threading

    v, f, _ = mug
    target = len(f) // 6
    expected = simplify.simplify(v, f, target, workers=2)
    results = [None] * 3

    def run(i):
        results[i] = simplify.simplify(v, f, target, workers=2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert np.array_equal(r[0], expected[0]) and np.array_equal(r[1], expected[1])


# --------------------------------------------------------------------------------------------------
# make_manifold on hand-made configurations


def tetra(offset=(0.0, 0.0, 0.0)):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32) + np.asarray(offset, np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]], dtype=np.int64)
    return v, f


def test_make_manifold_splits_an_edge_shared_by_four_faces():
    # two tetrahedra glued along edge (0,1) only: that edge has four faces
    v1, f1 = tetra()
    v2 = v1.copy()
    v2[2:] *= -1  # the other two corners mirrored through the edge
    v = np.concatenate([v1, v2[2:]])
    f2 = f1[:, ::-1].copy()  # mirroring flips the winding; flip back to outward
    f2 = np.where(f2 >= 2, f2 + 2, f2)
    f = np.concatenate([f1, f2])
    assert (edge_counts(f) == 4).sum() == 1
    v3, f3 = simplify.make_manifold(v, f)
    assert len(f3) == 8 and len(v3) == 8  # the edge's two vertices now have a copy per tetrahedron
    assert_closed_oriented_manifold(v3, f3)
    _, info = glb.orient_faces(v3, f3)
    assert len(np.unique(info["components"])) == 2


def test_make_manifold_cancels_coincident_faces():
    v, f = tetra()  # f[0] = (0, 2, 1)
    # two more copies of face {0,1,2}: three in all, a pair cancels and the tetrahedron's own face stays
    v2, f2 = simplify.make_manifold(v, np.concatenate([f, [[0, 1, 2], [1, 0, 2]]]))
    assert np.array_equal(f2, f)
    assert_closed_oriented_manifold(v2, f2)
    # one more copy: the pair cancels, leaving the open tetrahedron
    _, f3 = simplify.make_manifold(v, np.concatenate([f, [[0, 1, 2]]]))
    assert np.array_equal(f3, f[1:]) and (edge_counts(f3) == 1).sum() == 3


def test_make_manifold_leaves_a_manifold_mesh_alone(mug):
    v, f, _ = mug
    v2, f2 = simplify.make_manifold(v, f)
    assert np.array_equal(v2, v) and np.array_equal(f2, f)


def test_partition_is_balanced_and_spatial():
    rng = np.random.default_rng(1)
    p = rng.random((10_001, 3)) * np.array([4.0, 1.0, 1.0])
    for k in (2, 3, 5, 16):
        lab = simplify.partition_faces(p, k)
        sizes = np.bincount(lab, minlength=k)
        assert len(sizes) == k and sizes.max() - sizes.min() <= k
    lab = simplify.partition_faces(p, 2)
    assert p[lab == 0, 0].max() <= p[lab == 1, 0].min()  # cut across the longest side
