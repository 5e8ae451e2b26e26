"""NAF upsampler: golden parity, checkpoint schema, awkward sizes, selected-pixel evaluation."""
import json

import pytest
import torch
import torch.nn.functional as F

from pixal3d_rt.kernels.na2d import na2d
from pixal3d_rt.models.naf import NAF, load_naf_pth, nearest_exact_index
from pixal3d_rt.models.registry import build_model

from golden_fixtures import golden


def random_naf(seed=0, **cfg) -> NAF:
    torch.manual_seed(seed)
    m = NAF(**cfg).eval()
    with torch.no_grad():  # GroupNorm defaults (1, 0) and zero biases would hide mistakes
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def reference_forward(m: NAF, image, feats, size):
    """NAF as upstream writes it: K and V materialised with F.interpolate, then full na2d."""
    q = m.image_encoder(image, size)
    keys = F.adaptive_avg_pool2d(q, feats.shape[-2:])
    n = m.heads_attn
    B, _, th, tw = q.shape

    def heads_last(x):
        return x.reshape(B, n, -1, th, tw).permute(0, 3, 4, 1, 2)

    k = heads_last(F.interpolate(keys, size=size, mode="nearest-exact"))
    v = heads_last(F.interpolate(feats, size=size, mode="nearest-exact"))
    dil = (th // feats.shape[-2], tw // feats.shape[-1])
    out = na2d(heads_last(q), k, v, m.kernel_size, dil)
    return out.permute(0, 3, 4, 1, 2).reshape(B, -1, th, tw)


def test_golden_naf():
    import pixal3d_rt.tools.parity_cond  # noqa: F401  (registers the runners)
    from pixal3d_rt.tools.parity import check_fixture, load_fixture

    fx = load_fixture(golden("naf.json"))
    ok, comps, err = check_fixture(fx)
    assert ok, (err, [c for c in comps if not c.ok])
    assert any(c.key == "mid.queries" for c in comps)


def test_schema_meta_device():
    schema = json.loads(golden("schema", "naf.json").read_text())
    with torch.device("meta"):
        m = build_model(schema["config"])
    sd = m.state_dict()
    want = {e["key"]: tuple(e["shape"]) for e in schema["state_dict"]}
    assert set(sd) == set(want)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert len(sd) == schema["num_state_dict_tensors"]


def test_periods_buffer_is_upstream_formula():
    m = NAF(dim=64, heads_rope=4, rope_base=100.0)
    D = 16
    want = 100.0 ** (2 * torch.arange(D // 4, dtype=torch.float64) / (D // 2))
    torch.testing.assert_close(m.image_encoder.rope.periods.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "S,P,T,C",
    [
        (50, 7, 23, 12),  # T not a multiple of P: dilation 3 with unequal groups
        (100, 5, 20, 8),  # guide > 4T: bilinear pre-shrink branch
        (45, 6, 30, 16),  # odd guide, encoder pooling 1.5x
    ],
)
def test_awkward_sizes_match_materialised_reference(S, P, T, C):
    m = random_naf(dim=32, heads_attn=2, heads_rope=2, kernel_size=5)
    g = torch.Generator().manual_seed(S)
    image = torch.rand(1, 3, S, S, generator=g)
    feats = torch.randn(1, C, P, P, generator=g)
    with torch.no_grad():
        out = m(image, feats, (T, T), max_elements=5000)
        ref = reference_forward(m, image, feats, (T, T))
    assert out.shape == (1, C, T, T)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_forward_at_equals_forward():
    m = random_naf(dim=32, heads_attn=4, heads_rope=2, kernel_size=3)
    g = torch.Generator().manual_seed(1)
    image, feats = torch.rand(1, 3, 40, 40, generator=g), torch.randn(1, 20, 5, 5, generator=g)
    rows, cols = torch.randint(0, 35, (29,), generator=g), torch.randint(0, 35, (29,), generator=g)
    with torch.no_grad():
        full = m(image, feats, (35, 35))
        sel = m.forward_at(image, feats, (35, 35), rows, cols)
    torch.testing.assert_close(sel[0], full[0, :, rows, cols].T, atol=1e-6, rtol=1e-6)


def test_nearest_exact_index_reproduces_interpolate():
    for P, T in ((9, 36), (7, 23), (10, 80), (6, 4)):
        src = torch.randn(1, 1, P, 1)
        out = F.interpolate(src, size=(T, 1), mode="nearest-exact")
        assert torch.equal(out[0, 0, :, 0], src[0, 0, nearest_exact_index(P, T), 0])


def test_load_naf_pth_round_trip(tmp_path):
    m = random_naf(dim=32, heads_attn=2, heads_rope=2)
    path = tmp_path / "naf.pth"
    torch.save(m.state_dict(), path)
    loaded = load_naf_pth(path, dim=32, heads_attn=2, heads_rope=2)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    torch.save({"model": m.state_dict()}, tmp_path / "nested.pth")
    with pytest.raises(ValueError):
        load_naf_pth(tmp_path / "nested.pth", dim=32, heads_attn=2, heads_rope=2)
