"""Triton na2d kernel (kernels/na2d_triton.py) under TRITON_INTERPRET=1 against the torch reference:
full map and selected pixels, index-mapped K/V, unequal dilation groups, strided queries, partial
tiles, empty and single-pixel inputs, and NAF wired through the kernel."""

import pytest
import torch

from pixal3d_rt.kernels.na2d import na2d_at_reference, na2d_reference
from pixal3d_rt.models.naf import NAF, nearest_exact_index

from kernel_inputs import interpreted, interpreted_module


@pytest.fixture(scope="module")
def nt():
    """kernels.na2d_triton with its kernels built by Triton's CPU interpreter."""
    return interpreted_module("pixal3d_rt.kernels.na2d_triton", "_na2d_kernel")


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


@interpreted
@pytest.mark.parametrize(
    "B,X,Y,H,Dqk,Dv,ks,dil,block_m,block_dv",
    [
        (2, 17, 11, 2, 8, 12, (3, 5), (5, 2), 128, 128),  # d does not divide L: groups of unequal length
        (1, 13, 20, 1, 4, 40, (7, 3), (1, 6), 128, 16),  # several value slices, the last one partial
        (1, 9, 9, 3, 6, 10, (9, 1), (1, 9), 32, 128),  # window = whole axis; kernel 1
    ],
)
def test_full_map_matches_reference(nt, B, X, Y, H, Dqk, Dv, ks, dil, block_m, block_dv):
    g = torch.Generator().manual_seed(X * 31 + Y)
    q, k, v = rand(g, B, X, Y, H, Dqk), rand(g, B, X, Y, H, Dqk), rand(g, B, X, Y, H, Dv)
    want = na2d_reference(q, k, v, ks, dil)
    got = nt.na2d_at_triton(q.flatten(1, 2), k, v, None, None, ks, dil, block_m=block_m, block_dv=block_dv)
    assert got.shape == (B, X * Y, H, Dv) and got.dtype == v.dtype
    torch.testing.assert_close(got.view(B, X, Y, H, Dv), want, atol=2e-6, rtol=2e-5)


@interpreted
def test_selected_pixels_through_index_maps(nt):
    """NAF's sizes (kernel 9, 4 heads, qk 64, v 256) with T = 75 not a multiple of P = 9 (dilation 8,
    groups of 10 and 9), K/V read through the nearest-exact maps, queries in random order."""
    g = torch.Generator().manual_seed(7)
    P, T, H = 9, 75, 4
    k_lr, v_lr = rand(g, 1, P, P, H, 64), rand(g, 1, P, P, H, 256)
    ix = iy = nearest_exact_index(P, T)
    rows = torch.randint(0, T, (37,), generator=g)
    cols = torch.randint(0, T, (37,), generator=g)
    rows[:3] = torch.tensor([0, T - 1, 40])
    cols[:3] = torch.tensor([T - 1, 0, 8])
    q_sel = rand(g, 1, 37, H, 64)
    want = na2d_at_reference(q_sel, k_lr, v_lr, rows, cols, 9, T // P, kv_index=(ix, iy))
    got = nt.na2d_at_triton(q_sel, k_lr, v_lr, rows, cols, 9, T // P, kv_index=(ix, iy), block_m=64, block_dv=256)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@interpreted
def test_strided_queries_and_half_precision(nt):
    g = torch.Generator().manual_seed(11)
    B, H, D, X, Y = 1, 2, 8, 14, 19
    qmap = rand(g, B, H * D, X, Y)  # NAF's [B, C, T, T] layout, passed as a view
    q_view = qmap.reshape(B, H, D, X * Y).permute(0, 3, 1, 2)
    k, v = rand(g, B, X, Y, H, D), rand(g, B, X, Y, H, 24)
    want = na2d_at_reference(q_view.contiguous(), k, v, None, None, 5, (2, 3))
    got = nt.na2d_at_triton(q_view, k, v, None, None, 5, (2, 3), block_m=128)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    qh, kh, vh = (t.to(torch.bfloat16) for t in (q_view.contiguous(), k, v))
    want_h = na2d_at_reference(qh, kh, vh, None, None, 3, (2, 3))
    got_h = nt.na2d_at_triton(qh, kh, vh, None, None, 3, (2, 3), block_m=256)
    assert got_h.dtype == torch.bfloat16
    torch.testing.assert_close(got_h.float(), want_h.float(), atol=2e-2, rtol=2e-2)


@interpreted
def test_empty_single_and_out_of_range(nt):
    g = torch.Generator().manual_seed(2)
    k, v = rand(g, 1, 10, 12, 2, 4), rand(g, 1, 10, 12, 2, 6)
    empty = torch.empty(0, dtype=torch.long)
    out = nt.na2d_at_triton(rand(g, 1, 0, 2, 4), k, v, empty, empty, 3, 2)
    assert out.shape == (1, 0, 2, 6)
    q1 = rand(g, 1, 1, 2, 4)
    r, c = torch.tensor([9]), torch.tensor([0])
    torch.testing.assert_close(
        nt.na2d_at_triton(q1, k, v, r, c, 3, 2), na2d_at_reference(q1, k, v, r, c, 3, 2), atol=2e-6, rtol=2e-5
    )
    with pytest.raises(IndexError):
        nt.na2d_at_triton(q1, k, v, torch.tensor([10]), c, 3, 2)
    with pytest.raises(ValueError):
        nt.na2d_at_triton(q1, k, v, None, None, 3, 2)  # full-map mode needs M = X*Y


@interpreted
def test_naf_forward_and_sampling_through_kernel(nt, monkeypatch):
    """NAF's full map and selected pixels with the dispatch forced onto the (interpreted) kernel."""
    import pixal3d_rt.kernels.na2d as na2d_mod

    torch.manual_seed(0)
    m = NAF(dim=32, heads_attn=2, heads_rope=2, kernel_size=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(3)
    image, feats = torch.rand(1, 3, 46, 46, generator=g), torch.randn(1, 12, 6, 6, generator=g)
    T = 23  # dilation 3, unequal groups
    rows, cols = torch.randint(0, T, (19,), generator=g), torch.randint(0, T, (19,), generator=g)
    with torch.no_grad():
        want = m(image, feats, (T, T))
        monkeypatch.setattr(na2d_mod, "_triton_na2d", lambda q, k, v: nt)
        monkeypatch.setattr(nt, "BLOCK_M", 256)  # few interpreted programs
        got = m(image, feats, (T, T))
        got_at = m.forward_at(image, feats, (T, T), rows, cols)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(got_at[0], want[0, :, rows, cols].T, atol=2e-6, rtol=2e-5)


@interpreted
def test_switch_and_guard(nt, monkeypatch):
    q = torch.zeros(1, 4, 1, 8)
    assert not nt.supported(q, torch.zeros(1, 2, 2, 1, 8), torch.zeros(1, 2, 2, 1, 8))  # CPU tensors
    monkeypatch.setenv(nt.DISABLE_ENV, "1")
    assert not nt.enabled()
    monkeypatch.setenv(nt.DISABLE_ENV, "0")
    assert nt.enabled()
