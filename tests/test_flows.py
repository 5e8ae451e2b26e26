"""Flow transformers: golden parity, full-size checkpoint schema, bf16 torso, varlen batching."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pixal3d_rt.models.flow import ElasticSLatFlowModel, SLatFlowModel, SparseStructureFlowModel
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.models.sparse import SparseTensor

from golden_fixtures import golden

FLOW_FIXTURES = ["ss_flow_proj", "shape_slat_flow_proj", "tex_slat_flow_proj"]
SCHEMAS = [
    "ss_flow_img_dit_1_3B_64_bf16",
    "slat_flow_img2shape_dit_1_3B_512_bf16",
    "slat_flow_img2shape_dit_1_3B_1024_bf16",
    "slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
]


@pytest.mark.parametrize("name", FLOW_FIXTURES)
def test_golden_parity(name):
    from pixal3d_rt.tools import parity, parity_flows  # noqa: F401  (registers the runners)

    fx = parity.load_fixture(golden(f"{name}.json"))
    with torch.no_grad():
        ok, comps, err = parity.check_fixture(fx)
    assert not err, err
    bad = [f"{c.key}: abs={c.max_abs:.3e} {c.note}" for c in comps if not c.ok]
    assert ok and not bad, "\n".join(bad)
    # the runner must have compared the block intermediates too, so a failure localises
    assert any(c.key.startswith("mid.blocks.0") for c in comps)


@pytest.mark.parametrize("name", SCHEMAS)
def test_full_size_schema(name):
    schema = json.loads(golden("schema", f"{name}.json").read_text())
    with torch.device("meta"):
        model = build_model(schema["config"])
    params = {k for k, _ in model.named_parameters()}
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch."), "parameter" if k in params else "buffer")
           for k, v in model.state_dict().items()]
    want = [(e["key"], e["shape"], e["dtype"], e["kind"]) for e in schema["state_dict"]]
    assert {g[0] for g in got} == {w[0] for w in want}
    assert got == want  # same shapes, dtypes after construction, kinds and upstream key order
    assert sum(p.numel() for p in model.parameters()) == schema["num_parameters"]


# ---------------------------------------------------------------------------------------------
# small random models (awkward sizes: head dim 20 -> 3 RoPE frequencies per axis + 1 identity pair)

SMALL = dict(model_channels=80, cond_channels=24, num_blocks=2, num_heads=4, mlp_ratio=5.3334,
             pe_mode="rope", share_mod=True, qk_rms_norm=True, qk_rms_norm_cross=True,
             image_attn_mode="proj", initialization="scaled")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a non-trivial value (norm scales near 1, like the golden fixtures)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith(("gamma", "norm2.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _sparse_coords(counts, res, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        flat = torch.randperm(res ** 3, generator=g)[:n].sort().values
        xyz = torch.stack([flat // res ** 2, flat // res % res, flat % res], dim=1)
        rows.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(rows).int()


def _slat(in_channels=16, out_channels=16, proj_in=40, cls=SLatFlowModel, dtype="float32"):
    m = cls(resolution=12, in_channels=in_channels, out_channels=out_channels, proj_in_channels=proj_in,
            dtype=dtype, **SMALL)
    _randomise(m, 1)
    return m.eval()


def _rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_torso_close_to_fp32():
    torch.manual_seed(0)
    ss = SparseStructureFlowModel(resolution=5, in_channels=8, out_channels=8, dtype="float32", **SMALL)
    _randomise(ss, 0)
    ss.eval()
    ss_bf16 = copy.deepcopy(ss).convert_to("bfloat16")
    # upstream convention: block Linears in bf16, norms / modulation / outer layers fp32
    assert ss_bf16.blocks[0].self_attn.to_qkv.weight.dtype == torch.bfloat16
    assert ss_bf16.blocks[0].cross_attn.proj_linear.weight.dtype == torch.bfloat16
    assert ss_bf16.blocks[0].mlp.mlp[2].bias.dtype == torch.bfloat16
    for p in (ss_bf16.blocks[0].modulation, ss_bf16.blocks[0].norm2.weight, ss_bf16.blocks[0].self_attn.q_rms_norm.gamma,
              ss_bf16.input_layer.weight, ss_bf16.out_layer.weight, ss_bf16.adaLN_modulation[1].weight):
        assert p.dtype == torch.float32

    x = torch.randn(2, 8, 5, 5, 5)
    t = torch.tensor([731.0, 90.5])
    cond = {"global": torch.randn(2, 5, 24), "proj": torch.randn(2, 125, 24)}
    with torch.no_grad():
        ref, got = ss(x, t, cond), ss_bf16(x, t, cond)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel_l2(got, ref) < 3e-2

    sl = _slat()
    sl_bf16 = copy.deepcopy(sl).convert_to(torch.bfloat16)
    coords = _sparse_coords([23, 17], 12, 3)
    xs = SparseTensor(torch.randn(40, 16), coords)
    cond = {"global": torch.randn(2, 5, 24), "proj": SparseTensor(torch.randn(40, 40), coords)}
    with torch.no_grad():
        ref, got = sl(xs, t, cond), sl_bf16(xs, t, cond)
    assert got.feats.dtype == torch.float32 and torch.isfinite(got.feats).all()
    assert _rel_l2(got.feats, ref.feats) < 3e-2
    # a bf16 config builds its torso in bf16 directly
    assert _slat(dtype="bfloat16").blocks[1].self_attn.to_out.weight.dtype == torch.bfloat16


def test_varlen_batch_equals_items_alone():
    model = _slat(in_channels=32, out_channels=16, cls=ElasticSLatFlowModel)
    counts = [19, 45]
    coords = _sparse_coords(counts, 12, 7)
    feats = torch.randn(sum(counts), 16)
    concat = torch.randn(sum(counts), 16)
    proj = torch.randn(sum(counts), 40)
    glob = torch.randn(2, 5, 24)
    t = torch.tensor([640.0, 125.0])
    with torch.no_grad():
        both = model(SparseTensor(feats, coords), t,
                     {"global": glob, "proj": SparseTensor(proj, coords)},
                     concat_cond=SparseTensor(concat, coords)).feats
        start = 0
        for b, n in enumerate(counts):
            rows = slice(start, start + n)
            c = coords[rows].clone()
            c[:, 0] = 0
            alone = model(SparseTensor(feats[rows], c), t[b:b + 1],
                          {"global": glob[b:b + 1], "proj": proj[rows]},  # proj as a plain tensor
                          concat_cond=SparseTensor(concat[rows], c)).feats
            torch.testing.assert_close(both[rows], alone, rtol=1e-5, atol=1e-5)
            start += n
    # and the items really interact within themselves: perturbing item 0 leaves item 1 unchanged only
    feats2 = feats.clone()
    feats2[0] += 1.0
    with torch.no_grad():
        both2 = model(SparseTensor(feats2, coords), t, {"global": glob, "proj": SparseTensor(proj, coords)},
                      concat_cond=SparseTensor(concat, coords)).feats
    assert not torch.allclose(both2[1:counts[0]], both[1:counts[0]])
    torch.testing.assert_close(both2[counts[0]:], both[counts[0]:])


def test_dense_and_sparse_models_agree_on_a_full_grid():
    """Same weights, same tokens: the dense SS model and the sparse model over every voxel of the
    R^3 grid must compute the same function (RoPE from the ij meshgrid vs from coords)."""
    R, C = 4, 8
    ss = SparseStructureFlowModel(resolution=R, in_channels=C, out_channels=C, dtype="float32", **SMALL).eval()
    _randomise(ss, 5)
    sl = SLatFlowModel(resolution=R, in_channels=C, out_channels=C, dtype="float32", **SMALL).eval()
    sd = {k: v for k, v in ss.state_dict().items() if k != "rope_phases"}
    sl.load_state_dict(sd, strict=True)

    x = torch.randn(2, C, R, R, R)
    t = torch.tensor([999.0, 3.5])
    glob, proj = torch.randn(2, 3, 24), torch.randn(2, R ** 3, 24)
    grid = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.cat([torch.full((R ** 3, 1), b), grid], 1) for b in range(2)]).int()
    tokens = x.reshape(2, C, -1).transpose(1, 2).reshape(-1, C)
    with torch.no_grad():
        dense = ss(x, t, {"global": glob, "proj": proj})
        sparse = sl(SparseTensor(tokens, coords), t, {"global": glob, "proj": proj.reshape(-1, 24)}).feats
    torch.testing.assert_close(sparse, dense.reshape(2, C, -1).transpose(1, 2).reshape(-1, C), rtol=1e-4, atol=1e-5)


def test_rope_phases_buffer_layout():
    """The SS buffer: [R^3, D/2] complex64; pair m of axis a rotates by coord_a * 10000^(-j/fd)."""
    m = SparseStructureFlowModel(resolution=3, in_channels=4, out_channels=4, dtype="float32", **SMALL)
    ph = m.rope_phases
    D = 80 // 4
    fd = D // 2 // 3
    assert ph.dtype == torch.complex64 and ph.shape == (27, D // 2)
    k = (2 * 3 + 1) * 3 + 2  # token of (x, y, z) = (2, 1, 2)
    for a, coord in enumerate((2, 1, 2)):
        for j in range(fd):
            want = coord * 10000.0 ** (-j / fd)
            assert abs(float(torch.angle(ph[k, a * fd + j])) - (want + torch.pi) % (2 * torch.pi) + torch.pi) < 1e-5
    assert torch.equal(ph[:, 3 * fd:], torch.ones_like(ph[:, 3 * fd:]))
