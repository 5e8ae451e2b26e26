"""The `cuda` flow backend (runtime/cuda_backend.py) against the eager models, on the CPU.

Small random models of awkward sizes (head dim 20: 3 RoPE frequencies per axis + 1 identity pair;
token counts that are no tile multiple). The backend's CPU path runs the same code as on CUDA with
the pure-torch references of its fused kernels; the Triton kernels themselves are checked against
those references in interpreter mode (TRITON_INTERPRET=1; the interpreter's bf16 products are not
exact, so the attention kernel is checked in fp32 here and in bf16 by `pixal3d-rt bench --section flows`).
CUDA graphs and the GPU kernels are exercised by the last tests when a GPU is present.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton.jit decorator runs (CPU test host)

from pixal3d_rt.models.flow import SLatFlowModel, SparseStructureFlowModel  # noqa: E402
from pixal3d_rt.models.sparse import SparseTensor  # noqa: E402
from pixal3d_rt.kernels import flow_kernels  # noqa: E402
from pixal3d_rt.runtime import cuda_backend  # noqa: E402
from pixal3d_rt.sampler import FlowEulerGuidanceIntervalSampler  # noqa: E402

CUDA = torch.cuda.is_available()
KDEV = "cuda" if CUDA else "cpu"  # where the Triton kernel tests run (interpreter on a CPU host)
SMALL = dict(model_channels=80, cond_channels=24, num_blocks=2, num_heads=4, mlp_ratio=5.3334,
             pe_mode="rope", share_mod=True, qk_rms_norm=True, qk_rms_norm_cross=True,
             image_attn_mode="proj", initialization="scaled")


def _interpreted(module, kernel: str):
    """The module with its Triton kernels built in interpreter mode on a CPU-only host (reloaded if
    it was first imported without TRITON_INTERPRET=1)."""
    if CUDA:
        return module
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1")
    if type(getattr(module, kernel)).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


def _triton():
    pytest.importorskip("triton")
    return _interpreted(flow_kernels, "_residual_norm_kernel")


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "norm2.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _coords(n, res, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(res ** 3, generator=g)[:n].sort().values
    xyz = torch.stack([flat // res ** 2, flat // res % res, flat % res], dim=1)
    return torch.cat([torch.zeros(n, 1, dtype=xyz.dtype), xyz], dim=1).int()


def _slat(dtype="float32", in_channels=16, seed=1):
    m = SLatFlowModel(resolution=12, in_channels=in_channels, out_channels=16, proj_in_channels=40, dtype="float32", **SMALL)
    _randomise(m, seed)
    return m.eval().convert_to(dtype)


def _ss(dtype="float32"):
    m = SparseStructureFlowModel(resolution=5, in_channels=8, out_channels=8, dtype="float32", **SMALL)
    _randomise(m, 2)
    return m.eval().convert_to(dtype)


def _sparse_case(n=57, seed=0, concat=0):
    g = torch.Generator().manual_seed(seed)
    coords = _coords(n, 12, seed + 3)
    x = SparseTensor(torch.randn(n, 16, generator=g), coords)
    cond = {"global": torch.randn(1, 5, 24, generator=g), "proj": SparseTensor(torch.randn(n, 40, generator=g), coords)}
    neg = {"global": torch.zeros(1, 5, 24), "proj": SparseTensor(torch.zeros(n, 40), coords)}
    kw = {"concat_cond": SparseTensor(torch.randn(n, concat, generator=g), coords)} if concat else {}
    return x, cond, neg, kw


T = torch.tensor([731.0])


def _wrap(model, stage_info=None, **opts):
    """The backend on its pure-torch kernels (the Triton ones are tested on their own below and in
    test_fused_kernels_inside_the_backend; interpreting them everywhere would only cost time)."""
    return cuda_backend.wrap_flow(model, stage_info, **{"fused": False, **opts})


# ---------------------------------------------------------------------------------------------
# fused kernels: Triton (interpreter) against the references


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_norm_kernel_matches_reference(dtype):
    fk = _triton()
    g = torch.Generator().manual_seed(0)
    R, C = 37, 80
    rnd = lambda *s: torch.randn(*s, generator=g).to(KDEV, dtype)  # noqa: E731
    x, y, gate, sh = rnd(R, C), rnd(R, C), rnd(C), rnd(C)
    sp = (1 + 0.2 * torch.randn(C, generator=g)).to(KDEV, dtype)
    w, b = (1 + 0.1 * torch.randn(C, generator=g)).to(KDEV), (0.1 * torch.randn(C, generator=g)).to(KDEV)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the interpreter truncates to bf16 instead of rounding
    for kw in (dict(y=y, gate=gate, norm=fk.NORM_MOD, na=sp, nb=sh), dict(y=y, gate=gate, norm=fk.NORM_AFFINE, na=w, nb=b),
               dict(vec=gate, norm=fk.NORM_MOD, na=sp, nb=sh), dict(norm=fk.NORM_MOD, na=sp, nb=sh), dict(y=y, gate=gate)):
        xr, hr = fk.residual_norm(x.clone(), use_triton=False, **kw)
        xo, ho = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        xt, ht = fk.residual_norm(x.clone(), out_x=xo, h_out=ho if hr is not None else None, use_triton=True, **kw)
        assert _rel(xt, xr) <= tol
        if hr is not None:
            assert torch.isfinite(ht).all() and _rel(ht, hr) <= 2 * tol
    # the duplicated residual (first block of a CFG pair) lands in both halves
    xo = torch.full((2 * R, C), float("nan"), dtype=dtype, device=KDEV)
    fk.residual_norm(x, y=y, gate=gate, out_x=xo[:R], out_dup=xo[R:], use_triton=True)
    assert torch.equal(xo[:R], xo[R:]) and torch.isfinite(xo).all()


def test_residual_norm_reference_is_the_eager_block_math():
    """Reference = LayerNorm32 -> * (1 + scale) -> + shift with the eager roundings (bf16)."""
    from pixal3d_rt.models.flow_layers import LayerNorm32

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 48, generator=g).bfloat16(), torch.randn(23, 48, generator=g).bfloat16()
    gate, shift, scale = (torch.randn(48, generator=g).bfloat16() for _ in range(3))
    want_x = x + y * gate
    want_h = LayerNorm32(48, elementwise_affine=False, eps=1e-6)(want_x) * (1 + scale) + shift
    got_x, got_h = flow_kernels.residual_norm_ref(x, y=y, gate=gate, norm=flow_kernels.NORM_MOD, na=1 + scale, nb=shift)
    assert torch.equal(got_x, want_x) and torch.equal(got_h, want_h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_prologue_and_cross_probs_kernels_match_reference(dtype):
    fk = _triton()
    g = torch.Generator().manual_seed(2)
    R, H, D, npos = 41, 4, 20, 13
    rnd = lambda *s: torch.randn(*s, generator=g).to(KDEV)  # noqa: E731
    qkv = rnd(R, 3 * H * D).to(dtype)
    cos, sin = rnd(npos, D // 2), rnd(npos, D // 2)
    gq, gk = 1 + 0.1 * rnd(H, D), 1 + 0.1 * rnd(H, D)
    tol = 1e-6 if dtype == torch.float32 else 1.5e-2
    ref = fk.qk_prologue(qkv, cos, sin, gq, gk, H, npos, use_triton=False)
    got = fk.qk_prologue(qkv, cos, sin, gq, gk, H, npos, use_triton=True)
    for a, b in zip(got, ref):
        assert _rel(a, b) <= tol
    assert torch.equal(ref[2], qkv[:, 2 * H * D:])
    kc = rnd(H, 5, D).to(dtype)
    qc = rnd(R, H * D).to(dtype)
    pr = fk.cross_probs(qc, kc, gq, H, 5, 32, use_triton=False)
    pt = fk.cross_probs(qc, kc, gq, H, 5, 32, use_triton=True)
    assert _rel(pt, pr) <= tol and (pt[:, 20:] == 0).all()
    # softmax weights per head sum to 1
    torch.testing.assert_close(pr[:, :20].float().view(R, H, 5).sum(-1), torch.ones(R, H, device=KDEV), atol=2e-2, rtol=0)


def test_qk_prologue_reference_is_the_eager_attention_prologue():
    from pixal3d_rt.models.flow_layers import MultiHeadRMSNorm, apply_rope, rope_phases

    g = torch.Generator().manual_seed(3)
    H, D, n = 4, 20, 31
    qkv = torch.randn(n, 3 * H * D, generator=g).bfloat16()
    ph = rope_phases(_coords(n, 12, 4)[:, 1:], D)
    nq, nk = MultiHeadRMSNorm(D, H), MultiHeadRMSNorm(D, H)
    with torch.no_grad():
        nq.gamma.copy_(1 + 0.1 * torch.randn(H, D, generator=g))
        nk.gamma.copy_(1 + 0.1 * torch.randn(H, D, generator=g))
    q, k, v = qkv.unflatten(-1, (3, H, D)).unbind(dim=-3)
    with torch.no_grad():
        want_q, want_k = apply_rope(nq(q), ph), apply_rope(nk(k), ph)
    got = flow_kernels.qk_prologue_ref(qkv, ph.real, ph.imag, nq.gamma.detach(), nk.gamma.detach(), H, n)
    assert torch.equal(got[0], want_q.reshape(n, -1)) and torch.equal(got[1], want_k.reshape(n, -1))


@pytest.mark.parametrize("head_dim", [20, 32])
def test_triton_attention_with_fused_prologue(head_dim):
    pytest.importorskip("triton")
    from pixal3d_rt.kernels import attention_triton

    at = _interpreted(attention_triton, "_attn_fwd_kernel")
    g = torch.Generator().manual_seed(4)
    B, N, H, D = 2, 45, 3, head_dim
    rnd = lambda *s: torch.randn(*s, generator=g).to(KDEV)  # noqa: E731
    qkv = rnd(B * N, 3, H, D)
    q, k, v = (qkv[:, i].view(B, N, H, D) for i in range(3))
    cos, sin = rnd(N, D // 2), rnd(N, D // 2)
    gq = 1 + 0.1 * rnd(H, D)
    cfg = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)  # 45 tokens: 2 full key blocks + a partial one
    tol = 5e-3 if CUDA else 1e-5  # fp32 products run as tf32 on a GPU
    torch.testing.assert_close(at.attention(q, k, v, config=cfg), at.attention_ref(q, k, v), rtol=tol, atol=tol)
    got = at.attention(q, k, v, prologue=(cos, sin, gq, N), config=cfg)
    torch.testing.assert_close(got, at.attention_ref(q, k, v, prologue=(cos, sin, gq, N)), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# the backend against the eager models (each saving)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_single_and_pair_match_eager_sparse(dtype, tol):
    """Batched CFG, cached cross K/V with the folded to_out, proj products, the constant
    unconditional cross-attention and precomputed modulation, all at once."""
    m = _slat(dtype)
    x, cond, neg, _ = _sparse_case()
    be = _wrap(m)
    with torch.no_grad():
        ep, en = m(x, T, cond).feats, m(x, T, neg).feats
        assert _rel(be(x, T, cond).feats, ep) < tol
        assert _rel(be(x, T, neg).feats, en) < tol
        pp, pn = be.cfg_pair(x, T, cond, neg)
    assert _rel(pp.feats, ep) < tol and _rel(pn.feats, en) < tol
    assert torch.equal(pp.coords, x.coords)
    # the all-zero condition took the constant path, the image condition the attention path
    kinds = sorted(s.kind for s in be._state.slots)
    assert kinds == ["attn", "const"] and be.stats["slot_fills"] == 2 and be.stats["fallback_calls"] == 0


def test_dense_ss_pair_matches_eager():
    m = _ss()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 5, 5, 5, generator=g)
    cond = {"global": torch.randn(1, 5, 24, generator=g), "proj": torch.randn(1, 125, 24, generator=g)}
    neg = {k: torch.zeros_like(v) for k, v in cond.items()}
    be = _wrap(m, "ss")
    with torch.no_grad():
        pp, pn = be.cfg_pair(x, T, cond, neg)
        torch.testing.assert_close(pp, m(x, T, cond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pn, m(x, T, neg), rtol=1e-4, atol=1e-5)


def test_identical_nonzero_context_is_constant_and_exact():
    """Any context whose tokens are all equal (not only zeros) gives the constant cross-attention."""
    m = _slat()
    x, cond, _, _ = _sparse_case(n=33)
    row_g, row_p = torch.randn(1, 1, 24), torch.randn(1, 40)
    same = {"global": row_g.expand(1, 5, 24).clone(), "proj": SparseTensor(row_p.expand(33, 40).clone(), x.coords)}
    be = _wrap(m)
    with torch.no_grad():
        got = be(x, T, same).feats
        want = m(x, T, same).feats
    assert be._state.slots[0].kind == "const"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_general_negative_condition_uses_attention_rows_for_both_halves():
    m = _slat()
    x, cond, _, _ = _sparse_case(n=29, seed=3)
    _, other, _, _ = _sparse_case(n=29, seed=4)
    other["proj"] = SparseTensor(other["proj"].feats, x.coords)
    be = _wrap(m, proj_cache_bytes=0)  # proj_linear run per forward
    with torch.no_grad():
        a, b = be.cfg_pair(x, T, cond, other)
        torch.testing.assert_close(a.feats, m(x, T, cond).feats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.feats, m(x, T, other).feats, rtol=1e-4, atol=1e-5)
    assert all(s.kind == "attn" and s.P is None for s in be._state.slots)


def test_condition_cache_follows_in_place_changes_and_new_coordinates():
    m = _slat()
    x, cond, neg, _ = _sparse_case(n=40)
    be = _wrap(m)
    with torch.no_grad():
        be.cfg_pair(x, T, cond, neg)
        cond["global"].mul_(-1.5)  # same tensor object, new values: must not reuse the old constants
        pp, _ = be.cfg_pair(x, T, cond, neg)
        torch.testing.assert_close(pp.feats, m(x, T, cond).feats, rtol=1e-4, atol=1e-5)
        # same token count, other coordinates: positions are refilled in place
        x2, cond2, neg2, _ = _sparse_case(n=40, seed=9)
        pp2, pn2 = be.cfg_pair(x2, T, cond2, neg2)
        torch.testing.assert_close(pp2.feats, m(x2, T, cond2).feats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pn2.feats, m(x2, T, neg2).feats, rtol=1e-4, atol=1e-5)
        # another token count: a new token state
        x3, cond3, neg3, _ = _sparse_case(n=23, seed=11)
        torch.testing.assert_close(be(x3, T, cond3).feats, m(x3, T, cond3).feats, rtol=1e-4, atol=1e-5)
    assert be.stats["token_states"] == 2


def test_timestep_tables_equal_eager_modulation():
    m = _slat("bfloat16")
    be = _wrap(m, {"t_values": [1000.0, 417.25]})
    assert len(be._mod_cache) == 2
    t = torch.tensor([417.25])
    mod = m.time_modulation(t)
    for b, blk in enumerate(m.blocks):
        sh1, sc1, g1, sh2, sc2, g2 = (blk.modulation + mod).type(mod.dtype).chunk(6, dim=1)
        want = torch.cat([sh1, 1 + sc1, g1, sh2, 1 + sc2, g2])
        assert torch.equal(be._mod_cache[417.25][b], want)
    # other t values at call time are added on first sight and give eager's result
    x, cond, _, _ = _sparse_case(n=31)
    with torch.no_grad():
        for tv in (1000.0, 3.75):
            tt = torch.tensor([tv])
            assert _rel(be(x, tt, cond).feats, m(x, tt, cond).feats) < 2e-2
    assert set(be._mod_cache) == {1000.0, 417.25, 3.75}


def test_texture_concat_condition_and_its_refresh():
    m = _slat(in_channels=32)
    x, cond, neg, kw = _sparse_case(n=35, concat=16)
    be = _wrap(m)
    with torch.no_grad():
        pp, pn = be.cfg_pair(x, T, cond, neg, **kw)
        torch.testing.assert_close(pp.feats, m(x, T, cond, **kw).feats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pn.feats, m(x, T, neg, **kw).feats, rtol=1e-4, atol=1e-5)
        kw["concat_cond"].feats.add_(1.0)
        torch.testing.assert_close(be(x, T, cond, **kw).feats, m(x, T, cond, **kw).feats, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts", [dict(token_chunk=10), dict(residency="streamed"), dict(proj_cache_bytes=0),
                                  dict(token_chunk=7, residency="streamed", proj_cache_bytes=0),
                                  dict(residency="streamed", resident_blocks=1)])
def test_residency_and_chunking_leave_results_unchanged(opts):
    m = _slat("bfloat16")
    x, cond, neg, _ = _sparse_case(n=50)
    with torch.no_grad():
        ref = _wrap(m).cfg_pair(x, T, cond, neg)
        got = _wrap(m, **opts).cfg_pair(x, T, cond, neg)
    for a, b in zip(got, ref):
        assert _rel(a.feats, b.feats) < 1e-6  # bf16: only GEMM row blocking can differ
    be = _wrap(m, **opts)
    if opts.get("residency") == "streamed":
        kept = opts.get("resident_blocks", 0)
        assert len(be.blocks) > kept and be.streamer is not None and len(be.streamer.host) == len(be.blocks) - kept
        # the first `kept` blocks' matrices on the device, the others' on the host
        assert all(hasattr(bp, "qkv_w") == (i < kept) for i, bp in enumerate(be.blocks))


def test_weights_converted_once_to_the_torso_dtype():
    m = _slat("float32")
    be = _wrap(m, dtype="bfloat16")
    bp = be.blocks[0]
    assert bp.qkv_w.dtype == torch.bfloat16 and bp.fc2_b.dtype == torch.bfloat16
    assert bp.n2w.dtype == torch.float32 and bp.gq.dtype == torch.float32 and be.in_w.dtype == torch.float32
    x, cond, neg, _ = _sparse_case(n=44)
    ref = _slat("float32")
    with torch.no_grad():
        pp, pn = be.cfg_pair(x, T, cond, neg)
        assert _rel(pp.feats, ref(x, T, cond).feats) < 3e-2 and _rel(pn.feats, ref(x, T, neg).feats) < 3e-2


def test_unsupported_inputs_fall_back_to_eager():
    m = _slat()
    coords = torch.cat([_coords(20, 12, 1), torch.cat([torch.ones(15, 1, dtype=torch.int32), _coords(15, 12, 2)[:, 1:]], 1)])
    x = SparseTensor(torch.randn(35, 16), coords)
    cond = {"global": torch.randn(2, 5, 24), "proj": SparseTensor(torch.randn(35, 40), coords)}
    be = _wrap(m)
    t2 = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.equal(be(x, t2, cond).feats, m(x, t2, cond).feats)
    assert be.stats["fallback_calls"] == 1


def test_fused_kernels_inside_the_backend():
    """The backend's Triton path (row kernels and the prologue-fused attention, interpreted on a
    CPU host) computes the eager function (fp32)."""
    if CUDA:
        pytest.skip("interpreter check of the CPU host; test_cuda_graph_replays_equal_first_forward_and_eager covers the GPU")
    _triton()
    from pixal3d_rt.kernels import attention_triton

    _interpreted(attention_triton, "_attn_fwd_kernel")
    m = _slat()
    x, cond, neg, _ = _sparse_case(n=37)
    cfg = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    be = cuda_backend.wrap_flow(m, fused=True, attention="triton", attention_config=cfg)
    assert be.use_triton and be.attention == "triton"
    with torch.no_grad():
        pp, pn = be.cfg_pair(x, T, cond, neg)
        torch.testing.assert_close(pp.feats, m(x, T, cond).feats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pn.feats, m(x, T, neg).feats, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="the graph branch where CUDA graphs are unavailable (a CPU-only host)")
def test_graph_bookkeeping_path_on_a_host_without_graphs():
    """The backend's graph branch with a runner that cannot capture (no CUDA here): every call runs
    eagerly through it, results equal the plain path, and the host timings are recorded."""
    m = _slat("bfloat16")
    x, cond, neg, _ = _sparse_case(n=33)
    be = _wrap(m)
    be.use_graphs = True  # GraphRunner itself stays disabled without CUDA
    with torch.no_grad():
        got = [be.cfg_pair(x, T, cond, neg) for _ in range(2)]
        ref = _wrap(m).cfg_pair(x, T, cond, neg)
    for pair in got:
        for a, b in zip(pair, ref):
            assert torch.equal(a.feats, b.feats)
    st = be.stats
    assert st["eager_forwards"] == 2 and st["graph_replays"] == 0 and st["graph_captures"] == 0, st
    assert len(st["eager_host_ms"]) == 2 and all(v > 0 for v in st["eager_host_ms"])
    assert st["capture_host_ms"] == [] and st["capture_errors"] == []


@pytest.mark.parametrize("v_copy", [False, True])
def test_sdpa_path_with_triton_prologue_and_either_v_layout(v_copy):
    """The SDPA attention path behind the Triton QK prologue, with V read in place from the qkv
    projection or copied contiguous by the prologue: the eager function (fp32) either way."""
    if CUDA:
        pytest.skip("interpreter check of the CPU host")
    _triton()
    m = _slat()
    x, cond, neg, _ = _sparse_case(n=41)
    be = cuda_backend.wrap_flow(m, fused=True, attention="math", v_copy=v_copy)
    assert be.use_triton and be.v_copy is v_copy
    with torch.no_grad():
        pp, pn = be.cfg_pair(x, T, cond, neg)
        torch.testing.assert_close(pp.feats, m(x, T, cond).feats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pn.feats, m(x, T, neg).feats, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("env,option,want", [(None, None, False), ("1", None, True), ("1", False, False),
                                              (None, True, True)])
def test_v_copy_follows_torchs_ragged_cudnn_opt_in(monkeypatch, env, option, want):
    """torch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 reuses cuDNN plans across token counts only for
    contiguous q, k, v: with it set (and v_copy not given) the prologue writes a contiguous V."""
    if env is None:
        monkeypatch.delenv("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", env)
    seen = []
    real = flow_kernels.qk_prologue

    def spy(*a, **k):
        seen.append(k.get("do_v"))
        return real(*a, **k)

    monkeypatch.setattr(flow_kernels, "qk_prologue", spy)
    m = _slat()
    x, cond, _, _ = _sparse_case(n=29)
    be = _wrap(m, attention="math", **({} if option is None else {"v_copy": option}))
    with torch.no_grad():
        got = be(x, T, cond)
    assert be.v_copy is want and seen and set(seen) == {want}
    torch.testing.assert_close(got.feats, m(x, T, cond).feats, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the sampler's batched CFG path


class _PairOfCalls:
    """cfg_pair made of two calls of an eager model: the batched path must then equal the sequential."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *a, **k):
        return self.model(*a, **k)

    def cfg_pair(self, x, t, cond, neg, **k):
        return self.model(x, t, cond, **k), self.model(x, t, neg, **k)


