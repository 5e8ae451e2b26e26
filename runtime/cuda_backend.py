"""The `cuda` backend of the three flow transformers (DESIGN.md §4, issue 4).

`wrap_flow(model, stage_info)` returns a `FlowBackend`: a drop-in replacement for a loaded
`SparseStructureFlowModel` / `SLatFlowModel` in the sampler (`backend(x, t_in, cond, concat_cond=None)`
returns what the model returns), plus `backend.cfg_pair(x, t_in, cond, neg_cond, concat_cond=None)`
-> (v_pos, v_neg), which the sampler uses to run both CFG halves in one batched forward.

The savings are exact (the same function as the eager bf16 model up to summation order and bf16
rounding placement; tests/test_cuda_backend.py checks each against the eager path):

* block weights in the torso dtype once (norms, modulation, input/output layers stay fp32);
* CFG: conditional and unconditional halves as one batch of 2 x N rows on the same coordinates;
  the first block's self-attention half runs once (both halves have the same x until the first
  cross-attention), then the rows are duplicated;
* per stage and condition: the cross-attention keys of the global tokens (normalised) and the value
  side folded through `to_out` (U = W_out,h @ v_hj, so cross-attention is softmax weights @ U), the
  per-block `proj_linear` products of the per-token features (while they fit `proj_cache_bytes`);
* an all-identical context (the all-zero unconditional condition) makes every key equal, so the
  softmax is uniform and the block's cross-attention output is the fixed vector to_out(v) (+ the
  proj product of the identical proj rows): one vector per block, added, no cross-attention;
* timestep embedding and adaLN modulation of each timestep computed once (`prepare_timesteps` or on
  first sight) and kept as a [blocks, 6, C] table;
* fused row kernels (kernels/flow_kernels.py): residual + gate + LayerNorm/modulation in one pass,
  QK-RMSNorm + RoPE in one pass, cross-attention softmax with its query norm in one pass; the MLP's
  GELU in the cuBLASLt epilogue of fc1 (checked against the tanh GELU first);
* attention: an SDPA backend (cuDNN / flash / efficient) or the Triton kernel with the query
  prologue fused (kernels/attention_triton.py), picked by measurement (benchmarks/flows.md);
* CUDA graphs per stage: the first call at a token count runs eagerly (its result is used), the
  graph is captured then and replayed for the remaining steps; inputs are copied into static
  buffers, stage constants are refilled in place, so the SS stage (always 16^3 tokens) keeps its
  graphs across images.

Runtime parameters kept for the memory scheduler (only resident/unchunked is tuned): `residency`
("resident", or "streamed": the large block matrices live in pinned host memory and are copied
block by block to the device on a side stream, one block ahead, by runtime/residency.py's
`WeightStreamer`; no CUDA graphs then; `resident_blocks` keeps the first blocks on the device, so
only the rest cross the bus each forward) and `token_chunk` (rows per chunk of the row-local work after
attention: to_out, norms, cross-attention, MLP; attention itself sees all tokens). `unload()` frees
the backend's device copies between stages; the next call (or `load()`) makes them again.

Unsupported inputs (several batch items, no QK-RMSNorm) run the wrapped eager model unchanged.
"""
from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pixal3d_rt.models.flow import SLatFlowModel, SparseStructureFlowModel
from pixal3d_rt.models.flow_layers import ProjectAttention, rope_cos_sin, to_dtype
from pixal3d_rt.models.sparse import SparseTensor

from pixal3d_rt.kernels import flow_kernels as fk
from .graphs import GraphRunner
from .residency import RESIDENT, STREAMED, WeightStreamer, host_copy

# measured on the H200 (benchmarks/flows.md): the attention used when `attention="auto"`
DEFAULT_ATTENTION = {"cuda": "cudnn", "cpu": "math"}
ATTENTION_CHOICES = ("auto", "cudnn", "flash", "efficient", "math", "triton")


