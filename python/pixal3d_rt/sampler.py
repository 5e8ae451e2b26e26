"""Flow-matching Euler sampler with classifier-free guidance on a time interval.

Upstream: `FlowEulerGuidanceIntervalSampler(sigma_min=1e-5)` (Pixal3D / TRELLIS.2
`pipelines/samplers/*`). The model predicts a velocity v at time t in [0, 1] (t = 1 is noise):

    t_seq = r*s / (1 + (r-1)*s),  s = linspace(1, 0, steps+1)        float64 (numpy), as upstream
    per step (t, t_prev):  v = guided velocity at t;  x <- x - (t - t_prev) * v

The schedule stays float64 on purpose: whether a step gets CFG (interval[0] <= t <= interval[1])
is decided on these exact values (t = 0.6 lands exactly on the shape stage's interval edge).
CFG-rescale's std is the *unbiased* std over all non-batch dims for dense tensors, and the
*population* std per batch item over its tokens and channels for sparse tensors (upstream's
`VarLenTensor.std`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .models.sparse import SparseTensor


def t_schedule(steps: int, rescale_t: float = 1.0) -> list[float]:
    """Warped time points t_0 = 1 > ... > t_steps = 0, as Python floats (float64)."""
    s = np.linspace(1, 0, steps + 1)
    return (rescale_t * s / (1 + (rescale_t - 1) * s)).tolist()


def guidance_strength_at(t: float, guidance_strength: float, guidance_interval) -> float:
    """CFG strength applied at time t: the given strength inside the closed interval, else 1 (no CFG)."""
    return guidance_strength if guidance_interval[0] <= t <= guidance_interval[1] else 1.0


def dense_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std over every non-batch dim, keepdim (torch.std, as upstream uses for dense x)."""
    return x.std(dim=list(range(1, x.ndim)), keepdim=True)


def varlen_std(feats: torch.Tensor, counts: list[int], batch_index: torch.Tensor) -> torch.Tensor:
    """Population std per batch item over its rows and channels, broadcast back to rows `[N, 1]`.

    Mirrors `VarLenTensor.std`: sqrt(E[x^2] - E[x]^2) with E = segment mean of per-row channel means.
    The segments are split by the host-side counts (upstream's `segment_reduce` with device lengths
    waits for the GPU on every call, twice per guided step).
    """
    rows = torch.stack([feats.mean(dim=1), (feats ** 2).mean(dim=1)], dim=1)  # [N, 2]: E_c[x], E_c[x^2]
    seg = torch.stack([r.mean(dim=0) for r in rows.split(counts)]) if len(counts) > 1 else rows.mean(dim=0, keepdim=True)
    return (seg[:, 1:] - seg[:, :1] ** 2).sqrt()[batch_index]


