"""Golden parity runners for the flow transformers and the flow sampler.

Each runner builds this project's network from the fixture's own config (dims come from the
fixture, never from constants here), loads the upstream state_dict strictly, runs it in fp32 and
returns every `out.*` plus the intermediates (`mid.*`) that localise a failure.
"""
from __future__ import annotations

import torch

from ..models.registry import build_model
from ..models.sparse import SparseTensor
from ..sampler import FlowEulerGuidanceIntervalSampler
from .parity import Fixture
from .parity import register

# submodules of block 0 whose outputs upstream recorded (forward hooks), before any gating
_BLOCK0_PARTS = ("self_attn", "cross_attn", "cross_attn.cross_attn_block", "cross_attn.proj_linear", "mlp")


def _build_fp32(fx: Fixture) -> torch.nn.Module:
    config = {"name": fx.config["name"], "args": {**fx.config["args"], "dtype": "float32"}}
    model = build_model(config)
    model.load_state_dict(fx.w, strict=True)
    return model.eval()


def _record(model: torch.nn.Module, names: list[str]):
    """Forward hooks storing each named submodule's output; returns (store, remove)."""
    store, handles = {}, []
    modules = dict(model.named_modules())
    for n in names:
        if n in modules:
            handles.append(modules[n].register_forward_hook(lambda m, a, o, n=n: store.__setitem__(n, o.detach().clone())))

    def remove():
        for h in handles:
            h.remove()

    return store, remove


def _mid_names(fx: Fixture) -> list[str]:
    names = ["t_embedder", "adaLN_modulation", "input_layer"]
    names += [f"blocks.{i}" for i in range(fx.config["args"]["num_blocks"])]
    names += [f"blocks.0.{p}" for p in _BLOCK0_PARTS]
    return names


def _zeros_like_cond(cond: dict) -> dict:
    return {k: (v.replace(torch.zeros_like(v.feats)) if isinstance(v, SparseTensor) else torch.zeros_like(v))
            for k, v in cond.items()}


@register("SparseStructureFlowModel")
def run_ss_flow(fx: Fixture) -> dict:
    model = _build_fp32(fx)
    cond = {"global": fx.inp["cond.global"], "proj": fx.inp["cond.proj"]}
    store, remove = _record(model, _mid_names(fx))
    v = model(fx.inp["x"], fx.inp["t"], cond)
    remove()
    v_neg = model(fx.inp["x"], fx.inp["t"], _zeros_like_cond(cond))
    got = {"out.v": v, "out.v_neg": v_neg}
    got.update({f"mid.{k}": o for k, o in store.items()})
    return got


@register("SLatFlowModel", "ElasticSLatFlowModel")
def run_slat_flow(fx: Fixture) -> dict:
    model = _build_fp32(fx)
    coords = fx.inp["x.coords"]
    x = SparseTensor(fx.inp["x.feats"], coords)
    cond = {"global": fx.inp["cond.global"], "proj": SparseTensor(fx.inp["cond.proj.feats"], coords)}
    kwargs = {}
    if "concat_cond.feats" in fx.inp:
        kwargs["concat_cond"] = SparseTensor(fx.inp["concat_cond.feats"], coords)
    store, remove = _record(model, _mid_names(fx))
    v = model(x, fx.inp["t"], cond, **kwargs)
    remove()
    v_neg = model(x, fx.inp["t"], _zeros_like_cond(cond), **kwargs)
    got = {"out.v.feats": v.feats, "out.v_neg.feats": v_neg.feats}
    for k, o in store.items():
        if k in ("t_embedder", "adaLN_modulation", "blocks.0.cross_attn.proj_linear"):
            got[f"mid.{k}"] = o  # per-item vectors, or stored as a plain [N, C] tensor
        else:
            got[f"mid.{k}.feats"] = o
            got[f"mid.{k}.coords"] = coords
    return got


class ToyVelocity:
    """The fixtures' deterministic stand-in model (golden README §2.5):

        v(x, t_in, c) = 0.8*tanh(x) + 0.3*(t_in/1000)*x + 0.5*c[b]  (+ 0.25*concat_cond)

    with c[b] the condition vector of x's batch item b, broadcast over its voxels/tokens.
    """

    def __call__(self, x, t_in: torch.Tensor, cond: torch.Tensor, concat_cond: SparseTensor | None = None):
        if isinstance(x, SparseTensor):
            b = x.coords[:, 0].long()
            f = x.feats
            v = 0.8 * torch.tanh(f) + 0.3 * (t_in[b] / 1000)[:, None] * f + 0.5 * cond[b]
            if concat_cond is not None:
                v = v + 0.25 * concat_cond.feats
            return x.replace(v)
        expand = (-1,) + (1,) * (x.ndim - 1)
        c = cond.reshape(*cond.shape, *(1,) * (x.ndim - 2))
        return 0.8 * torch.tanh(x) + 0.3 * (t_in / 1000).reshape(expand) * x + 0.5 * c


@register("FlowEulerGuidanceIntervalSampler")
def run_sampler(fx: Fixture) -> dict:
    sampler = FlowEulerGuidanceIntervalSampler(**fx.config.get("args", {}))
    params = dict(fx.config["params"])
    kind = fx.config.get("kind", "dense")
    if kind == "dense":
        noise = fx.inp["noise"]
    else:
        noise = SparseTensor(fx.inp["noise.feats"], fx.inp["noise.coords"])
    concat_cond = None
    if "concat_cond.feats" in fx.inp:
        concat_cond = SparseTensor(fx.inp["concat_cond.feats"], noise.coords)
    sample, trace = sampler.sample(ToyVelocity(), noise, fx.inp["cond"], fx.inp["neg_cond"],
                                   concat_cond=concat_cond, return_trace=True, **params)
    got = {
        "out.samples": sample.feats if isinstance(sample, SparseTensor) else sample,
        "mid.t_seq": trace.t_seq,
        "mid.model_t_in": torch.tensor(trace.model_t_in, dtype=torch.float32),
        "mid.model_is_pos": torch.tensor(trace.model_is_pos, dtype=torch.bool),
    }
    for i, (xp, x0) in enumerate(zip(trace.x_prev, trace.x0)):
        got[f"mid.step{i}.x_prev"] = xp
        got[f"mid.step{i}.x0"] = x0
    return got