@pytest.mark.parametrize("dense", [False, True])
def test_sampler_batched_path_equals_sequential(dense):
    torch.manual_seed(0)
    sampler = FlowEulerGuidanceIntervalSampler()
    if dense:
        m = _ss()
        noise = torch.randn(1, 8, 5, 5, 5)
        cond = {"global": torch.randn(1, 5, 24), "proj": torch.randn(1, 125, 24)}
        neg = {k: torch.zeros_like(v) for k, v in cond.items()}
        params = dict(steps=6, guidance_strength=7.5, guidance_rescale=0.7, rescale_t=5.0, guidance_interval=(0.6, 1.0))
    else:
        m = _slat()
        noise, cond, neg, _ = _sparse_case(n=38)
        params = dict(steps=6, guidance_strength=7.5, guidance_rescale=0.5, rescale_t=3.0, guidance_interval=(0.6, 1.0))
    seq, tr_seq = sampler.sample(m, noise, cond, neg, return_trace=True, **params)
    pair, tr_pair = sampler.sample(_PairOfCalls(m), noise, cond, neg, return_trace=True, **params)
    f = (lambda z: z.feats) if not dense else (lambda z: z)
    assert torch.equal(f(pair), f(seq))
    assert tr_pair.model_t_in == tr_seq.model_t_in and tr_pair.model_is_pos == tr_seq.model_is_pos
    assert sum(not p for p in tr_seq.model_is_pos) > 0  # some steps were guided
    # the backend (batched automatically) against the eager sequential sampling
    be = _wrap(m)
    fast, tr_fast = sampler.sample(be, noise, cond, neg, return_trace=True, **params)
    assert tr_fast.model_is_pos == tr_seq.model_is_pos
    assert _rel(f(fast), f(seq)) < 1e-4
    calls = be.stats["eager_forwards"] + be.stats["graph_replays"]
    assert calls == params["steps"]  # one backend forward per step: guided steps batched
    with pytest.raises(TypeError):
        sampler.sample(m, noise, cond, neg, batched_cfg=True, **params)
    seq2 = sampler.sample(be, noise, cond, neg, batched_cfg=False, **params)
    assert _rel(f(seq2), f(seq)) < 1e-4


