"""FlexiDualGrid mesh extraction: golden parity (fdg_to_mesh), a naive per-quad loop written from
golden README §3.4 on random dyadic inputs, and closedness on closed surfaces."""
from collections import Counter

import pytest
import torch

from pixal3d_rt.mesh.fdg import flexible_dual_grid_to_mesh

from golden_fixtures import golden

AABB = [[-0.5] * 3, [0.5] * 3]
OFFSETS = [
    [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)],
    [(0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)],
    [(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)],
]


def load_golden(name: str):
    from pixal3d_rt.tools.parity import load_fixture

    return load_fixture(golden(f"{name}.json"))


def test_golden_fdg_to_mesh():
    import pixal3d_rt.tools.parity_decoders  # noqa: F401  (registers the runner)
    from pixal3d_rt.tools.parity import check_fixture

    ok, comps, err = check_fixture(load_golden("fdg_to_mesh"))
    assert ok, err or [c for c in comps if not c.ok]


def naive_mesh(coords, dual, flags, weights, grid):
    """Per-quad loop from the README: lookups with the bounds check first, quads in row order."""
    index = {tuple(r): i for i, r in enumerate(coords.tolist())}
    vs = ((coords.double() + dual.double()) / grid - 0.5).tolist()
    quads = []
    for i, c in enumerate(coords.tolist()):
        for a in range(3):
            if not flags[i, a]:
                continue
            rows = []
            for o in OFFSETS[a]:
                p = tuple(c[k] + o[k] for k in range(3))
                rows.append(index.get(p, -1) if all(0 <= v < grid for v in p) else -1)
            if min(rows) >= 0:
                quads.append(rows)

    def cross(u, v):
        return [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]

    def sub(p, q):
        return [p[k] - q[k] for k in range(3)]

    def align(t):
        na = cross(sub(vs[t[1]], vs[t[0]]), sub(vs[t[2]], vs[t[0]]))
        nb = cross(sub(vs[t[2]], vs[t[1]]), sub(vs[t[3]], vs[t[1]]))
        return abs(sum(na[k] * nb[k] for k in range(3)))

    faces = []
    for q in quads:
        s02 = [q[0], q[1], q[2], q[0], q[2], q[3]]
        s13 = [q[0], q[1], q[3], q[3], q[1], q[2]]
        if weights is None:
            pick02 = align(s02) > align(s13)
        else:
            w = weights.reshape(-1).tolist()
            pick02 = w[q[0]] * w[q[2]] > w[q[1]] * w[q[3]]
        t = s02 if pick02 else s13
        faces += [t[0:3], t[3:6]]
    return torch.tensor(quads, dtype=torch.int32).reshape(-1, 4), torch.tensor(faces, dtype=torch.int32).reshape(-1, 3)


def lattice(grid: int, p_occ: float, p_flag: float, seed: int):
    """Dyadic edge cases: shuffled rows, exact ties, degenerate quads, edges leaving the grid."""
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(grid**3, generator=g) < p_occ
    flat = occ.nonzero()[:, 0]
    flat = flat[torch.randperm(flat.numel(), generator=g)]
    coords = torch.stack([flat // grid**2, (flat // grid) % grid, flat % grid], 1).int()
    n = coords.shape[0]
    dual = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (n, 3), generator=g)]
    flags = torch.rand(n, 3, generator=g) < p_flag
    weights = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (n, 1), generator=g)]
    return coords, dual, flags, weights


