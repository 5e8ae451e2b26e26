"""The three decoders: golden parity, full-size checkpoint schemas (meta device), neighbour-map reuse
between shape and texture decoder, chunking, batching, upsample/quantisation and fp16 conversion."""
import copy
import json

import numpy as np
import pytest
import torch

import pixal3d_rt.models.sc_vae as sc_vae
from pixal3d_rt.mesh.fdg import flexible_dual_grid_to_mesh
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.models.sc_vae import quantize_hr_coords
from pixal3d_rt.models.sparse import SparseTensor
from pixal3d_rt.models.ss_decoder import SparseStructureDecoder, occupancy_to_coords, pixel_shuffle_3d

from golden_fixtures import golden


def load_golden(name: str):
    from pixal3d_rt.tools.parity import load_fixture

    return load_fixture(golden(f"{name}.json"))


@pytest.mark.parametrize("name", ["ss_decoder", "shape_decoder", "tex_decoder"])
def test_golden_parity(name):
    import pixal3d_rt.tools.parity_decoders  # noqa: F401  (registers the runners)
    from pixal3d_rt.tools.parity import check_fixture

    with torch.no_grad():
        ok, comps, err = check_fixture(load_golden(name))
    assert ok, err or [c for c in comps if not c.ok]


@pytest.mark.parametrize("model", ["shape_dec_next_dc_f16c32_fp16", "tex_dec_next_dc_f16c32_fp16", "ss_dec_conv3d_16l8_fp16"])
def test_full_size_schema_on_meta(model):
    schema = json.loads(golden("schema", f"{model}.json").read_text())
    with torch.device("meta"):
        net = build_model(schema["config"])
    got = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()}
    want = {e["key"]: (e["shape"], e["dtype"]) for e in schema["state_dict"]}
    assert sorted(got) == sorted(want)
    assert got == want
    assert sum(p.numel() for p in net.parameters()) == schema["num_parameters"]


def tiny_config(pred_subdiv: bool, channels=(32, 16, 16, 8), blocks=(1, 2, 1, 0)):
    n = len(channels)
    args = {
        "model_channels": list(channels),
        "latent_channels": 8,
        "num_blocks": list(blocks),
        "block_type": ["SparseConvNeXtBlock3d"] * n,
        "up_block_type": ["SparseResBlockC2S3d"] * (n - 1),
        "block_args": [{"use_checkpoint": False}] * n,
        "use_fp16": False,
    }
    if pred_subdiv:
        return {"name": "FlexiDualGridVaeDecoder", "args": {"resolution": 64, **args}}
    return {"name": "SparseUnetVaeDecoder", "args": {"out_channels": 6, "pred_subdiv": False, **args}}


def tiny_models(seed=0):
    torch.manual_seed(seed)
    shape = build_model(tiny_config(True)).eval()
    tex = build_model(tiny_config(False)).eval()
    for m in (shape, tex):  # as the golden generator: no zero-initialised layer, every branch matters
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.data.normal_(0, p[0].numel() ** -0.5)
            elif ".norm" in name and name.endswith("weight"):
                p.data.normal_(1, 0.2)
            else:
                p.data.normal_(0, 0.2)
    return shape, tex