@dataclass
class BackendOptions:
    attention: str = "auto"  # one of ATTENTION_CHOICES
    graphs: bool = True  # CUDA graphs (CUDA, resident weights only)
    residency: str = RESIDENT  # RESIDENT | STREAMED (runtime/residency.py); per stage: unload()/load()
    resident_blocks: int = 0  # STREAMED: the first blocks whose matrices stay on the device (the rest stream)
    token_chunk: int | None = None  # rows per chunk of the post-attention work (None: all rows)
    proj_cache_bytes: int = 12 << 30  # per condition; above it proj_linear runs every forward
    fused: bool | None = None  # Triton row kernels (None: on CUDA unless PIXAL3D_NO_TRITON=1)
    gelu_epilogue: bool | None = None  # cuBLASLt GELU epilogue for fc1 (None: on CUDA, after a check)
    device: str | None = None  # compute device (None: the model's)
    dtype: str | None = None  # torso dtype (None: the model's)
    attention_config: dict = field(default_factory=dict)  # Triton attention tile config
    # SDPA: the prologue writes a contiguous V instead of SDPA reading it in place (None: only when
    # torch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 is set, whose ragged cuDNN path needs contiguous
    # q, k, v to reuse one attention plan across token counts: benchmarks/results/first_call_h200.json)
    v_copy: bool | None = None

    @classmethod
    def from_mapping(cls, m: dict | None) -> "BackendOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (m or {}).items() if k in names})


def wrap_flow(model, stage_info=None, **options) -> "FlowBackend":
    """Wrap a loaded flow model. `stage_info`: None, a stage name, or a dict with optional keys
    "name", "t_values" (model times 1000*t to precompute) and any `BackendOptions` field; keyword
    options override it. Returns the backend (callable like the model, plus `cfg_pair`)."""
    info = {"name": stage_info} if isinstance(stage_info, str) else dict(stage_info or {})
    info.update(options)
    backend = FlowBackend(model, BackendOptions.from_mapping(info), name=info.get("name"))
    if info.get("t_values"):
        backend.prepare_timesteps(info["t_values"])
    return backend


def _rmsnorm_heads(z: torch.Tensor, gamma: torch.Tensor, dtype) -> torch.Tensor:
    """MultiHeadRMSNorm on [..., H, D]: fp32, x gamma x sqrt(D), rounded to the torso dtype."""
    return (F.normalize(z.float(), dim=-1) * gamma * z.shape[-1] ** 0.5).to(dtype)


class _CondSlot:
    """Stage constants of one condition (static buffers, refilled in place for a new condition)."""

    def __init__(self):
        self.refs = ()
        self.versions = ()
        self.kind = None  # "attn" | "const"
        self.m_ctx = 0
        self.kc = self.U = self.P = self.proj = self.cvec = None

    def matches(self, tensors) -> bool:
        if len(tensors) != len(self.refs):
            return False
        for t, r, v in zip(tensors, self.refs, self.versions):
            if (t is None) != (r is None) or (t is not None and (r() is not t or t._version != v)):
                return False
        return True

    def remember(self, tensors) -> None:
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.versions = tuple(None if t is None else t._version for t in tensors)


class _TokenState:
    """Everything that depends on the token set: positions, static input buffers, condition slots
    and the CUDA graphs captured at this token count."""

    def __init__(self, n: int, key, cos: torch.Tensor, sin: torch.Tensor):
        self.n = n
        self.key = key
        self.cos = cos
        self.sin = sin
        self.in_buf = None
        self.mod_buf = None
        self.concat_ref = None
        self.slots = [None, None]
        self.slot_used = [0, 0]
        self.graphs: dict = {}