@pytest.mark.parametrize("edge_chunk", [None, 7], ids=["one_chunk", "chunks_of_7"])
@pytest.mark.parametrize("grid,p_occ,p_flag,seed", [(8, 0.8, 0.5, 0), (4, 0.9, 0.7, 1), (8, 0.3, 0.9, 2), (2, 1.0, 1.0, 3)])
def test_matches_naive_loop(grid, p_occ, p_flag, seed, edge_chunk, monkeypatch):
    if edge_chunk:  # flagged edges looked up in many chunks, the last one short
        monkeypatch.setattr("pixal3d_rt.mesh.fdg.EDGE_CHUNK", edge_chunk)
    coords, dual, flags, weights = lattice(grid, p_occ, p_flag, seed)
    for w in (weights, None):
        v, f, q = flexible_dual_grid_to_mesh(coords, dual, flags, w, aabb=AABB, grid_size=grid, return_quads=True)
        want_q, want_f = naive_mesh(coords, dual, flags, w, grid)
        assert v.dtype == torch.float32 and v.shape == (coords.shape[0], 3)
        torch.testing.assert_close(v.double(), (coords.double() + dual.double()) / grid - 0.5, rtol=0, atol=1e-7)
        assert f.dtype == torch.int32 and q.dtype == torch.int32
        assert torch.equal(q, want_q)
        assert torch.equal(f, want_f)


def test_empty_inputs():
    coords = torch.empty(0, 3, dtype=torch.int32)
    v, f = flexible_dual_grid_to_mesh(coords, torch.empty(0, 3), torch.empty(0, 3, dtype=torch.bool), torch.empty(0, 1), aabb=AABB, grid_size=16)
    assert v.shape == (0, 3) and f.shape == (0, 3) and f.dtype == torch.int32
    coords = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    v, f = flexible_dual_grid_to_mesh(coords, torch.full((1, 3), 0.5), torch.ones(1, 3, dtype=torch.bool), None, aabb=AABB, grid_size=16)
    assert f.shape == (0, 3)


def assert_closed(faces: torch.Tensor):
    edges = Counter()
    for a, b, c in faces.tolist():
        assert len({a, b, c}) == 3
        for e in ((a, b), (b, c), (c, a)):
            edges[tuple(sorted(e))] += 1
    assert edges and set(edges.values()) == {2}


def test_golden_torus_is_closed():
    fx = load_golden("fdg_to_mesh")
    inp = {k[len("torus.") :]: v for k, v in fx.inp.items() if k.startswith("torus.")}
    for w in (inp["split_weight"], None):
        _, faces = flexible_dual_grid_to_mesh(inp["coords"], inp["dual_vertices"], inp["intersected"], w, aabb=AABB, grid_size=int(inp["grid_size"]))
        assert faces.shape[0] == 2 * inp["coords"].shape[0]  # closed genus-1 quad mesh: #quads = #voxels
        assert_closed(faces)


def surface_nets(sdf, grid: int, seed: int):
    """Voxels (shuffled rows) whose corners change sign, dual vertex = mean crossing point, flags on the
    a-edge at the cell's upper corner in the two other axes (o_voxel's encoder convention)."""
    t = (torch.arange(grid + 1, dtype=torch.float64) / grid) - 0.5
    X, Y, Z = torch.meshgrid(t, t, t, indexing="ij")
    s = sdf(X, Y, Z)
    sign = s > 0
    corners = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    cs = torch.stack([sign[i : i + grid, j : j + grid, k : k + grid] for i, j, k in corners], -1)
    cells = (cs.any(-1) & ~cs.all(-1)).nonzero()
    cells = cells[torch.randperm(cells.shape[0], generator=torch.Generator().manual_seed(seed))]
    dual = []
    for x, y, z in cells.tolist():
        pts = []
        for a in range(3):
            for u in (0, 1):
                for v in (0, 1):
                    p0 = [x, y, z]
                    others = [d for d in range(3) if d != a]
                    p0[others[0]] += u
                    p0[others[1]] += v
                    p1 = list(p0)
                    p1[a] += 1
                    s0, s1 = float(s[tuple(p0)]), float(s[tuple(p1)])
                    if (s0 > 0) != (s1 > 0):
                        f = s0 / (s0 - s1)
                        pts.append([p0[d] - [x, y, z][d] + (f if d == a else 0.0) for d in range(3)])
        dual.append(torch.tensor(pts).mean(0))
    c = cells
    flags = torch.stack(
        [
            sign[c[:, 0], c[:, 1] + 1, c[:, 2] + 1] != sign[c[:, 0] + 1, c[:, 1] + 1, c[:, 2] + 1],
            sign[c[:, 0] + 1, c[:, 1], c[:, 2] + 1] != sign[c[:, 0] + 1, c[:, 1] + 1, c[:, 2] + 1],
            sign[c[:, 0] + 1, c[:, 1] + 1, c[:, 2]] != sign[c[:, 0] + 1, c[:, 1] + 1, c[:, 2] + 1],
        ],
        1,
    )
    return cells.int(), torch.stack(dual).float(), flags