def random_latent(counts, grid, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        flat = torch.randperm(grid**3, generator=g)[:n].sort().values
        rows.append(torch.stack([torch.full_like(flat, b), flat // grid**2, (flat // grid) % grid, flat % grid], 1))
    coords = torch.cat(rows).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords)


def test_texture_decoder_reuses_shape_neighbor_maps(monkeypatch):
    shape, tex = tiny_models()
    x = random_latent([30], 6)
    builds = []
    real = sc_vae.build_neighbor_map
    monkeypatch.setattr(sc_vae, "build_neighbor_map", lambda c: builds.append(c.shape[0]) or real(c))
    with torch.no_grad():
        cache = {}
        h, subs = shape(x, return_subs=True, cache=cache)
        n_shape = len(builds)
        assert n_shape == len(shape.blocks)  # one map per level
        t_cached = tex(SparseTensor(x.feats, x.coords), guide_subs=subs, cache=cache)
        assert len(builds) == n_shape  # the texture decoder built none
        t_plain = tex(SparseTensor(x.feats, x.coords), guide_subs=subs)
        assert len(builds) == 2 * n_shape
    assert torch.equal(t_cached.coords, h.coords) and torch.equal(t_plain.coords, h.coords)
    assert torch.equal(t_cached.feats, t_plain.feats)


def test_cache_with_other_coords_is_rebuilt():
    shape, tex = tiny_models(1)
    x, other = random_latent([25], 6, seed=1), random_latent([25], 6, seed=2)
    with torch.no_grad():
        cache = {}
        shape(other, cache=cache)
        _, subs = shape(x, return_subs=True)
        want = tex(x, guide_subs=subs)
        got = tex(SparseTensor(x.feats, x.coords), guide_subs=subs, cache=cache)
    assert torch.equal(got.coords, want.coords) and torch.equal(got.feats, want.feats)
    assert torch.equal(cache[0]["coords"], x.coords)


def test_chunked_matches_unchunked():
    shape, tex = tiny_models(2)
    x = random_latent([20, 17], 6, seed=3)
    with torch.no_grad():
        h, subs = shape(x, return_subs=True)
        t = tex(x, guide_subs=subs)
        for m in (shape, tex):
            m.chunk_size = 37  # several chunks at every level, odd size
        h5, subs5 = shape(SparseTensor(x.feats, x.coords), return_subs=True)
        t5 = tex(SparseTensor(x.feats, x.coords), guide_subs=subs5)
    assert torch.equal(h5.coords, h.coords) and torch.equal(t5.coords, t.coords)
    for a, b in zip(subs5, subs):
        assert torch.equal(a.coords, b.coords)
        torch.testing.assert_close(a.feats, b.feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h5.feats, h.feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t5.feats, t.feats, rtol=1e-5, atol=1e-5)


def test_batch_equals_per_sample():
    shape, tex = tiny_models(3)
    x = random_latent([23, 31], 5, seed=4)
    with torch.no_grad():
        h, subs = shape(x, return_subs=True)
        t = tex(x, guide_subs=subs)
        start = 0
        for b, n in enumerate([23, 31]):
            xb = SparseTensor(x.feats[start : start + n], x.coords[start : start + n].clone())
            xb.coords[:, 0] = 0
            hb, subs_b = shape(xb, return_subs=True)
            tb = tex(xb, guide_subs=subs_b)
            rows = h.coords[:, 0] == b
            assert torch.equal(h.coords[rows, 1:], hb.coords[:, 1:])
            torch.testing.assert_close(h.feats[rows], hb.feats, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(t.feats[rows], tb.feats, rtol=1e-5, atol=1e-5)
            start += n
        per_sample = shape.mesh_inputs(h)
    assert [m.coords.shape[0] for m in per_sample] == [int((h.coords[:, 0] == b).sum()) for b in range(2)]
    assert per_sample[1].coords.shape[1] == 3 and per_sample[1].intersected.dtype == torch.bool


def test_upsample_gives_level_coordinates():
    shape, _ = tiny_models(4)
    x = random_latent([28], 6, seed=5)
    with torch.no_grad():
        h, subs = shape(x, return_subs=True)
        assert torch.equal(shape.upsample(x, 0), x.coords)
        for k in range(1, len(subs)):
            assert torch.equal(shape.upsample(x, k), subs[k].coords)
        assert torch.equal(shape.upsample(x, len(subs)), h.coords)


def test_quantize_hr_coords_numpy_reference():
    g = torch.Generator().manual_seed(6)
    coords = torch.cat([torch.randint(0, 2, (500, 1), generator=g), torch.randint(0, 128, (500, 3), generator=g)], 1).int()
    for r_dec, grid in [(128, 16), (128, 24), (512, 64), (512, 96)]:
        c = coords.numpy()
        q = np.round((c[:, 1:].astype(np.float32) + np.float32(0.5)) / np.float32(r_dec) * np.float32(grid - 1)).astype(np.int32)
        want = np.unique(np.concatenate([c[:, :1], q], 1), axis=0)
        got = quantize_hr_coords(coords, r_dec, grid)
        assert got.dtype == torch.int32
        assert np.array_equal(got.numpy(), want)


def test_shape_decoder_to_mesh_chain():
    """shape_decoder fixture -> our decoder -> our mesh extraction == fdg_to_mesh `decoder` case."""
    fx, fm = load_golden("shape_decoder"), load_golden("fdg_to_mesh")
    cfg = copy.deepcopy(fx.config)
    model = build_model(cfg).eval()
    model.load_state_dict(fx.w, strict=True)
    with torch.no_grad():
        h = model(SparseTensor(fx.inp["x.feats"], fx.inp["x.coords"]))
    model.set_resolution(int(fm.inp["decoder.grid_size"]))
    ((vertices, faces),) = model.extract_meshes(h)
    assert torch.equal(faces, fm.out["decoder.faces"])
    torch.testing.assert_close(vertices, fm.out["decoder.vertices"], rtol=0, atol=1e-5)
    (m,) = model.mesh_inputs(h)
    _, faces_none = flexible_dual_grid_to_mesh(m.coords, m.vertices, m.intersected, None, aabb=[[-0.5] * 3, [0.5] * 3], grid_size=model.resolution)
    assert torch.equal(faces_none, fm.out["decoder.faces_split_none"])


def test_fp16_conversion():
    shape, tex = tiny_models(5)
    x = random_latent([20], 5, seed=6)
    with torch.no_grad():
        h32, subs = shape(x, return_subs=True)
        t32 = tex(x, guide_subs=subs)
        tex.convert_to_fp16()
        t16 = tex(x, guide_subs=subs)
    for name, p in tex.named_parameters():
        top = name.split(".")[0]
        is_norm = ".norm" in name
        want = torch.float16 if top == "blocks" and not is_norm else torch.float32
        assert p.dtype == want, name
    assert t16.feats.dtype == torch.float32
    assert ((t16.feats - t32.feats).norm() / t32.feats.norm()) < 1e-2
    tex.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in tex.parameters())
    with torch.no_grad():
        t_back = tex(x, guide_subs=subs)  # fp32 compute on the fp16-rounded weights
    assert ((t_back.feats - t32.feats).norm() / t32.feats.norm()) < 1e-2


def test_pixel_shuffle_formula():
    x = torch.randn(2, 16, 3, 2, 4)
    y = pixel_shuffle_3d(x, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert torch.equal(y[:, c, i::2, j::2, k::2], x[:, 8 * c + 4 * i + 2 * j + k])


def test_ss_decoder_batch_and_occupancy():
    torch.manual_seed(7)
    net = SparseStructureDecoder(out_channels=1, latent_channels=4, num_res_blocks=1, channels=[8, 8, 4], num_res_blocks_middle=1).eval()
    z = torch.randn(2, 4, 3, 3, 3)
    with torch.no_grad():
        both = net(z)
        singles = torch.cat([net(z[:1]), net(z[1:])])
    assert both.shape == (2, 1, 12, 12, 12)
    torch.testing.assert_close(both, singles, rtol=1e-5, atol=1e-5)
    occ = (both > 0).numpy()[:, 0]
    pooled = occ.reshape(2, 6, 2, 6, 2, 6, 2).any(axis=(2, 4, 6))
    want = np.argwhere(pooled).astype(np.int32)
    assert np.array_equal(occupancy_to_coords(both, pool=True).numpy(), want)
    assert np.array_equal(occupancy_to_coords(both, pool=False).numpy(), np.argwhere(occ).astype(np.int32))
