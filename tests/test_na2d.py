"""na2d reference: golden cases, a naive per-pixel loop on awkward sizes, na2d_at."""
import pytest
import torch

from pixal3d_rt.kernels.na2d import na2d, na2d_at, neighbour_window

from golden_fixtures import golden


def golden_fixture(name):
    from pixal3d_rt.tools.parity import load_fixture

    return load_fixture(golden(f"{name}.json"))


def naive_window(L, k, d, i):
    """NATTEN's neighbourhood of position i, straight from the definition (python ints)."""
    g, s = i % d, i // d
    Lg = L // d + (1 if g < L % d else 0)
    c = min(max(s, k // 2), Lg - 1 - k // 2)
    return [(c + o) * d + g for o in range(-(k // 2), k // 2 + 1)]


def naive_na2d(q, k, v, ks, dil):
    B, X, Y, H, D = q.shape
    out = torch.zeros(B, X, Y, H, v.shape[-1], dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for x in range(X):
        wx = naive_window(X, ks[0], dil[0], x)
        for y in range(Y):
            wy = naive_window(Y, ks[1], dil[1], y)
            kn = k[:, wx][:, :, wy].reshape(B, -1, H, D)
            vn = v[:, wx][:, :, wy].reshape(B, -1, H, v.shape[-1])
            logits = torch.einsum("bhd,bnhd->bhn", q[:, x, y], kn) / D**0.5
            out[:, x, y] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), vn)
    return out.float()


def test_golden_na2d_cases():
    import pixal3d_rt.tools.parity_cond  # noqa: F401  (registers the runners)
    from pixal3d_rt.tools.parity import check_fixture

    fx = golden_fixture("na2d")
    ok, comps, err = check_fixture(fx)
    assert ok, (err, [c for c in comps if not c.ok])
    assert {c.key for c in comps} >= {f"out.case{i}.out" for i in range(len(fx.config["args"]["cases"]))}


@pytest.mark.parametrize(
    "X,Y,H,Dqk,Dv,ks,dil",
    [
        (17, 11, 2, 8, 12, (3, 5), (5, 2)),  # d does not divide L: groups of unequal length
        (13, 20, 1, 4, 4, (7, 3), (1, 6)),
        (9, 9, 3, 6, 10, (9, 1), (1, 9)),  # window = whole axis; kernel 1
        (23, 14, 2, 8, 8, (5, 5), (4, 2)),
    ],
)
def test_na2d_matches_naive_loop(X, Y, H, Dqk, Dv, ks, dil):
    g = torch.Generator().manual_seed(X * 100 + Y)
    q = torch.randn(2, X, Y, H, Dqk, generator=g)
    k = torch.randn(2, X, Y, H, Dqk, generator=g)
    v = torch.randn(2, X, Y, H, Dv, generator=g)
    want = naive_na2d(q, k, v, ks, dil)
    got = na2d(q, k, v, ks, dil, max_elements=3000)  # tiny chunks: exercise the chunk loop
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for axis, L in ((0, X), (1, Y)):
        tab = neighbour_window(L, ks[axis], dil[axis])
        assert tab.tolist() == [naive_window(L, ks[axis], dil[axis], i) for i in range(L)]


def test_na2d_at_equals_full():
    g = torch.Generator().manual_seed(3)
    X, Y, H = 19, 26, 2
    q, k = torch.randn(1, X, Y, H, 8, generator=g), torch.randn(1, X, Y, H, 8, generator=g)
    v = torch.randn(1, X, Y, H, 16, generator=g)
    full = na2d(q, k, v, (5, 7), (3, 2))
    rows = torch.randint(0, X, (37,), generator=g)
    cols = torch.randint(0, Y, (37,), generator=g)
    got = na2d_at(q[:, rows, cols], k, v, rows, cols, (5, 7), (3, 2), max_elements=2000)
    torch.testing.assert_close(got, full[:, rows, cols], atol=1e-6, rtol=1e-6)


def test_na2d_at_through_index_maps_equals_materialised_upsampling():
    g = torch.Generator().manual_seed(4)
    P, T, H = 7, 23, 2  # T not a multiple of P
    q = torch.randn(1, T, T, H, 8, generator=g)
    k_lr, v_lr = torch.randn(1, P, P, H, 8, generator=g), torch.randn(1, P, P, H, 6, generator=g)
    ix = torch.randint(0, P, (T,), generator=g).sort().values
    iy = torch.randint(0, P, (T,), generator=g).sort().values
    k_full, v_full = k_lr[:, ix][:, :, iy], v_lr[:, ix][:, :, iy]
    dil = (T // P, T // P)
    full = na2d(q, k_full, v_full, 5, dil)
    rows = torch.arange(T).repeat_interleave(T)
    cols = torch.arange(T).repeat(T)
    got = na2d_at(q.reshape(1, T * T, H, 8), k_lr, v_lr, rows, cols, 5, dil, kv_index=(ix, iy))
    torch.testing.assert_close(got.view(1, T, T, H, 6), full, atol=1e-6, rtol=1e-6)


def test_na2d_rejects_invalid_windows():
    q = torch.zeros(1, 8, 8, 1, 4)
    with pytest.raises(ValueError):
        na2d(q, q, q, 4, 1)  # even kernel
    with pytest.raises(ValueError):
        na2d(q, q, q, 5, 2)  # 5*2 > 8
