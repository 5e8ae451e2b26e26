"""Triton submanifold conv (kernels/sparse_conv_triton.py) against the pure-torch reference, on CPU
under TRITON_INTERPRET=1, on random inputs of awkward sizes: N = 0 and 1, N not a multiple of the
tile, Ci/Co not multiples of the tile, several batch items, missing neighbours, rows with no
neighbour at all, row subsets of a map; plus the conv plan and the dispatch guards."""
import importlib
import os

import pytest
import torch

# On a GPU machine the kernel tests run compiled on the GPU; elsewhere under Triton's interpreter,
# which must be chosen before the kernel module is imported (it decides jit vs interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from pixal3d_rt.kernels import subm_conv  # noqa: E402
from pixal3d_rt.kernels.subm_conv import build_neighbor_map_reference, subm_conv3d_reference  # noqa: E402


def kernel_module():
    mod = importlib.import_module("pixal3d_rt.kernels.sparse_conv_triton")
    if not torch.cuda.is_available() and not mod._INTERPRETED:
        os.environ["TRITON_INTERPRET"] = "1"
        mod = importlib.reload(mod)  # imported earlier without the interpreter: redo the jit as interpreted
    return mod


def random_coords(n_per_batch, extent, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(n_per_batch):
        flat = torch.randperm(extent**3, generator=g)[:n]
        xyz = torch.stack([flat // extent**2, (flat // extent) % extent, flat % extent], dim=1) + 5
        rows.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(rows).int() if rows else torch.empty(0, 4, dtype=torch.int32)


def run_on_device(fn, *tensors, **kw):
    """fn on DEVICE copies of the tensor arguments (None passes through); result back on the CPU."""
    moved = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]
    return fn(*moved, **kw).cpu()


def rel_l2(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def reference_fp64(feats, nmap, weight, bias):
    """The reference on the same (already rounded) half-precision values, in float64."""
    return subm_conv3d_reference(feats.double(), nmap, weight.double(), None if bias is None else bias.double())


SMALL_TILE = dict(block_m=32, block_n=16, block_k=16, num_warps=1, num_stages=1)
# (batch sizes, extent, Ci, Co, tile): N = 0, 1, below/above/not a multiple of the tile; odd channel
# counts; the table's tile (None) and a small one, so that several row, channel and Ci blocks occur.
# Kept small: the interpreter runs every (program, tap, Ci chunk) step in Python.
CASES = [
    ([0], 4, 8, 8, None),
    ([1], 3, 5, 3, None),
    ([1], 3, 5, 3, SMALL_TILE),
    ([45], 5, 24, 40, SMALL_TILE),
    ([40, 1, 26], 5, 17, 33, None),
    ([70], 7, 72, 20, None),
]


@pytest.mark.parametrize("sizes,extent,ci,co,tile", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_conv_matches_reference(sizes, extent, ci, co, tile, dtype):
    mod = kernel_module()
    g = torch.Generator().manual_seed(sum(sizes) * 31 + ci)
    coords = random_coords(sizes, extent, seed=ci + co)
    n = coords.shape[0]
    nmap = build_neighbor_map_reference(coords)
    feats = torch.randn(n, ci, generator=g).to(dtype)
    weight = (torch.randn(co, 3, 3, 3, ci, generator=g) / (3 * ci) ** 0.5).to(dtype)
    bias = torch.randn(co, generator=g).to(dtype)
    want = reference_fp64(feats, nmap, weight, bias)
    config = mod.TileConfig(**tile) if tile else None
    got = run_on_device(mod.subm_conv3d_triton, feats, nmap, weight, bias, config=config)
    assert got.shape == (n, co) and got.dtype == dtype
    assert torch.isfinite(got).all()
    if n:
        tol = 2e-3 if dtype == torch.float16 else 1e-2  # output rounding of one half-precision value
        assert rel_l2(got, want) < tol, rel_l2(got, want)


def test_no_bias_unsorted_rows_and_row_subset():
    mod = kernel_module()
    g = torch.Generator().manual_seed(3)
    coords = random_coords([60], 5, seed=4)
    nmap = build_neighbor_map_reference(coords)
    feats = torch.randn(60, 20, generator=g).half()
    weight = (torch.randn(12, 3, 3, 3, 20, generator=g) / 8).half()
    config = mod.TileConfig(**SMALL_TILE)
    want = reference_fp64(feats, nmap, weight, None)
    for sort_rows in (True, False):
        plan = mod.conv_plan(nmap.to(DEVICE), config.block_m, sort_rows=sort_rows)
        got = run_on_device(mod.subm_conv3d_triton, feats, nmap, weight, None, plan=plan, config=config)
        assert rel_l2(got, want) < 2e-3
    # a slice of the map (the decoder's chunks): rows 13..50 of the full result
    got = run_on_device(mod.subm_conv3d_triton, feats, nmap[13:51], weight, None, config=config)
    assert rel_l2(got, want[13:51]) < 2e-3


def test_rows_without_any_neighbour_get_the_bias():
    # a hand-made map: some rows have no tap at all (a whole block has none), others a few
    mod = kernel_module()
    g = torch.Generator().manual_seed(5)
    n, ci, co = 40, 16, 16
    nmap = torch.full((n, 27), -1, dtype=torch.int32)
    nmap[20:, 13] = torch.arange(20, 40, dtype=torch.int32)
    nmap[25:30, 0] = torch.arange(0, 5, dtype=torch.int32)
    feats = torch.randn(n, ci, generator=g).half()
    weight = torch.randn(co, 3, 3, 3, ci, generator=g).half() / 4
    bias = torch.randn(co, generator=g).half()
    got = run_on_device(mod.subm_conv3d_triton, feats, nmap, weight, bias, config=mod.TileConfig(**SMALL_TILE))
    assert torch.equal(got[:20], bias.expand(20, co))
    assert rel_l2(got, reference_fp64(feats, nmap, weight, bias)) < 2e-3


@pytest.mark.parametrize("sort_rows", [True, False])
def test_conv_plan_covers_every_row_and_tap(sort_rows):
    mod = kernel_module()
    coords = random_coords([77, 30], 6, seed=9)
    nmap = build_neighbor_map_reference(coords)
    bm = 16
    plan = mod.conv_plan(nmap.to(DEVICE), bm, sort_rows=sort_rows)
    plan = mod.ConvPlan(bm, plan.perm.cpu(), plan.taps.cpu(), plan.ntaps.cpu())
    r = nmap.shape[0]
    assert torch.equal(torch.sort(plan.perm.long()).values, torch.arange(r))
    nblocks = -(-r // bm)
    assert plan.taps.shape == (nblocks, 27) and plan.ntaps.shape == (nblocks,)
    for blk in range(nblocks):
        rows = plan.perm[blk * bm : (blk + 1) * bm].long()
        present = set(torch.nonzero((nmap[rows] >= 0).any(dim=0)).flatten().tolist())
        k = int(plan.ntaps[blk])
        assert plan.taps[blk, :k].tolist() == sorted(present)  # exactly the taps some row of the block has, ascending
    assert plan.taps_used() == int(plan.ntaps.sum())
    assert torch.equal(mod.neighbor_mask(nmap.to(DEVICE)).cpu(), ((nmap >= 0).int() << torch.arange(27, dtype=torch.int32)).sum(1, dtype=torch.int32))
    if sort_rows:  # sorted masks never make a block need more taps than the map's order does
        assert plan.taps_used() <= mod.conv_plan(nmap.to(DEVICE), bm, sort_rows=False).taps_used()


def test_tile_table_is_fixed_and_fits():
    mod = kernel_module()
    for ci, co in [(1024, 1024), (1024, 4096), (512, 2048), (256, 256), (128, 512), (64, 64), (5, 3), (17, 33)]:
        for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0), None]:
            c = mod.tile_config(ci, co, cap)
            assert c == mod.tile_config(ci, co, cap)
            assert c.block_k >= 16 and c.block_n >= 16 and c.block_m >= 16
            assert all(x & (x - 1) == 0 for x in (c.block_m, c.block_n, c.block_k))
            # operand tiles of the pipeline (fp16) inside a consumer GPU's ~99 KB of shared memory
            assert (c.num_stages - 1) * 2 * (c.block_m * c.block_k + c.block_k * c.block_n) <= 99 * 1024


def test_dispatch_guards_on_cpu_tensors(monkeypatch):
    coords = random_coords([30], 5, seed=1)
    nmap = subm_conv.build_neighbor_map(coords)
    assert torch.equal(nmap, build_neighbor_map_reference(coords))
    feats = torch.randn(30, 8).half()
    weight = torch.randn(4, 3, 3, 3, 8).half()
    assert not subm_conv.triton_conv_applies(feats, nmap, weight)  # CPU tensors: reference path
    assert not subm_conv.cuda_hash_applies(coords)
    assert subm_conv.conv_workspace_bytes_per_row(feats, nmap, weight) == 27 * 8 * 2
    torch.testing.assert_close(subm_conv.subm_conv3d(feats, nmap, weight), subm_conv3d_reference(feats, nmap, weight))
    for value, off in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("PIXAL3D_DISABLE_TRITON_SPCONV", value)
        assert subm_conv._disabled("PIXAL3D_DISABLE_TRITON_SPCONV") is off


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_paths_match_reference():
    coords = random_coords([3000, 500], 24, seed=2).cuda()
    want = build_neighbor_map_reference(coords)
    assert torch.equal(subm_conv.build_neighbor_map(coords), want)
    feats = torch.randn(coords.shape[0], 96, device="cuda").half()
    weight = (torch.randn(80, 3, 3, 3, 96, device="cuda") / 50).half()
    bias = torch.randn(80, device="cuda").half()
    got = subm_conv.subm_conv3d(feats, want, weight, bias)
    assert rel_l2(got.cpu(), reference_fp64(feats.cpu(), want.cpu(), weight.cpu(), bias.cpu())) < 2e-3
    table = subm_conv.neighbor_table(coords)
    assert isinstance(table, subm_conv.CudaHashTable)
    rows = torch.cat([table.rows(s, min(table.n, s + 777)) for s in range(0, table.n, 777)])
    assert torch.equal(rows, want)


def _tiny_decoders(seed: int):
    from pixal3d_rt.models.sc_vae import FlexiDualGridVaeDecoder, SparseUnetVaeDecoder

    args = {
        "model_channels": [32, 16, 16, 8],
        "latent_channels": 8,
        "num_blocks": [1, 2, 1, 0],  # the last level has no blocks: its head can be fused
        "block_type": ["SparseConvNeXtBlock3d"] * 4,
        "up_block_type": ["SparseResBlockC2S3d"] * 3,
        "block_args": [{"use_checkpoint": False}] * 4,
        "use_fp16": False,
    }
    torch.manual_seed(seed)
    shape = FlexiDualGridVaeDecoder(resolution=64, **args).eval()
    tex = SparseUnetVaeDecoder(out_channels=6, pred_subdiv=False, **args).eval()
    for m in (shape, tex):
        for p in m.parameters():  # no zero-initialised layer: every branch reaches the output
            p.data.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.2)
    return shape, tex


@pytest.mark.parametrize("chunk", [None, 150])
def test_decoder_fused_head_matches_separate_head(chunk):
    # the GPU path fuses the output head into the last up-block's conv chunks (fuse_head); same result
    from pixal3d_rt.models.sc_vae import NMAP_KEY
    from pixal3d_rt.models.sparse import SparseTensor

    shape, tex = _tiny_decoders(11)
    coords = random_coords([12, 5], 4, seed=12)
    latent = torch.randn(coords.shape[0], 8, generator=torch.Generator().manual_seed(13))
    outs = {}
    with torch.no_grad():
        for fuse in (False, True):
            for m in (shape, tex):
                m.fuse_head, m.chunk_size = fuse, chunk
            cache = {}
            h, subs = shape(SparseTensor(latent, coords), return_subs=True, cache=cache)
            # fused, the finest level's map is taken in row chunks and never kept for the texture decoder
            assert (NMAP_KEY in cache[len(subs)]) is not fuse and all(NMAP_KEY in cache[i] for i in range(len(subs)))
            t = tex(SparseTensor(latent, coords), guide_subs=subs, cache=cache)
            # a guide that keeps no child at the last step: the fused head must give [0, 6]
            empty = [s if i < len(subs) - 1 else SparseTensor(-torch.ones_like(s.feats), s.coords) for i, s in enumerate(subs)]
            e = tex(SparseTensor(latent, coords), guide_subs=empty)
            outs[fuse] = (h, t, e)
    (h0, t0, e0), (h1, t1, e1) = outs[False], outs[True]
    assert h0.feats.shape[0] > 100 and h0.feats.shape[1] == 7 and t0.feats.shape[1] == 6
    assert e1.feats.shape == e0.feats.shape == (0, 6)
    for a, b in ((h0, h1), (t0, t1)):
        assert torch.equal(a.coords, b.coords)
        torch.testing.assert_close(b.feats, a.feats, rtol=1e-5, atol=1e-5)
