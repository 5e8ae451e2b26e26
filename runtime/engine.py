"""The engine contract shared by every backend (DESIGN.md §4).

An `Engine` runs one exported stage network: `run({input name: tensor}) -> {output name: tensor}`
with the names, dtypes and dynamic axes of its export spec (`pixal3d_rt.runtime.specs`). The
pipeline never calls `run` directly: `stage_module(engine)` wraps an engine into a drop-in
replacement for the network it was exported from, with the same call signature:

* flows:       `module(x, t_in, cond, concat_cond=None)` — x dense `[B,Cin,R,R,R]` (SS flow) or a
               `SparseTensor` (shape/texture flows), cond `{"global", "proj"}`; returns the velocity
               in the same form as x (fp32). Sparse flows run each batch item's tokens as `[1,N,C]`
               with the RoPE tables computed once per coordinate set (cached in `x.cache`).
               `module.cfg_pair(x, t_in, cond, neg_cond, concat_cond=None) -> (v_pos, v_neg)` runs
               both CFG halves as batch 2 of one engine call (the sampler's batched CFG).
* SS decoder:  `module(latent [1,Cl,r,r,r]) -> logits [1,1,4r,4r,4r]`.
* DINOv3:      `module(image [1,3,S,S] in [0,1]) -> tokens [1, 1+reg+P², C]` (what `extract_tokens` returns).

Device memory per stage (DESIGN.md §5): `engine.placed(mode, weight_bytes)` brackets one stage as
the stage plan places the engine's network (the residency modes). `resident`: what the engine
holds on the device stays after the stage; `stage` / `streamed`: it is taken when the stage starts
and given back when it ends; `streamed` also limits the device bytes of the weights to
`weight_bytes` (the rest streamed by the runtime, for engines built with weight streaming). What
an engine holds, and how it takes and gives it back, is its backend's (`enter_stage` /
`leave_stage`); the default holds nothing per stage.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch
import torch.nn as nn

from .residency import MODES, RESIDENT, STREAMED


class Engine(ABC):
    """One stage network behind a backend. `spec` is its `ExportSpec` (names, shapes, profiles)."""

    spec = None
    path = None  # file it was loaded from, if any (for messages)
    weights = None  # planner.NetworkSize of the network as exported (its manifest record), if known
    streaming = False  # built with weight streaming: a plan may keep only part of its weights on the device

    @abstractmethod
    def run(self, inputs: dict) -> dict:
        """Named inputs (torch tensors on the engine's device) -> named outputs (torch tensors)."""

    # -- device memory per stage -------------------------------------------------------------

    @contextmanager
    def placed(self, mode: str, weight_bytes: int | None = None):
        """The engine's device memory for one stage placed as `mode` (see the module docstring);
        `weight_bytes`: the device bytes the plan gives its weights when `streamed`."""
        if mode not in MODES:
            raise ValueError(f"unknown placement {mode!r} (one of {', '.join(MODES)})")
        self.enter_stage(weight_bytes if mode == STREAMED else None)
        try:
            yield self
        finally:
            self.leave_stage(keep=mode == RESIDENT)

    def enter_stage(self, weight_bytes: int | None = None) -> None:
        """Take the device memory a stage runs with (weights, execution context); `weight_bytes`:
        the device bytes its weights may use (None: all of them)."""

    def leave_stage(self, keep: bool) -> None:
        """Give back the stage's working memory, and with `keep` False everything `enter_stage` took."""

    def _dims(self, inputs: dict) -> dict:
        """{axis name: size} of the inputs, checked against the spec's names, ranks and static sizes."""
        dims = {}
        for t in self.spec.inputs:
            if t.name not in inputs:
                raise ValueError(f"{self.spec.name}: missing input '{t.name}'")
            shape = tuple(inputs[t.name].shape)
            if len(shape) != len(t.shape):
                raise ValueError(f"{self.spec.name}: input '{t.name}' has shape {shape}, expected {t.shape}")
            for want, got in zip(t.shape, shape):
                if isinstance(want, str):
                    if dims.setdefault(want, got) != got:
                        raise ValueError(f"{self.spec.name}: axis {want} is {dims[want]} and {got} in '{t.name}'")
                elif want != got:
                    raise ValueError(f"{self.spec.name}: input '{t.name}' has shape {shape}, expected {t.shape}")
        return dims

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name if self.spec else '?'}, {self.path})"