def test_sphere_is_closed():
    grid = 14
    coords, dual, flags = surface_nets(lambda x, y, z: (x - 0.03) ** 2 + (y + 0.02) ** 2 + z**2 - 0.33**2, grid, seed=0)
    weights = torch.nn.functional.softplus(torch.randn(coords.shape[0], 1, generator=torch.Generator().manual_seed(1)))
    for w in (weights, None):
        _, faces = flexible_dual_grid_to_mesh(coords, dual, flags, w, aabb=AABB, grid_size=grid)
        assert faces.shape[0] == 2 * int(flags.sum())  # every flagged edge of a closed surface is a quad
        assert_closed(faces)


def test_three_quads_cross_without_dim():
    """README §3.4: upstream's torch.cross without dim uses the quad axis when there are exactly 3 quads."""
    import warnings

    coords, dual0, flags, _ = lattice(4, 1.0, 1.0, seed=4)
    _, _, q_all = flexible_dual_grid_to_mesh(coords, dual0, flags, None, aabb=AABB, grid_size=4, return_quads=True)
    # flags of the first three quads only: one flag per quad, in emission order
    flat = flags.reshape(-1).nonzero()[:, 0]
    first = []
    for k in flat.tolist():
        one = torch.zeros(flags.numel(), dtype=torch.bool)
        one[k] = True
        if flexible_dual_grid_to_mesh(coords, dual0, one.reshape(-1, 3), None, aabb=AABB, grid_size=4)[1].shape[0]:
            first.append(k)
        if len(first) == 3:
            break
    keep = torch.zeros(flags.numel(), dtype=torch.bool)
    keep[first] = True
    keep = keep.reshape(-1, 3)

    def rule(v, quads, dim):
        t02, t13 = quads[:, [0, 1, 2, 0, 2, 3]].long(), quads[:, [0, 1, 3, 3, 1, 2]].long()

        def align(t):
            na = torch.linalg.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]], dim=dim)
            nb = torch.linalg.cross(v[t[:, 2]] - v[t[:, 1]], v[t[:, 3]] - v[t[:, 1]], dim=dim)
            return (na * nb).sum(dim=1, keepdim=True).abs()

        return torch.where(align(t02) > align(t13), t02, t13).reshape(-1, 3).int()

    dual = torch.rand(dual0.shape, generator=torch.Generator().manual_seed(6))
    q0, q1 = q_all[0, 0].item(), q_all[0, 1].item()
    dual[q1] = (coords[q0] - coords[q1]).float() + dual[q0]  # P[q1] = P[q0]: quad 0's triangle (q0,q1,q2) degenerate
    v, faces, quads = flexible_dual_grid_to_mesh(coords, dual, keep, None, aabb=AABB, grid_size=4, return_quads=True)
    assert quads.shape[0] == 3 and torch.equal(quads, q_all[:3])
    with warnings.catch_warnings():  # upstream's call, torch.cross without dim, equals dim=0 here
        warnings.simplefilter("ignore")
        t = quads[:, [0, 1, 2]].long()
        assert torch.equal(torch.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]]), torch.linalg.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]], dim=0))
    assert not torch.equal(rule(v, quads, dim=0), rule(v, quads, dim=-1))  # the quirk matters here
    assert torch.equal(faces, rule(v, quads, dim=0))
