"""Narrow-band dual-contouring remesh (mesh/remesh.py) and the grid nearest-triangle query
(mesh/project.py): closedness, manifoldness, orientation and distance to the input on awkward inputs;
the query against an all-pairs reference and trimesh's closest point."""
import numpy as np
import pytest
import torch

from pixal3d_rt.mesh import glb
from pixal3d_rt.mesh.project import TriangleGrid, closest_on_triangles, closest_points, closest_points_brute
from pixal3d_rt.mesh.remesh import remesh_narrow_band_dc
from test_glb import dual_grid_mesh, sphere_sdf

G = 20


def _sphere(r=0.3, c=(0.0, 0.0, 0.0), grid=G):
    v, f, _ = dual_grid_mesh(lambda p: sphere_sdf(p, r, c), grid)
    return v, f.astype(np.int64)


def _sheet(z=0.05, half=0.3, step=1 / G, wave=0.0):
    """An open square sheet (a wall of zero thickness), optionally bent."""
    n = int(round(2 * half / step)) + 1
    s = np.linspace(-half, half, n)
    x, y = np.meshgrid(s, s, indexing="ij")
    zz = z + wave * np.sin(6 * x)
    v = np.stack([x, y, zz], -1).reshape(-1, 3).astype(np.float32)
    i = np.arange(n - 1)[:, None] * n + np.arange(n - 1)[None, :]
    i = i.reshape(-1)
    f = np.concatenate([np.stack([i, i + n, i + n + 1], 1), np.stack([i, i + n + 1, i + 1], 1)])
    return v, f.astype(np.int64)


def _concat(*meshes):
    vs, fs, off = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def _with_hole(v, f, z_cut=0.15):
    """The sphere with its cap above z_cut removed: a hole far wider than the band."""
    keep = v[f].mean(1)[:, 2] < z_cut
    return v, f[keep]


