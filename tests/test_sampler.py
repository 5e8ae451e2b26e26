"""Flow Euler sampler with CFG interval and CFG-rescale: golden parity and an independent reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pixal3d_rt.models.sparse import SparseTensor
from pixal3d_rt.sampler import FlowEulerGuidanceIntervalSampler, t_schedule
from golden_fixtures import golden


@pytest.mark.parametrize("name", ["sampler_ss", "sampler_shape", "sampler_tex"])
def test_golden_parity(name):
    p = golden(f"{name}.json")
    golden(f"{name}.safetensors")
    from pixal3d_rt.tools import parity, parity_flows  # noqa: F401  (registers the runners)

    fx = parity.load_fixture(p)
    ok, comps, err = parity.check_fixture(fx)
    assert not err, err
    bad = [f"{c.key}: abs={c.max_abs:.3e} {c.note}" for c in comps if not c.ok]
    assert ok and not bad, "\n".join(bad)
    keys = {c.key for c in comps}
    assert {"mid.model_is_pos", "mid.t_seq", "mid.model_t_in"} <= keys  # CFG decisions checked exactly


# ---------------------------------------------------------------------------------------------
# independent reference: float64 numpy, one batch item at a time, written from the formulas


def _reference_sample(velocity, items, conds, negs, steps, strength, rescale, rescale_t, interval, sparse, sigma=1e-5):
    """`items`: list of float64 arrays (one per batch item); velocity(item_index, x, t, c) -> v."""
    s = np.linspace(1.0, 0.0, steps + 1)
    ts = [float(v) for v in rescale_t * s / (1 + (rescale_t - 1) * s)]
    out, calls = [], []
    for b, x in enumerate(items):
        x = x.copy()
        for i in range(steps):
            t, tp = ts[i], ts[i + 1]
            g = strength if interval[0] <= t <= interval[1] else 1.0
            if g == 1.0:
                v = velocity(b, x, t, conds[b])
                if b == 0:
                    calls.append(True)
            else:
                vp, vn = velocity(b, x, t, conds[b]), velocity(b, x, t, negs[b])
                if b == 0:
                    calls += [True, False]
                v = g * vp + (1 - g) * vn
                if rescale > 0:
                    k = sigma + (1 - sigma) * t
                    x0p, x0c = (1 - sigma) * x - k * vp, (1 - sigma) * x - k * v
                    ddof = 0 if sparse else 1  # sparse: population std; dense: unbiased torch.std
                    x0 = rescale * x0c * (x0p.std(ddof=ddof) / x0c.std(ddof=ddof)) + (1 - rescale) * x0c
                    v = ((1 - sigma) * x - x0) / k
            x = x - (t - tp) * v
        out.append(x)
    return out, calls


def _toy(x, t, c):  # a non-linear velocity with a per-item condition
    return 0.7 * np.tanh(x) + 0.2 * t * x + 0.4 * c


@pytest.mark.parametrize("sparse", [False, True])
def test_matches_independent_reference(sparse):
    g = torch.Generator().manual_seed(11)
    C, steps, strength, rescale, rescale_t, interval = 5, 7, 4.0, 0.6, 2.5, (0.3, 0.8)
    cond = torch.randn(2, C, generator=g)
    neg = torch.randn(2, C, generator=g) * 0.1
    if sparse:
        counts = [13, 6]
        coords = torch.cat([torch.cat([torch.full((n, 1), b), torch.randint(0, 9, (n, 3), generator=g)], 1)
                            for b, n in enumerate(counts)]).int()
        noise = SparseTensor(torch.randn(sum(counts), C, generator=g), coords)
        items = [noise.feats[:13].double().numpy(), noise.feats[13:].double().numpy()]
    else:
        noise = torch.randn(2, C, 3, 2, 5, generator=g)
        items = [noise[b].double().numpy() for b in range(2)]

    def model(x, t_in, c):
        t = t_in / 1000
        if isinstance(x, SparseTensor):
            b = x.coords[:, 0].long()
            return x.replace(0.7 * torch.tanh(x.feats) + 0.2 * t[b, None] * x.feats + 0.4 * c[b])
        shape = (-1,) + (1,) * (x.ndim - 1)
        return 0.7 * torch.tanh(x) + 0.2 * t.reshape(shape) * x + 0.4 * c.reshape(*c.shape, 1, 1, 1)

    def velocity(b, x, t, c):
        c = c.double().numpy()
        return _toy(x, float(np.float32(1000 * t)) / 1000, c if sparse else c.reshape(C, 1, 1, 1))

    got, trace = FlowEulerGuidanceIntervalSampler(1e-5).sample(
        model, noise, cond, neg, steps=steps, rescale_t=rescale_t, guidance_strength=strength,
        guidance_rescale=rescale, guidance_interval=interval, return_trace=True)
    want, calls = _reference_sample(velocity, items, cond, neg, steps, strength, rescale, rescale_t, interval, sparse)
    got = got.feats if sparse else got
    want = torch.from_numpy(np.concatenate(want) if sparse else np.stack(want)).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert trace.model_is_pos == calls
    assert trace.t_seq.dtype == torch.float64 and len(trace.x_prev) == steps == len(trace.x0)


def test_schedule_is_float64_and_interval_edge_gets_cfg():
    ts = t_schedule(12, 3.0)
    s = np.linspace(1, 0, 13)
    assert ts == (3.0 * s / (1 + 2.0 * s)).tolist()  # float64, same operation order as upstream
    edge = [t for t in ts if t == 0.6]
    assert edge, "t = 0.6 must land exactly on the interval edge in float64"

    calls = []

    def model(x, t_in, c):
        calls.append((float(t_in[0]), c))
        return torch.zeros_like(x)

    x = torch.randn(1, 2, 2, 2, 2)
    FlowEulerGuidanceIntervalSampler().sample(model, x, "pos", "neg", steps=12, rescale_t=3.0,
                                              guidance_strength=7.5, guidance_interval=(0.6, 1.0))
    in_interval = sum(0.6 <= t <= 1.0 for t in ts[:-1])
    assert len(calls) == 12 + in_interval
    assert (math.isclose(calls[2 * in_interval - 2][0], 600.0)
            and [c for _, c in calls[:2 * in_interval]] == ["pos", "neg"] * in_interval)


def test_strength_one_zero_progress_and_concat_cond():
    seen = []

    def model(x, t_in, c, concat_cond=None):
        seen.append((c, concat_cond))
        assert t_in.dtype == torch.float32 and t_in.shape == (x.batch_size,)
        return x.replace(torch.ones_like(x.feats))

    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [1, 2, 2, 2]], dtype=torch.int32)
    noise = SparseTensor(torch.zeros(3, 4), coords)
    extra = SparseTensor(torch.ones(3, 2), coords)
    progress = []
    out = FlowEulerGuidanceIntervalSampler().sample(model, noise, "pos", "neg", steps=5, guidance_strength=1.0,
                                                    concat_cond=extra, progress=lambda i, n: progress.append((i, n)))
    assert [c for c, _ in seen] == ["pos"] * 5 and all(cc is extra for _, cc in seen)
    assert progress == [(i, 5) for i in range(1, 6)]  # 1-based: the last report is 5/5
    torch.testing.assert_close(out.feats, -torch.ones(3, 4))  # x(0) = x(1) - 1 * v for a constant v = 1
    assert torch.equal(out.coords, coords)

    seen.clear()
    FlowEulerGuidanceIntervalSampler().sample(model, noise, "pos", "neg", steps=3, guidance_strength=0.0)
    assert [c for c, _ in seen] == ["neg"] * 3


def test_host_timestep_models_get_the_timestep_on_the_host():
    """Upstream's t_in lives on the model's device (a blocking copy every step); a model that declares
    `host_timestep` (the cuda backend) gets it on the CPU, same values; others are unchanged."""
    class Model:
        def __init__(self, host):
            self.host_timestep = host
            self.seen = []

        def __call__(self, x, t_in, c):
            self.seen.append((t_in.device.type, t_in.dtype, tuple(t_in.shape), c))
            return x * 0.5

        def cfg_pair(self, x, t_in, c, n):
            self.seen.append((t_in.device.type, t_in.dtype, tuple(t_in.shape), "pair"))
            return x * 0.5, x * 0.25

    x = torch.randn(1, 2, 3, 3, 3, device="meta")  # a device that is neither the CPU nor the default
    params = dict(steps=4, guidance_strength=3.0, guidance_interval=(0.5, 1.0))
    host, dev = Model(True), Model(False)
    FlowEulerGuidanceIntervalSampler().sample(host, x, "pos", "neg", **params)
    FlowEulerGuidanceIntervalSampler().sample(dev, x, "pos", "neg", **params)
    assert {s[0] for s in host.seen} == {"cpu"} and {s[0] for s in dev.seen} == {"meta"}
    assert [s[1:] for s in host.seen] == [s[1:] for s in dev.seen]
    assert {s[3] for s in host.seen} == {"pair", "pos"}