# ---------------------------------------------------------------------------------------------
# GPU only: fused kernels and CUDA graphs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_replays_equal_first_forward_and_eager():
    m = _slat("bfloat16").cuda()
    x, cond, neg, _ = _sparse_case(n=300)
    x = SparseTensor(x.feats.cuda(), x.coords.cuda())
    cond = {"global": cond["global"].cuda(), "proj": SparseTensor(cond["proj"].feats.cuda(), x.coords)}
    neg = {"global": neg["global"].cuda(), "proj": SparseTensor(neg["proj"].feats.cuda(), x.coords)}
    t = T.cuda()
    be = cuda_backend.wrap_flow(m)
    with torch.no_grad():
        first = be.cfg_pair(x, t, cond, neg)
        again = be.cfg_pair(x, t, cond, neg)
        eager = (m(x, t, cond), m(x, t, neg))
    assert be.stats["graph_captures"] == 1 and be.stats["graph_replays"] == 1, be.stats
    assert len(be.stats["capture_host_ms"]) == 1 and be.stats["capture_host_ms"][0] > 0
    for a, b, e in zip(first, again, eager):
        assert _rel(b.feats, a.feats) < 1e-6 and _rel(a.feats, e.feats) < 3e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graph_capture_overlapping_the_first_call_then_replays_follow_the_inputs():
    """The capture starts while the first (eager) call still runs on the GPU: that call's result, and
    every replay after the static input changes, equal a plain eager run."""
    from pixal3d_rt.runtime.graphs import GraphRunner

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(2048, 2048, device="cuda", generator=g)
    buf = torch.randn(2048, 2048, device="cuda", generator=g)

    def fn():
        y = buf
        for _ in range(30):  # long enough that the capture overlaps it
            y = torch.tanh(y @ a / 45.0)
        return y

    runner = GraphRunner(fn)
    first = runner().clone()
    assert runner.graph is not None and runner.capture_error is None
    torch.testing.assert_close(first, fn())
    for _ in range(2):
        buf.copy_(torch.randn(buf.shape, device="cuda", generator=g))
        want = fn()
        torch.testing.assert_close(runner(), want)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dense", [False, True])