def _soup(seed, n=60, grid=G):
    """Random small triangles, crossing and touching: the band merges in every way."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 1, 3, generator=g) * 0.7 - 0.35
    v = (c + torch.randn(n, 3, 3, generator=g) * 0.8 / grid).reshape(-1, 3)
    return v.numpy(), np.arange(3 * n).reshape(n, 3)


def _surface_checks(v, f):
    v, f = v.numpy().astype(np.float64), f.numpy()
    assert len(f) > 0
    _, _, count, _ = glb._edge_table(f, len(v))
    assert (count == 2).all(), "every edge in exactly two triangles (closed, edge-manifold)"
    e = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    directed = e[:, 0] * len(v) + e[:, 1]
    assert len(np.unique(directed)) == len(directed), "each edge used once in each direction (oriented)"
    assert len(np.unique(np.sort(f, 1), axis=0)) == len(f) and (np.sort(f, 1)[:, :2] != np.sort(f, 1)[:, 1:]).all()
    # vertex-manifold: the triangles around every vertex form one fan (one cycle of edges)
    corners = np.concatenate([f[:, [0, 1, 2]], f[:, [1, 2, 0]], f[:, [2, 0, 1]]])  # (vertex, next, prev)
    order = np.argsort(corners[:, 0], kind="stable")
    c = corners[order]
    starts = np.flatnonzero(np.r_[True, c[1:, 0] != c[:-1, 0]])
    for s, t in zip(starts, np.r_[starts[1:], len(c)]):
        nxt = dict(zip(c[s:t, 1], c[s:t, 2]))  # next -> prev walks around the vertex
        assert len(nxt) == t - s
        k, seen = c[s, 1], 0
        while True:
            k = nxt[k]
            seen += 1
            if k == c[s, 1] or seen > t - s:
                break
        assert seen == t - s, "one fan per vertex"
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert vol > 0, "the band's boundary faces out"
    return vol


def _samples(v, f, n, seed=0):
    rng = np.random.default_rng(seed)
    tri = np.asarray(v, np.float64)[np.asarray(f)]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(f), n, p=area / area.sum())
    r = rng.random((n, 2))
    flip = r.sum(1) > 1
    r[flip] = 1 - r[flip]
    t = tri[pick]
    return torch.from_numpy(t[:, 0] + r[:, :1] * (t[:, 1] - t[:, 0]) + r[:, 1:] * (t[:, 2] - t[:, 0]))


def _udf(points, v, f):
    # the grid query is exact within its cell (checked against all pairs below); 0.25 is several voxels
    d = closest_points(points.float(), torch.as_tensor(v).float(), torch.as_tensor(f), 0.25)[0].double()
    assert torch.isfinite(d).all()
    return d


INPUTS = {
    "sphere": lambda: _sphere(),
    "thin_wall": lambda: _sheet(wave=0.04),
    "components": lambda: _concat(_sphere(0.12, (-0.2, -0.2, 0.0)), _sphere(0.1, (0.22, 0.2, 0.1)), _sheet(z=-0.3, half=0.15)),
    "hole_larger_than_band": lambda: _with_hole(*_sphere()),
    "soup": lambda: _soup(1),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_remesh_is_closed_manifold_oriented_and_within_a_voxel_of_the_band(name):
    v, f = INPUTS[name]()
    tm = {}
    rv, rf = remesh_narrow_band_dc(torch.from_numpy(v), torch.from_numpy(f), G, timings=tm)
    _surface_checks(rv, rf)
    h = (G + 3) / G / G  # the remesh grid's cell
    eps = h  # band = 1 cell: the surface upstream targets is udf = eps
    out = _samples(rv.numpy(), rf.numpy(), 1500)
    d_out = _udf(out, v, f)
    assert (d_out - eps).abs().max() <= h, "output within one voxel of the band's boundary"
    d_in = _udf(_samples(v, f, 800, seed=1), rv.numpy(), rf.numpy())
    assert d_in.max() <= eps + h, "every input point within one voxel of the band's boundary"


def test_remesh_components_and_hole_topology():
    """Two spheres and a sheet: five closed shells (each sphere's outer and inner offset, the sheet's
    slab); the holed sphere: one shell wrapping the rim."""
    for name, expect in (("components", 5), ("hole_larger_than_band", 1)):
        v, f = INPUTS[name]()
        rv, rf = remesh_narrow_band_dc(torch.from_numpy(v), torch.from_numpy(f), G)
        _, info = glb.orient_faces(rv.numpy(), rf.numpy(), outward=False)
        assert len(np.unique(info["components"])) == expect, name
        assert info["flipped"] == 0  # already consistently wound


def test_remesh_makes_ambiguous_signs_manifold():
    """Random soups give faces and cells with diagonal sign patterns: they get repaired (flips > 0)
    and the result stays a manifold; the repair can be seen to matter."""
    flips = 0
    for seed in range(3):
        v, f = _soup(seed + 10)
        tm = {}
        rv, rf = remesh_narrow_band_dc(torch.from_numpy(v), torch.from_numpy(f), G, timings=tm)
        _surface_checks(rv, rf)
        flips += tm["remesh_flips"]
    assert flips > 0


def test_remesh_project_back_lands_on_the_input():
    v, f = _sheet(wave=0.04)
    rv, rf = remesh_narrow_band_dc(torch.from_numpy(v), torch.from_numpy(f), G, project_back=1.0)
    h = (G + 3) / G / G
    d = _udf(rv.double(), v, f)
    assert d.max() <= 1e-5
    d_faces = _udf(_samples(rv.numpy(), rf.numpy(), 1000), v, f)
    assert d_faces.max() <= h


def test_remesh_of_the_decoded_tiny_mesh(tiny_mesh):
    v, f, res = tiny_mesh
    rv, rf = remesh_narrow_band_dc(v, f, res)
    _surface_checks(rv, rf)
    h = (res + 3) / res / res
    d = _udf(_samples(rv.numpy(), rf.numpy(), 600), v, f)
    assert (d - h).abs().max() <= h


@pytest.fixture(scope="module")
def tiny_mesh():
    """The tiny preset's decoded mesh (random weights: an awkward surface), cut to a corner of the box."""
    from pixal3d_rt import Pipeline

    r = Pipeline.from_preset("tiny").run("examples/mug.png", resolution=512, steps=1)
    v, f = r.vertices.float(), r.faces.long()
    keep = (v[f].mean(1) < v.mean(0) + 0.15 * (v.amax(0) - v.amin(0))).all(1)
    return v, f[keep], r.resolution


# ---------------------------------------------------------------------------------------------------
# nearest triangle


