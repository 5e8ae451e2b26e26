"""The decoders' fp32 LayerNorm kernel against its reference, under Triton's CPU interpreter."""
import os

import pytest
import torch

from pixal3d_rt.kernels import layernorm as ln

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or ln.triton is None,
                                 reason="Triton interpreter not selected (tests/conftest.py selects it without CUDA)")


@interpreted
@pytest.mark.parametrize("n,c,affine", [(0, 64, True), (1, 8, True), (37, 193, True), (130, 64, False), (5, 1024, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_layer_norm_matches_reference(n, c, affine, dtype):
    g = torch.Generator().manual_seed(n * 7 + c)
    x = (torch.randn(n, c, generator=g) * 3 + 0.5).to(dtype)
    w = 1 + 0.2 * torch.randn(c, generator=g) if affine else None
    b = 0.2 * torch.randn(c, generator=g) if affine else None
    got = ln.layer_norm_triton(x, w, b, 1e-6)
    want = ln.layer_norm_reference(x, w, b, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # both compute in fp32 and round once to the half type: at most one rounding step apart
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1e-3)
    assert ((got.float() - want.float()).abs() <= 1.01 * ulp + 1e-6).all()


def test_dispatch_keeps_the_reference_on_cpu():
    x = torch.randn(9, 16, dtype=torch.float16)
    w, b = torch.rand(16), torch.rand(16)
    assert torch.equal(ln.layer_norm(x, w, b, 1e-5), ln.layer_norm_reference(x, w, b, 1e-5))
