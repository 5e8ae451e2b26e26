"""Submanifold conv reference (kernels/subm_conv.py) against a naive per-voxel loop written from the
formula of golden README §3.2, and against dense conv3d on a fully occupied grid."""
import pytest
import torch
import torch.nn.functional as F

from pixal3d_rt.kernels.subm_conv import build_neighbor_map, neighbor_table, subm_conv3d


def random_coords(n_per_batch: list[int], extent: int, seed: int, offset: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(n_per_batch):
        flat = torch.randperm(extent**3, generator=g)[:n]
        xyz = torch.stack([flat // extent**2, (flat // extent) % extent, flat % extent], dim=1) + offset
        xyz = xyz[torch.argsort(flat)]  # lexicographic within the batch item, as argwhere gives
        rows.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    if not rows:
        return torch.empty(0, 4, dtype=torch.int32)
    return torch.cat(rows).int()


def naive_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    index = {tuple(r): i for i, r in enumerate(coords.tolist())}
    out = torch.full((coords.shape[0], 27), -1, dtype=torch.int64)
    for n, (b, x, y, z) in enumerate(coords.tolist()):
        for a in range(3):
            for bb in range(3):
                for c in range(3):
                    out[n, 9 * a + 3 * bb + c] = index.get((b, x + a - 1, y + bb - 1, z + c - 1), -1)
    return out


def naive_conv(feats, coords, weight, bias):
    """out[n] = bias + sum_{a,b,c} W[:, a, b, c, :] @ in[idx(b_n, x_n+a-1, y_n+b-1, z_n+c-1)] in float64."""
    index = {tuple(r): i for i, r in enumerate(coords.tolist())}
    f, w = feats.double(), weight.double()
    out = torch.zeros(coords.shape[0], weight.shape[0], dtype=torch.float64)
    for n, (b, x, y, z) in enumerate(coords.tolist()):
        acc = bias.double().clone() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        for a in range(3):
            for bb in range(3):
                for c in range(3):
                    m = index.get((b, x + a - 1, y + bb - 1, z + c - 1))
                    if m is not None:
                        acc += w[:, a, bb, c, :] @ f[m]
        out[n] = acc
    return out


CASES = [
    ([0], 4),  # N = 0
    ([1], 3),  # N = 1: only the centre tap
    ([37], 5),
    ([13, 29, 1], 4),  # several batch items, each its own neighbourhood
    ([61], 9),
]


@pytest.mark.parametrize("sizes,extent", CASES)
def test_neighbor_map_matches_naive(sizes, extent):
    coords = random_coords(sizes, extent, seed=sum(sizes) + extent, offset=3)
    nmap = build_neighbor_map(coords)
    assert nmap.shape == (coords.shape[0], 27)
    assert torch.equal(nmap.long(), naive_neighbor_map(coords))


@pytest.mark.parametrize("chunk", [1, 7, 23, 1000])
def test_neighbor_table_rows_in_chunks(chunk):
    # the decoders' finest level takes its map in row chunks from the table: the chunks, in order, are the map
    coords = random_coords([37, 61, 5], 6, seed=4, offset=2)
    coords = coords[torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(5))]
    table = neighbor_table(coords)
    got = torch.cat([table.rows(s, min(table.n, s + chunk)) for s in range(0, table.n, chunk)])
    assert got.dtype == torch.int32 and torch.equal(got.long(), naive_neighbor_map(coords))
    assert table.rows(10, 10).shape == (0, 27)


def test_neighbor_map_row_order_and_large_coords():
    # shuffled rows, coordinates near 1023 and at 0: keys must not alias across rows/axes/batches
    coords = random_coords([40, 40], 6, seed=1)
    coords[:, 1:] = coords[:, 1:] * torch.tensor([1, 200, 3]).int() + torch.tensor([0, 0, 1000]).int() * (coords[:, 1:2] % 2)
    coords = coords[torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(2))]
    assert torch.equal(build_neighbor_map(coords).long(), naive_neighbor_map(coords))


def test_batches_do_not_see_each_other():
    # identical voxels in two batch items: each only sees its own copy
    xyz = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0]])
    coords = torch.cat([torch.cat([torch.full((3, 1), b), xyz], 1) for b in range(2)]).int()
    nmap = build_neighbor_map(coords)
    assert ((nmap[:3] < 3) & (nmap[:3] >= -1)).all() and ((nmap[3:] >= 3) | (nmap[3:] == -1)).all()


@pytest.mark.parametrize("sizes,extent", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_subm_conv_matches_naive(sizes, extent, with_bias):
    g = torch.Generator().manual_seed(7)
    coords = random_coords(sizes, extent, seed=extent, offset=1)
    ci, co = 5, 3
    feats = torch.randn(coords.shape[0], ci, generator=g)
    weight = torch.randn(co, 3, 3, 3, ci, generator=g)
    bias = torch.randn(co, generator=g) if with_bias else None
    nmap = build_neighbor_map(coords)
    want = naive_conv(feats, coords, weight, bias)
    for chunk in (None, 1, 4):
        got = subm_conv3d(feats, nmap, weight, bias, chunk=chunk)
        assert got.shape == (coords.shape[0], co) and got.dtype == feats.dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_subm_conv_row_subset():
    coords = random_coords([50], 5, seed=3)
    g = torch.Generator().manual_seed(4)
    feats, weight, bias = torch.randn(50, 4, generator=g), torch.randn(6, 3, 3, 3, 4, generator=g), torch.randn(6, generator=g)
    nmap = build_neighbor_map(coords)
    full = subm_conv3d(feats, nmap, weight, bias)
    torch.testing.assert_close(subm_conv3d(feats, nmap[10:23], weight, bias), full[10:23])


def test_dense_grid_equals_conv3d():
    # fully occupied grid: the submanifold conv is conv3d (correlation, zero padding) with the
    # [Co, 3, 3, 3, Ci] weight permuted to torch's [Co, Ci, 3, 3, 3]
    g = torch.Generator().manual_seed(5)
    r, ci, co = 4, 3, 2
    dense = torch.randn(1, ci, r, r, r, generator=g)
    weight = torch.randn(co, 3, 3, 3, ci, generator=g)
    bias = torch.randn(co, generator=g)
    xyz = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(r**3, 1, dtype=torch.long), xyz], 1).int()
    feats = dense[0].permute(1, 2, 3, 0).reshape(-1, ci)
    got = subm_conv3d(feats, build_neighbor_map(coords), weight, bias)
    want = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), bias, padding=1)[0].permute(1, 2, 3, 0).reshape(-1, co)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