def test_closest_on_triangles_matches_trimesh():
    trimesh = pytest.importorskip("trimesh")
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3000, 3, generator=g, dtype=torch.float64) for _ in range(3))
    c[:50] = a[:50] + 2 * (b[:50] - a[:50])  # collinear
    b[50:100] = a[50:100]  # two corners equal
    p = torch.randn(3000, 3, generator=g, dtype=torch.float64) * 2
    d2, bc = closest_on_triangles(p, a, b, c)
    q = trimesh.triangles.closest_point(torch.stack([a, b, c], 1).numpy(), p.numpy())
    assert np.allclose(d2.numpy(), ((q - p.numpy()) ** 2).sum(1), atol=1e-9)
    mine = (bc[:, :, None] * torch.stack([a, b, c], 1)).sum(1)
    assert np.allclose(((mine - p) ** 2).sum(1).numpy(), d2.numpy(), atol=1e-9)
    assert (bc >= -1e-9).all() and torch.allclose(bc.sum(1), torch.ones(3000, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closest_points_matches_all_pairs_within_reach(seed):
    """Random small triangles and points; a small pair budget forces many slices."""
    g = torch.Generator().manual_seed(seed)
    cen = torch.rand(150, 1, 3, generator=g)
    v = (cen + 0.04 * torch.randn(150, 3, 3, generator=g)).reshape(-1, 3)
    f = torch.arange(450).view(150, 3)
    f[:5, 2] = f[:5, 1]  # degenerate triangles
    pts = torch.rand(2500, 3, generator=g) * 1.2 - 0.1
    cell = 0.08
    d, fi, bc = closest_points(pts, v, f, cell, max_pairs=20_000)
    dr, fr, _ = closest_points_brute(pts, v, f)
    near = dr < cell
    assert near.sum() > 500 and (~near).sum() > 100
    assert torch.allclose(d[near], dr[near], atol=1e-6)
    q = (bc[:, :, None] * v[f[fi.clamp_min(0)]]).sum(1)
    assert torch.allclose((q - pts).norm(dim=1)[near], dr[near], atol=1e-5)
    assert ((fi >= 0) | torch.isinf(d)).all() and (fi[near] >= 0).all()


def _buckets(v, f, cell, origin):
    """(key, triangle) pairs of every cell each triangle's box overlaps, sorted: the direct enumeration."""
    tri = v[f].double()
    lo = torch.floor((v[f].amin(1) - origin) / cell).long().tolist()
    hi = torch.floor((v[f].amax(1) - origin) / cell).long().tolist()
    base = [min(x[i] for x in lo) - 1 for i in range(3)]
    ext = [max(x[i] for x in hi) - base[i] + 2 for i in range(3)]
    pairs = sorted(((((x - base[0]) * ext[1] + y - base[1]) * ext[2] + z - base[2]), t)
                   for t in range(len(tri)) for x in range(lo[t][0], hi[t][0] + 1)
                   for y in range(lo[t][1], hi[t][1] + 1) for z in range(lo[t][2], hi[t][2] + 1))
    return [k for k, _ in pairs], [t for _, t in pairs]


@pytest.mark.parametrize("cell,chunk", [(0.08, 1 << 20), (0.08, 7), (0.03, 64)])
def test_triangle_grid_built_in_chunks_holds_every_overlapped_cell(cell, chunk):
    g = torch.Generator().manual_seed(0)
    v = (torch.rand(200, 1, 3, generator=g) + 0.05 * torch.randn(200, 3, 3, generator=g)).reshape(-1, 3)
    f = torch.arange(600).view(200, 3)
    grid = TriangleGrid(v, f, cell, chunk=chunk)
    keys, tris = _buckets(v, f, cell, grid.origin)
    assert grid.keys.tolist() == keys and grid.tris.tolist() == tris  # triangles ascending within a cell


def test_triangle_grid_too_wide_to_pack_pairs():
    """Two tiny triangles at opposite corners of a box of ~2e6 cells a side: the keys fit an int64,
    (key, triangle) packed into one would not, so the pairs are sorted unpacked."""
    v = torch.tensor([[0, 0, 0], [1e-6, 0, 0], [0, 1e-6, 0], [1, 1, 1], [1, 1 + 1e-6, 1], [1, 1, 1 + 1e-6]])
    f = torch.tensor([[3, 4, 5], [0, 1, 2]])
    cell = 1 / 2_000_000
    grid = TriangleGrid(v, f, cell)
    ex, ey, ez = grid.ext.tolist()
    assert ex * ey * ez < 2**63 <= ex * ey * ez * len(f)
    keys, tris = _buckets(v, f, cell, grid.origin)
    assert grid.keys.tolist() == keys and grid.tris.tolist() == tris
    d, fi, _ = closest_points(v[[0, 3]] + 1e-7, v, f, cell, grid=grid)
    assert fi.tolist() == [1, 0] and (d < 1e-6).all()