class FlowBackend:
    """Fast path of one flow model (see the module docstring)."""

    # the sampler passes the timestep as a CPU tensor: reading it never waits for the GPU
    host_timestep = True

    def __init__(self, model, options: BackendOptions | None = None, name: str | None = None):
        opts = options or BackendOptions()
        if opts.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention {opts.attention!r}: choose one of {ATTENTION_CHOICES}")
        if opts.residency not in (RESIDENT, STREAMED):
            raise ValueError(f"residency {opts.residency!r}: {RESIDENT!r} or {STREAMED!r}")
        self.model = model
        self.name = name
        self.opts = opts
        self.device = torch.device(opts.device) if opts.device else next(model.parameters()).device
        self.dtype = to_dtype(opts.dtype) if opts.dtype else model.dtype
        self.cuda = self.device.type == "cuda"
        self.dense = isinstance(model, SparseStructureFlowModel)
        if not self.dense and not isinstance(model, SLatFlowModel):
            raise TypeError(f"wrap_flow: {type(model).__name__} is not a flow model")
        self.C, self.H, self.D = model.model_channels, model.num_heads, model.head_dim
        self.nb = len(model.blocks)
        self.proj_mode = model.image_attn_mode == "proj"
        blk0 = model.blocks[0]
        self.supported = (blk0.self_attn.qk_rms_norm and blk0.share_mod and self.D % 2 == 0)
        self.use_triton = fk.triton_enabled(self.device) if opts.fused is None else bool(opts.fused)
        self.attention = opts.attention
        if self.attention == "auto":
            self.attention = DEFAULT_ATTENTION["cuda" if self.cuda else "cpu"]
        if self.attention == "triton" and not self.use_triton:
            self.attention = "math" if not self.cuda else "cudnn"
        self.v_copy = opts.v_copy if opts.v_copy is not None else os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE") == "1"
        self.use_graphs = opts.graphs and self.cuda and opts.residency == RESIDENT
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._mod_cache: dict[float, torch.Tensor] = {}
        self._state: _TokenState | None = None
        self.stats = {"eager_forwards": 0, "graph_replays": 0, "graph_captures": 0, "capture_errors": [],
                      "slot_fills": 0, "fallback_calls": 0, "token_states": 0,
                      "eager_host_ms": [], "capture_host_ms": []}
        self.loaded = False
        self.load()
        self.gelu_epilogue = opts.gelu_epilogue if opts.gelu_epilogue is not None else self._check_gelu_epilogue()

    # ------------------------------------------------------------------------------------------
    # weights

    def load(self) -> None:
        """The device copies of the weights (after `unload`; calls load them when needed)."""
        if not self.loaded:
            self._load_weights()
            self.loaded = True

    def unload(self) -> None:
        """Free the device copies of the weights this backend made, with the token state, condition
        constants, graphs and timestep tables (`reset`); the next call loads them again. Tensors that
        were the model's own (already on the device in the right dtype) stay the model's."""
        self.reset()
        if self.streamer is not None:
            self.streamer.release_all()
        self.t_embedder = self.adaLN = self.streamer = self._modulations = None
        self.in_w = self.in_b = self.out_w = self.out_b = None
        self.blocks = []
        self.loaded = False

    def _load_weights(self) -> None:
        m, dev, dt = self.model, self.device, self.dtype

        def small(t, dtype=None):  # resident copy (no copy when already right)
            return t.detach().to(device=dev, dtype=dtype or t.dtype)

        def outer(mod):  # fp32 layers outside the torso, on the compute device
            return mod if next(mod.parameters()).device == dev else copy.deepcopy(mod).to(dev)

        self.t_embedder = outer(m.t_embedder)
        self.adaLN = outer(m.adaLN_modulation) if m.share_mod else None
        self.in_w, self.in_b = small(m.input_layer.weight), small(m.input_layer.bias)
        self.out_w, self.out_b = small(m.out_layer.weight), small(m.out_layer.bias)
        self.blocks, host = [], []
        streamed = self.opts.residency == STREAMED
        kept = min(len(m.blocks), max(0, int(self.opts.resident_blocks))) if streamed else len(m.blocks)
        self.first_streamed = kept
        for b, blk in enumerate(m.blocks):
            sa = blk.self_attn
            cross = blk.cross_attn.cross_attn_block if isinstance(blk.cross_attn, ProjectAttention) else blk.cross_attn
            big = {"qkv_w": sa.to_qkv.weight, "out_w": sa.to_out.weight, "cq_w": cross.to_q.weight,
                   "fc1_w": blk.mlp.mlp[0].weight, "fc2_w": blk.mlp.mlp[2].weight}
            if self.proj_mode:
                big["proj_w"] = blk.cross_attn.proj_linear.weight
            bp = SimpleNamespace(
                qkv_b=small(sa.to_qkv.bias, dt), out_b=small(sa.to_out.bias, dt),
                gq=small(sa.q_rms_norm.gamma).float().contiguous(), gk=small(sa.k_rms_norm.gamma).float().contiguous(),
                n2w=small(blk.norm2.weight).float(), n2b=small(blk.norm2.bias).float(),
                cq_b=small(cross.to_q.bias, dt), ckv_b=small(cross.to_kv.bias, dt), cout_b=small(cross.to_out.bias, dt),
                cgq=small(cross.q_rms_norm.gamma).float().contiguous() if cross.qk_rms_norm else None,
                cgk=small(cross.k_rms_norm.gamma).float() if cross.qk_rms_norm else None,
                fc1_b=small(blk.mlp.mlp[0].bias, dt), fc2_b=small(blk.mlp.mlp[2].bias, dt),
                modulation=small(blk.modulation) if blk.share_mod else None,
                src={"ckv_w": cross.to_kv.weight, "cout_w": cross.to_out.weight},  # read once per condition
            )
            if self.proj_mode:
                pl = blk.cross_attn.proj_linear
                bp.src["proj_w"] = pl.weight
                bp.proj_b = small(pl.bias, dt)
                bp.bias_sum = (pl.bias.float() + cross.to_out.bias.float()).to(device=dev, dtype=dt)
            if b >= kept:  # streamed: the model's host tensors themselves when they already are pinned, in dt
                host.append({k: host_copy(v, dt, pin=self.cuda) for k, v in big.items()})
            else:
                for k, v in big.items():
                    setattr(bp, k, small(v, dt))
            self.blocks.append(bp)
        self.streamer = WeightStreamer(host, self.device, cyclic=True) if host else None
        self._modulations = torch.stack([bp.modulation for bp in self.blocks])  # [blocks, 6C] fp32

    def _precompute_weight(self, bp, name: str) -> torch.Tensor:
        """A block matrix used by stage precomputation (cross K/V, to_out, proj), on the device."""
        return bp.src[name].detach().to(device=self.device, dtype=self.dtype)

    def _check_gelu_epilogue(self) -> bool:
        """cuBLASLt's GELU epilogue must be the tanh GELU of the eager MLP (torch's CPU
        `_addmm_activation` is the erf GELU, so the CPU path never uses it)."""
        if not self.cuda:
            return False
        try:
            g = torch.Generator(device=self.device).manual_seed(0)
            a = torch.randn(64, 256, device=self.device, generator=g)
            w = torch.randn(512, 256, device=self.device, generator=g) / 8
            b = torch.randn(512, device=self.device, generator=g)
            epi = torch._addmm_activation(b, a, w.t(), use_gelu=True)
            lin = F.linear(a, w, b)
            d_tanh = float((epi - F.gelu(lin, approximate="tanh")).abs().max())
            d_erf = float((epi - F.gelu(lin)).abs().max())
            return d_tanh < 1e-3 and d_tanh < d_erf
        except Exception:
            return False

    # ------------------------------------------------------------------------------------------
    # public API

    def __getattr__(self, name):  # drop-in: resolution, in_channels, ... come from the model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @torch.no_grad()
    def prepare_timesteps(self, t_values) -> None:
        """Precompute the modulation tables of these model times (1000 * t, as the sampler passes)."""
        self.load()
        for t in t_values:
            self._mod_for(float(torch.tensor(float(t), dtype=torch.float32)))

    def reset(self) -> None:
        """Drop the token state, condition constants, graphs and timestep tables."""
        if self._state is not None:
            self._drop_graphs(self._state, lambda k: True)
        self._state = None
        self._mod_cache.clear()

    @torch.no_grad()
    def __call__(self, x, t, cond, concat_cond=None, **kwargs):
        self.load()
        plan = self._plan(x, t, [cond], concat_cond)
        if plan is None:
            self.stats["fallback_calls"] += 1
            return self._eager(x, t, cond, concat_cond, **kwargs)
        return self._wrap_out(x, self._execute(*plan)[0])

    @torch.no_grad()
    def cfg_pair(self, x, t, cond, neg_cond, concat_cond=None, **kwargs):
        """(model(x, t, cond), model(x, t, neg_cond)) from one forward over 2 x N rows."""
        self.load()
        plan = self._plan(x, t, [cond, neg_cond], concat_cond)
        if plan is None:
            self.stats["fallback_calls"] += 2
            return (self._eager(x, t, cond, concat_cond, **kwargs), self._eager(x, t, neg_cond, concat_cond, **kwargs))
        return tuple(self._wrap_out(x, o) for o in self._execute(*plan))

    def _eager(self, x, t, cond, concat_cond, **kwargs):
        t = t.to((x if self.dense else x.feats).device)  # a host timestep (host_timestep) for the model's embedder
        if self.dense:
            return self.model(x, t, cond)
        return self.model(x, t, cond, concat_cond=concat_cond, **kwargs)

    # ------------------------------------------------------------------------------------------
    # planning a call: token state, condition slots, static inputs

    def _split_cond(self, cond):
        """(global [1, M, Cc], proj tensor as given or None): the tensors that identify a condition."""
        if self.proj_mode:
            g, p = (cond["global"], cond["proj"]) if isinstance(cond, dict) else cond
            return g, (p.feats if isinstance(p, SparseTensor) else p)
        return cond, None

    def _plan(self, x, t, conds, concat_cond):
        if not self.supported:
            return None
        if self.dense:
            if x.dim() != 5 or x.shape[0] != 1:
                return None
            n, key = x.shape[2] * x.shape[3] * x.shape[4], "dense"
        else:
            if not isinstance(x, SparseTensor) or len(x.batch_counts()) != 1:
                return None
            n, key = x.feats.shape[0], x.coords
        if t.numel() != 1 or n == 0:
            return None
        split = [self._split_cond(c) for c in conds]
        if any(g.shape[0] != 1 or (p is not None and p.numel() != n * p.shape[-1]) for g, p in split):
            return None
        st = self._token_state(n, key)
        slot_ids = self._assign_slots(st, split)
        # attention-kind slots first, so the rows that need the cross-attention are one prefix
        order = sorted(range(len(slot_ids)), key=lambda i: st.slots[slot_ids[i]].kind != "attn")
        self._fill_inputs(st, x, concat_cond)
        st.mod_buf.copy_(self._mod_for(float(t.reshape(-1)[0])))
        return st, [slot_ids[i] for i in order], order

    def _token_state(self, n: int, key) -> _TokenState:
        st = self._state
        if st is not None and st.n == n:
            if isinstance(key, str) and st.key == key:
                return st
            if not isinstance(key, str) and st.key() is key and st.key_version == key._version:
                return st
            if not isinstance(key, str):  # same count, new coordinates: refill positions in place
                cos, sin = self._positions(key)
                st.cos.copy_(cos)
                st.sin.copy_(sin)
                st.key, st.key_version = weakref.ref(key), key._version
                return st
        if self._state is not None:
            self._drop_graphs(self._state, lambda k: True)
        cos, sin = self._positions(key)
        st = _TokenState(n, key if isinstance(key, str) else weakref.ref(key), cos, sin)
        st.key_version = None if isinstance(key, str) else key._version
        st.mod_buf = torch.empty(self.nb, 6, self.C, dtype=self.dtype, device=self.device)
        self._state = st  # the previous state (its graphs and constants) is released
        self.stats["token_states"] += 1
        return st

    def _positions(self, key):
        m = self.model
        if isinstance(key, str):
            phases = m.rope_phases
        else:
            from pixal3d_rt.models.flow_layers import rope_phases

            phases = rope_phases(key[:, 1:].to(self.device), self.D, m.rope_freq)
        return rope_cos_sin(phases.to(self.device))

    def _assign_slots(self, st: _TokenState, split) -> list[int]:
        ids = []
        for g, p in split:
            tensors = (g, p)
            hit = next((i for i, s in enumerate(st.slots) if s is not None and i not in ids and s.matches(tensors)), None)
            if hit is None:
                free = [i for i in range(len(st.slots)) if i not in ids]
                hit = min(free, key=lambda i: (st.slots[i] is not None, st.slot_used[i]))
                self._fill_slot(st, hit, g, p)
            st.slot_used[hit] = max(st.slot_used) + 1
            ids.append(hit)
        return ids

    def _fill_slot(self, st: _TokenState, idx: int, g: torch.Tensor, p: torch.Tensor | None) -> None:
        """Stage constants of one condition (one host sync: the identical-context test)."""
        dev, dt, C, H, D, n = self.device, self.dtype, self.C, self.H, self.D, st.n
        gd = g.to(device=dev).to(dt)[0]  # [M, Cc], as eager's `_context` casts
        pd = p.reshape(-1, p.shape[-1]).to(device=dev).to(dt) if p is not None else None
        const = bool((gd == gd[:1]).all()) and (pd is None or bool((pd == pd[:1]).all()))
        kind = "const" if const else "attn"
        M = gd.shape[0]
        width = -(-H * M // 16) * 16  # softmax weights padded for aligned GEMMs
        cache_p = pd is not None and self.nb * n * C * dt.itemsize <= self.opts.proj_cache_bytes
        old = st.slots[idx]
        fresh = (old is None or old.kind != kind or old.m_ctx != M or (old.P is not None) != cache_p
                 or (kind == "attn" and pd is not None and not cache_p and old.proj.shape != pd.shape))
        if fresh:
            s = _CondSlot()
            s.kind, s.m_ctx = kind, M
            if kind == "const":
                s.cvec = torch.empty(self.nb, C, dtype=dt, device=dev)
            else:
                s.kc = torch.empty(self.nb, H, M, D, dtype=dt, device=dev)
                s.U = torch.zeros(self.nb, width, C, dtype=dt, device=dev)
                if cache_p:
                    s.P = torch.empty(self.nb, n, C, dtype=dt, device=dev)
                elif pd is not None:
                    s.proj = torch.empty_like(pd)
            st.slots[idx] = s
            self._drop_graphs(st, lambda key: idx in key[0])  # they read the old buffers
        s = st.slots[idx]
        for b, bp in enumerate(self.blocks):
            ckv_w = self._precompute_weight(bp, "ckv_w")
            cout_w = self._precompute_weight(bp, "cout_w")
            if kind == "const":
                v = F.linear(gd[:1], ckv_w, bp.ckv_b)[:, C:]  # identical keys: the attention returns v
                vec = F.linear(v, cout_w, bp.cout_b)
                if pd is not None:
                    vec = F.linear(pd[:1], self._precompute_weight(bp, "proj_w"), bp.proj_b) + vec
                s.cvec[b].copy_(vec[0])
                continue
            k, v = F.linear(gd, ckv_w, bp.ckv_b).unflatten(-1, (2, H, D)).unbind(dim=-3)  # [M, H, D]
            if bp.cgk is not None:
                k = _rmsnorm_heads(k, bp.cgk, dt)
            s.kc[b].copy_(k.transpose(0, 1))
            U = torch.einsum("chd,jhd->hjc", cout_w.float().view(C, H, D), v.float()).reshape(H * M, C)
            s.U[b, : H * M].copy_(U)
            if s.P is not None:
                s.P[b].copy_(F.linear(pd, self._precompute_weight(bp, "proj_w"), bp.bias_sum))
        if s.proj is not None:
            s.proj.copy_(pd)
        s.remember((g, p))
        self.stats["slot_fills"] += 1

    def _fill_inputs(self, st: _TokenState, x, concat_cond) -> None:
        if self.dense:
            feats = x.reshape(x.shape[1], -1).t()
            extra = None
        else:
            feats = x.feats
            extra = concat_cond.feats if isinstance(concat_cond, SparseTensor) else concat_cond
        cin = feats.shape[1] + (extra.shape[1] if extra is not None else 0)
        if st.in_buf is None or st.in_buf.shape[1] != cin:
            st.in_buf = torch.empty(st.n, cin, dtype=torch.float32, device=self.device)
            st.concat_ref = None
            self._drop_graphs(st, lambda key: True)
        st.in_buf[:, : feats.shape[1]].copy_(feats)
        if extra is not None:
            ref = st.concat_ref
            if ref is None or ref[0]() is not extra or ref[1] != extra._version:
                st.in_buf[:, feats.shape[1]:].copy_(extra)
                st.concat_ref = (weakref.ref(extra), extra._version)

    def _drop_graphs(self, st: _TokenState, which) -> None:
        """Forget the graphs whose key matches; later captures go to a fresh memory pool (the caching
        allocator refuses to capture into a pool whose graphs were all released)."""
        dead = [k for k in st.graphs if which(k)]
        for k in dead:
            del st.graphs[k]
        if dead and self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()

    def _mod_for(self, tval: float) -> torch.Tensor:
        """[blocks, 6, C]: shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2 (torso dtype, as eager)."""
        tab = self._mod_cache.get(tval)
        if tab is None:
            t = torch.full((1,), tval, dtype=torch.float32, device=self.device)  # a fill, not a blocking copy
            mod = self.t_embedder(t)
            if self.adaLN is not None:
                mod = self.adaLN(mod)
            mod = mod.to(self.dtype)
            # every block at once: (fp32 modulation + torso-dtype mod) cast back, as each eager block does
            tab = (self._modulations + mod).type(mod.dtype).view(self.nb, 6, self.C)
            tab[:, 1] += 1  # 1 + scale1 and 1 + scale2, rounded to the torso dtype as in eager
            tab[:, 4] += 1
            self._mod_cache[tval] = tab
        return tab

    # ------------------------------------------------------------------------------------------
    # execution

    def _execute(self, st: _TokenState, slot_ids: list[int], order: list[int]):
        n = st.n
        key = (tuple(slot_ids), tuple(st.slots[i].kind for i in slot_ids), st.in_buf.shape[1])
        if self.use_graphs:
            runner = st.graphs.get(key)
            if runner is None:
                runner = st.graphs[key] = GraphRunner(lambda: self._forward(st, slot_ids), pool=lambda: self._pool)
            captured = runner.graph is not None
            out = runner()
            if captured:
                self.stats["graph_replays"] += 1
            else:
                self.stats["eager_forwards"] += 1
                self.stats["eager_host_ms"].append(round(runner.eager_host_s * 1e3, 2))
                if runner.graph is not None:
                    self.stats["graph_captures"] += 1
                    self.stats["capture_host_ms"].append(round(runner.capture_host_s * 1e3, 2))
                elif runner.capture_error and runner.capture_error not in self.stats["capture_errors"]:
                    self.stats["capture_errors"].append(runner.capture_error)
        else:
            out = self._forward(st, slot_ids)
            self.stats["eager_forwards"] += 1
        # rows of call position order[k] are the k-th block of n rows
        res = [None] * len(order)
        for k, pos in enumerate(order):
            res[pos] = out[k * n:(k + 1) * n].clone()  # a replay's output is overwritten by the next
        return res

    def _wrap_out(self, x, out: torch.Tensor):
        if self.dense:
            return out.t().reshape(1, out.shape[1], *x.shape[2:])
        return x.replace(out)

    def _chunks(self, total: int, n: int):
        """Row ranges of at most `token_chunk` rows that never straddle a condition's n rows."""
        step = self.opts.token_chunk or total
        for s0 in range(0, total, n):
            for r0 in range(s0, min(s0 + n, total), step):
                yield r0, min(r0 + step, s0 + n, total)

    def _fc1_gelu(self, h, w, b):
        if self.gelu_epilogue:
            return torch._addmm_activation(b, h, w.t(), use_gelu=True)
        return F.gelu(F.linear(h, w, b), approximate="tanh")

    def _self_attention(self, qkv: torch.Tensor, st: _TokenState, bp, items: int) -> torch.Tensor:
        n, H, D, C = st.n, self.H, self.D, self.C
        T = qkv.shape[0]
        if self.attention == "triton":
            from pixal3d_rt.kernels import attention_triton

            _, k, _ = fk.qk_prologue(qkv, st.cos, st.sin, bp.gq, bp.gk, H, n, do_q=False, do_v=False,
                                     use_triton=self.use_triton)
            o = attention_triton.attention(qkv[:, :C].view(items, n, H, D), k.view(items, n, H, D),
                                           qkv[:, 2 * C:].view(items, n, H, D), prologue=(st.cos, st.sin, bp.gq, n),
                                           config=self.opts.attention_config)
            return o.view(T, C)
        q, k, v = fk.qk_prologue(qkv, st.cos, st.sin, bp.gq, bp.gk, H, n, do_v=self.v_copy,
                                 use_triton=self.use_triton)
        if v is None:
            v = qkv[:, 2 * C:]  # read in place (row stride 3C), as the eager path hands v to SDPA
        q, k, v = (z.view(items, n, H, D).transpose(1, 2) for z in (q, k, v))
        backend = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                   "math": "MATH"}[self.attention]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [getattr(SDPBackend, backend)]
        if q.dtype == torch.float32 and backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            backends = []  # those two take only fp16/bf16
        # the chosen backend first; the others where it cannot take these inputs (a head dim cuDNN
        # refuses, say) instead of "No available kernel"
        backends += [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b not in backends]
        with sdpa_kernel(backends, set_priority=True):
            o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(T, C)

    def _forward(self, st: _TokenState, slot_ids: list[int]) -> torch.Tensor:
        """Rows [k*n, (k+1)*n) carry condition slot_ids[k]; returns [len(slot_ids)*n, Cout] fp32."""
        n, C, H, dt, tri = st.n, self.C, self.H, self.dtype, self.use_triton
        S = len(slot_ids)
        slots = [st.slots[i] for i in slot_ids]
        attn_rows = n * sum(s.kind == "attn" for s in slots)
        mod = st.mod_buf
        x = F.linear(st.in_buf, self.in_w, self.in_b).to(dt)  # [n, C]: both CFG halves start equal
        h = torch.empty(n * S, C, dtype=dt, device=self.device)
        fk.residual_norm(x, norm=fk.NORM_MOD, na=mod[0, 1], nb=mod[0, 0], h_out=h[:n], use_triton=tri)
        for b, bp in enumerate(self.blocks):
            streamed = self.streamer is not None and b >= self.first_streamed
            W = SimpleNamespace(**self.streamer.fetch(b - self.first_streamed)) if streamed else bp
            T = x.shape[0]
            qkv = F.linear(h[:T], W.qkv_w, bp.qkv_b)
            a = self._self_attention(qkv, st, bp, T // n)
            del qkv
            dup = S > 1 and b == 0  # first block: self-attention once, then the rows split per condition
            xo = torch.empty(n * S, C, dtype=dt, device=self.device) if dup else x
            for r0, r1 in self._chunks(T, n):
                y = F.linear(a[r0:r1], W.out_w, bp.out_b)
                norm2 = r0 < attn_rows
                fk.residual_norm(x[r0:r1], y=y, gate=mod[b, 2], norm=fk.NORM_AFFINE if norm2 else fk.NORM_NONE,
                                 na=bp.n2w, nb=bp.n2b, out_x=xo[r0:r1],
                                 out_dup=xo[r0 + n:r1 + n] if dup else None,
                                 h_out=h[r0:r1] if norm2 else None, use_triton=tri)
            del a
            if dup:
                x = xo
                for k in range(1, S):
                    if slots[k].kind == "attn":
                        h[k * n:(k + 1) * n].copy_(h[:n])
            T = x.shape[0]
            for r0, r1 in self._chunks(T, n):
                k = r0 // n
                s = slots[k]
                if s.kind == "attn":
                    qc = F.linear(h[r0:r1], W.cq_w, bp.cq_b)
                    width = s.U.shape[1]
                    p = torch.zeros(r1 - r0, width, dtype=dt, device=self.device)
                    fk.cross_probs(qc, s.kc[b], bp.cgq, H, s.m_ctx, width, out=p, use_triton=tri)
                    lo, hi = r0 - k * n, r1 - k * n
                    if s.P is not None:
                        base = s.P[b, lo:hi]
                    elif s.proj is not None:
                        base = F.linear(s.proj[lo:hi], W.proj_w, bp.bias_sum)
                    else:
                        base = bp.cout_b
                    term = torch.addmm(base, p, s.U[b])
                    fk.residual_norm(x[r0:r1], y=term, norm=fk.NORM_MOD, na=mod[b, 4], nb=mod[b, 3],
                                     out_x=x[r0:r1], h_out=h[r0:r1], use_triton=tri)
                else:
                    fk.residual_norm(x[r0:r1], vec=s.cvec[b], norm=fk.NORM_MOD, na=mod[b, 4], nb=mod[b, 3],
                                     out_x=x[r0:r1], h_out=h[r0:r1], use_triton=tri)
                f = self._fc1_gelu(h[r0:r1], W.fc1_w, bp.fc1_b)
                y = F.linear(f, W.fc2_w, bp.fc2_b)
                del f
                if b + 1 < self.nb:
                    fk.residual_norm(x[r0:r1], y=y, gate=mod[b, 5], norm=fk.NORM_MOD, na=mod[b + 1, 1],
                                     nb=mod[b + 1, 0], out_x=x[r0:r1], h_out=h[r0:r1], use_triton=tri)
                else:
                    fk.residual_norm(x[r0:r1], y=y, gate=mod[b, 5], out_x=x[r0:r1], use_triton=tri)
            if streamed:  # this block's matrices are done with: at most two streamed blocks on the device
                del W
                self.streamer.release(b - self.first_streamed)
        xf = x.float()
        return F.linear(F.layer_norm(xf, xf.shape[-1:]), self.out_w, self.out_b)