def _batch_index(counts: list[int], device) -> torch.Tensor:
    """[N] batch item of each row, filled on the device (a host-to-device copy waits for the GPU)."""
    parts = [torch.full((c,), i, dtype=torch.long, device=device) for i, c in enumerate(counts)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def velocity_to_x0(x: torch.Tensor, t: float, v: torch.Tensor, sigma_min: float) -> torch.Tensor:
    return (1 - sigma_min) * x - (sigma_min + (1 - sigma_min) * t) * v


def x0_to_velocity(x: torch.Tensor, t: float, x0: torch.Tensor, sigma_min: float) -> torch.Tensor:
    return ((1 - sigma_min) * x - x0) / (sigma_min + (1 - sigma_min) * t)


def guided_velocity(x: torch.Tensor, t: float, v_pos: torch.Tensor, v_neg: torch.Tensor, strength: float,
                    rescale: float, sigma_min: float, std: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """CFG combination `s*v_pos + (1-s)*v_neg`, then CFG-rescale of the implied x0 when rescale > 0.

    `std(x0)` returns a std broadcastable to x0 (per batch item). Tensors here are plain
    (dense x, or the feature rows of a sparse x).
    """
    v = strength * v_pos + (1 - strength) * v_neg
    if rescale > 0:
        x0_pos = velocity_to_x0(x, t, v_pos, sigma_min)
        x0_cfg = velocity_to_x0(x, t, v, sigma_min)
        x0_rescaled = x0_cfg * (std(x0_pos) / std(x0_cfg))
        x0 = rescale * x0_rescaled + (1 - rescale) * x0_cfg
        v = x0_to_velocity(x, t, x0, sigma_min)
    return v


@dataclass
class SamplerTrace:
    """What the sampler did, in the terms of the golden fixtures' `mid.*` tensors."""

    t_seq: torch.Tensor  # float64 [steps+1]
    model_t_in: list[float] = field(default_factory=list)  # float32 value of every model call, in call order
    model_is_pos: list[bool] = field(default_factory=list)  # True = cond, False = neg_cond
    x_prev: list[torch.Tensor] = field(default_factory=list)  # per step: x after the step (dense or feature rows)
    x0: list[torch.Tensor] = field(default_factory=list)  # per step: predicted x0 from the guided velocity


class FlowEulerGuidanceIntervalSampler:
    """`sample(model, noise, cond, neg_cond, ...)` with `model(x, t_in [B] float32, cond, **kwargs) -> v`.

    `x`/`noise`/`v` are dense tensors `[B, ...]` or `SparseTensor`s (the model gets and returns the
    same kind; sparse arithmetic runs on the feature rows, coordinates never change).

    Batched CFG: a model with a `cfg_pair(x, t_in, cond, neg_cond, **kwargs) -> (v_pos, v_neg)` method
    (the `cuda` backend) gets both halves of a guided step in one call; the velocities are then
    combined exactly as in the sequential path. `batched_cfg=False` forces the sequential path (the
    eager models have no `cfg_pair`, so for them it is always sequential: upstream's call order).
    """

    def __init__(self, sigma_min: float = 1e-5):
        self.sigma_min = sigma_min

    @torch.no_grad()
    def sample(
        self,
        model: Callable,
        noise,
        cond: Any,
        neg_cond: Any,
        steps: int = 50,
        rescale_t: float = 1.0,
        guidance_strength: float = 3.0,
        guidance_rescale: float = 0.0,
        guidance_interval=(0.0, 1.0),
        concat_cond: SparseTensor | torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        return_trace: bool = False,
        batched_cfg: bool | None = None,
        **model_kwargs,
    ):
        """Returns the sample at t = 0 (same kind as `noise`), or `(sample, SamplerTrace)` with return_trace.

        batched_cfg: None = use the model's `cfg_pair` when it has one; True = require it; False = never."""
        sparse = isinstance(noise, SparseTensor)
        if sparse:
            counts_list = noise.batch_counts()
            batch_size = len(counts_list)
            batch_index = _batch_index(counts_list, noise.device)
            std = lambda z: varlen_std(z, counts_list, batch_index)  # noqa: E731
            x = noise.feats
        else:
            batch_size = noise.shape[0]
            std = dense_std
            x = noise
        if concat_cond is not None:
            model_kwargs = {**model_kwargs, "concat_cond": concat_cond}

        ts = t_schedule(steps, rescale_t)
        trace = SamplerTrace(torch.tensor(ts, dtype=torch.float64)) if return_trace else None

        # upstream builds t_in on the model's device, which waits for the GPU every step (a blocking
        # host-to-device copy); a model that reads the timestep on the host (the `cuda` backend looks up
        # its precomputed modulation) gets a CPU tensor, so the host can queue steps ahead of the GPU
        t_device = "cpu" if getattr(model, "host_timestep", False) else None

        def t_tensor(x_feats, t: float) -> torch.Tensor:
            return torch.tensor([1000 * t] * batch_size, device=t_device or x_feats.device, dtype=torch.float32)

        def call(x_feats, t: float, c, is_pos: bool) -> torch.Tensor:
            t_in = t_tensor(x_feats, t)
            if trace is not None:
                trace.model_t_in.append(float(t_in[0]))
                trace.model_is_pos.append(is_pos)
            out = model(noise.replace(x_feats) if sparse else x_feats, t_in, c, **model_kwargs)
            return out.feats if sparse else out

        cfg_pair = getattr(model, "cfg_pair", None) if batched_cfg is not False else None
        if batched_cfg and cfg_pair is None:
            raise TypeError("batched_cfg=True needs a model with a cfg_pair method")

        def call_pair(x_feats, t: float):
            t_in = t_tensor(x_feats, t)
            if trace is not None:  # recorded as the sequential path would call: positive, then negative
                trace.model_t_in += [float(t_in[0])] * 2
                trace.model_is_pos += [True, False]
            pos, neg = cfg_pair(noise.replace(x_feats) if sparse else x_feats, t_in, cond, neg_cond, **model_kwargs)
            return (pos.feats, neg.feats) if sparse else (pos, neg)

        for i in range(steps):
            t, t_prev = ts[i], ts[i + 1]
            s = guidance_strength_at(t, guidance_strength, guidance_interval)
            if s == 1:
                v = call(x, t, cond, True)
            elif s == 0:
                v = call(x, t, neg_cond, False)
            else:
                if cfg_pair is not None:
                    v_pos, v_neg = call_pair(x, t)
                else:  # positive call first, as upstream
                    v_pos = call(x, t, cond, True)
                    v_neg = call(x, t, neg_cond, False)
                v = guided_velocity(x, t, v_pos, v_neg, s, guidance_rescale, self.sigma_min, std)
            x_prev = x - (t - t_prev) * v
            if trace is not None:
                trace.x_prev.append(x_prev)
                trace.x0.append(velocity_to_x0(x, t, v, self.sigma_min))
            x = x_prev
            if progress is not None:
                progress(i + 1, steps)

        sample = noise.replace(x) if sparse else x
        return (sample, trace) if return_trace else sample