class _StageModule(nn.Module):
    """nn.Module shell so the pipeline's `.eval()`, `.parameters()` (none: inputs stay fp32) work."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        meta = engine.spec.meta
        for k in ("resolution", "in_channels", "out_channels"):
            if k in meta:
                setattr(self, k, int(meta[k]))

    def extra_repr(self) -> str:
        return repr(self.engine)

    def network_size(self):
        """The planner's sizes of the network this engine runs (planner.network_size asks a module
        for them): as recorded at export, with streaming units only where the engine can stream."""
        from .planner import NetworkSize

        w = self.engine.weights
        if w is None:
            return NetworkSize(0)
        return w if self.engine.streaming else NetworkSize(w.bytes)


def _split(cond):
    return (cond["global"], cond["proj"]) if isinstance(cond, dict) else cond


class DenseFlowModule(_StageModule):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, concat_cond=None, **kwargs) -> torch.Tensor:
        g, p = _split(cond)
        return self.engine.run({"x": x, "t": t, "cond_global": g, "cond_proj": p})["velocity"]

    def cfg_pair(self, x, t, cond, neg_cond, concat_cond=None, **kwargs):
        """(v(cond), v(neg_cond)) in one engine call of batch 2 (the sampler's batched CFG)."""
        if x.shape[0] != 1:
            return self(x, t, cond), self(x, t, neg_cond)
        (g, p), (gn, pn) = _split(cond), _split(neg_cond)
        v = self.engine.run({"x": x.expand(2, *x.shape[1:]), "t": t.expand(2), "cond_global": torch.cat([g, gn]),
                             "cond_proj": torch.cat([p, pn])})["velocity"]
        return v[:1], v[1:]


class SparseFlowModule(_StageModule):
    def __init__(self, engine: Engine):
        super().__init__(engine)
        meta = engine.spec.meta
        self.head_dim, self.rope_freq = int(meta["head_dim"]), tuple(meta["rope_freq"])
        self.concat_channels = int(meta.get("concat_channels", 0))
        # the engine's x is the noise part; in_channels stays the network's (noise + concat), as the pipeline expects

    def rope_tables(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        from pixal3d_rt.models.flow_layers import rope_cos_sin, rope_phases

        key = f"rope_cos_sin_hd{self.head_dim}_freq{self.rope_freq[0]}-{self.rope_freq[1]}"
        if key not in x.cache:
            x.cache[key] = rope_cos_sin(rope_phases(x.coords[:, 1:], self.head_dim, self.rope_freq))
        return x.cache[key]

    def _inputs(self, x, rows, b, t, conds, cc) -> dict:
        """Engine inputs of batch item b (token rows `rows`), one batch row per condition."""
        cos, sin = self.rope_tables(x)
        k = len(conds)
        inputs = {"x": x.feats[rows].unsqueeze(0).expand(k, -1, -1), "t": t[b:b + 1].expand(k),
                  "cond_global": torch.cat([g[b:b + 1] for g, _ in conds]),
                  "cond_proj": torch.stack([p[rows] for _, p in conds]), "rope_cos": cos[rows], "rope_sin": sin[rows]}
        if self.concat_channels:
            if cc is None:
                raise ValueError(f"{self.engine.spec.name}: this network needs concat_cond ({self.concat_channels} channels)")
            inputs["concat_cond"] = cc[rows].unsqueeze(0).expand(k, -1, -1)
        return inputs

    @staticmethod
    def _feats(v):
        return getattr(v, "feats", v)

    def _run(self, x, t, conds, concat_cond) -> list[torch.Tensor]:
        conds = [(g, self._feats(p)) for g, p in map(_split, conds)]
        cc = self._feats(concat_cond) if concat_cond is not None else None
        outs, start = [[] for _ in conds], 0
        for b, n in enumerate(x.batch_counts()):  # one engine call per batch item (its own token set)
            v = self.engine.run(self._inputs(x, slice(start, start + n), b, t, conds, cc))["velocity"]
            for o, vi in zip(outs, v):
                o.append(vi)
            start += n
        return [torch.cat(o, dim=0) for o in outs]

    def forward(self, x, t: torch.Tensor, cond, concat_cond=None, **kwargs):
        return x.replace(self._run(x, t, [cond], concat_cond)[0])

    def cfg_pair(self, x, t, cond, neg_cond, concat_cond=None, **kwargs):
        """(v(cond), v(neg_cond)) with both halves as batch 2 of one engine call per item."""
        pos, neg = self._run(x, t, [cond, neg_cond], concat_cond)
        return x.replace(pos), x.replace(neg)


class SSDecoderModule(_StageModule):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.engine.run({"latent": latent})["logits"]


class DinoModule(_StageModule):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.engine.run({"image": image})["tokens"]


def stage_module(engine: Engine) -> nn.Module:
    """The drop-in module for the network `engine` was exported from."""
    cls = {"dense_flow": DenseFlowModule, "sparse_flow": SparseFlowModule, "ss_decoder": SSDecoderModule,
           "dinov3": DinoModule}[engine.spec.kind]
    return cls(engine).eval()