def test_warm_sampling_never_waits_for_the_gpu(dense):
    """Once a stage's graphs and constants exist, a whole sampling run (CFG pairs, single steps,
    CFG-rescale) queues its work without one host-device synchronisation, so the host runs ahead of
    the GPU; the eager model, given its timestep on the device as upstream does, synchronises."""
    sampler = FlowEulerGuidanceIntervalSampler()
    if dense:
        m = _ss("bfloat16").cuda()
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(1, 8, 5, 5, 5, generator=g).cuda()
        cond = {"global": torch.randn(1, 5, 24, generator=g).cuda(), "proj": torch.randn(1, 125, 24, generator=g).cuda()}
        neg = {k: torch.zeros_like(v) for k, v in cond.items()}
        params = dict(steps=6, guidance_strength=7.5, guidance_rescale=0.7, rescale_t=5.0, guidance_interval=(0.6, 1.0))
    else:
        m = _slat("bfloat16").cuda()
        noise, cond, neg, _ = _sparse_case(n=300)
        noise = SparseTensor(noise.feats.cuda(), noise.coords.cuda())
        cond = {"global": cond["global"].cuda(), "proj": noise.replace(cond["proj"].feats.cuda())}
        neg = {"global": neg["global"].cuda(), "proj": noise.replace(neg["proj"].feats.cuda())}
        params = dict(steps=6, guidance_strength=7.5, guidance_rescale=0.5, rescale_t=3.0, guidance_interval=(0.6, 1.0))
    be = cuda_backend.wrap_flow(m)
    cold = sampler.sample(be, noise, cond, neg, **params)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        warm = sampler.sample(be, noise, cond, neg, **params)
        with pytest.raises(RuntimeError, match="synchroniz"):
            sampler.sample(m, noise, cond, neg, **params)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    f = (lambda z: z) if dense else (lambda z: z.feats)
    assert be.stats["graph_captures"] == 2 and be.stats["capture_errors"] == []
    assert _rel(f(warm), f(cold)) < 1e-5
