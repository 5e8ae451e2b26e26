"""Submanifold 3x3x3 conv as a Triton implicit GEMM over the neighbour map (DESIGN.md §6).

Same function as `subm_conv.subm_conv3d_reference` (the oracle):

    out[r] = bias + sum_v W[:, v, :] @ feats[nmap[r, v]]      (absent neighbour: nmap = -1, contributes 0)

with W the [Co, 3, 3, 3, Ci] weight read in place as [Co, 27, Ci] (no repacking per call).

How the work is cut:
- Rows are processed in blocks of BLOCK_M. A plan (`conv_plan`) sorts the rows by their 27-bit
  "which neighbours exist" mask, so rows of one block share most of their pattern, and lists per
  block the taps present in at least one of its rows. A block only multiplies those taps: on a
  voxel shell about a third to a half of the 27 taps, instead of all of them.
- Each program owns a BLOCK_M x BLOCK_N output tile and runs one flat loop over (present tap,
  Ci chunk): it gathers BLOCK_M input rows (BLOCK_K channels each) through the map, loads the
  matching [BLOCK_K, BLOCK_N] weight slice and accumulates in fp32; bias is added once at the end.
  The gathered operand never exists in memory, so the conv needs no workspace beyond its output.
- Tiles come from a fixed table keyed by (Ci, Co) and the GPU's shared-memory class: no runtime
  autotuning, so the first call costs one compile per tile shape (cached on disk by Triton).

Inputs fp16 or bf16 (the dispatcher's guard), fp32 accumulation, output in the input dtype. The
kernel also runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

KERNEL_VOLUME = 27


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(x))))


def tile_config(ci: int, co: int, capability: tuple[int, int] | None = None) -> TileConfig:
    """The fixed tile of a (Ci, Co) conv on a GPU of compute capability `capability` (None: CPU interpreter).

    BLOCK_K covers Ci in 64-wide chunks (16 minimum for the MMA). Datacenter parts (sm_80, sm_90,
    sm_100: 164-228 KB of shared memory per block) take the tiles measured best on an H200
    (benchmarks/results/sparse_conv_h200.json): 128x256 output tiles for Co >= 256, 128x128 with four
    pipeline stages for Co = 128, 64x64 for Co <= 64. (64x256 came out 3-10% faster than 128x256 on
    five of six Co >= 256 shapes in that run; the table stays the one the whole-decoder run measured.)
    Consumer parts (sm_86/89/120: about 100 KB) keep at most 128x128 tiles and three stages.
    """
    block_k = min(64, _pow2_at_least(ci, 16))
    datacenter = capability is None or capability in ((8, 0), (9, 0), (10, 0))
    if co >= 256:
        block_n = 256 if datacenter else 128
        return TileConfig(128, block_n, block_k, 8, 3)
    if co > 64:
        return TileConfig(128, 128, block_k, 8, 4 if datacenter else 3)
    block_n = _pow2_at_least(co, 16)
    return TileConfig(64, block_n, block_k, 4, 3)


@dataclass
class ConvPlan:
    """Row order and per-block tap lists of one neighbour map for one BLOCK_M."""

    block_m: int
    perm: torch.Tensor  # int32 [R]: row processed at sorted position i
    taps: torch.Tensor  # int32 [nblocks, 27]: the block's present taps, ascending, in the first ntaps entries
    ntaps: torch.Tensor  # int32 [nblocks]: how many of them

    def taps_used(self) -> int:
        """Sum over blocks of ntaps (the benchmark's executed-work figure; synchronises)."""
        return int(self.ntaps.sum()) if self.ntaps.numel() else 0


@triton.jit
def _neighbor_mask_kernel(nmap_ptr, mask_ptr, R, stride_nm, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.arange(0, 32)
    ok = rows < R
    nb = tl.load(nmap_ptr + rows.to(tl.int64)[:, None] * stride_nm + v[None, :], mask=ok[:, None] & (v < 27)[None, :], other=-1)
    bits = tl.where(nb >= 0, 1 << v[None, :], 0)
    tl.store(mask_ptr + rows, tl.sum(bits, axis=1), mask=ok)  # distinct powers of two: the sum is the OR


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _block_taps_kernel(mask_ptr, taps_ptr, ntaps_ptr, R, BLOCK_M: tl.constexpr):
    blk = tl.program_id(0)
    offs = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    union = tl.reduce(tl.load(mask_ptr + offs, mask=offs < R, other=0), 0, _bit_or)
    v = tl.arange(0, 32)
    present = (union >> v) & 1
    slot = tl.cumsum(present, 0) - present  # position of tap v among the present ones
    tl.store(taps_ptr + blk * 27 + slot, v, mask=present == 1)
    tl.store(ntaps_ptr + blk, tl.sum(present, 0))


def neighbor_mask(nmap: torch.Tensor) -> torch.Tensor:
    """int32 [R]: bit v set where neighbour v exists (one pass over the map)."""
    r = nmap.shape[0]
    mask = torch.empty(r, dtype=torch.int32, device=nmap.device)
    if r:
        block = 128
        _neighbor_mask_kernel[(triton.cdiv(r, block),)](nmap, mask, r, nmap.stride(0), BLOCK=block)
    return mask


def conv_plan(nmap: torch.Tensor, block_m: int, sort_rows: bool = True) -> ConvPlan:
    """Plan the blocks of a conv over nmap [R, 27] (no host synchronisation).

    sort_rows=True groups rows with equal neighbour masks (the masked implicit GEMM); False keeps the
    map's order (then a block's tap list is the union over consecutive rows).
    """
    if nmap.stride(1) != 1:
        nmap = nmap.contiguous()
    r = nmap.shape[0]
    device = nmap.device
    mask = neighbor_mask(nmap)
    if sort_rows:
        mask, order = torch.sort(mask)
        perm = order.to(torch.int32)
    else:
        perm = torch.arange(r, dtype=torch.int32, device=device)
    nblocks = triton.cdiv(r, block_m)
    taps = torch.empty(nblocks, KERNEL_VOLUME, dtype=torch.int32, device=device)
    ntaps = torch.empty(nblocks, dtype=torch.int32, device=device)
    if nblocks:
        _block_taps_kernel[(nblocks,)](mask, taps, ntaps, r, BLOCK_M=block_m)
    return ConvPlan(block_m, perm, taps, ntaps)


# The row count changes with every coordinate set and chunk, and the map may be a row slice at any
# offset (its loads are per-row gathers, alignment buys nothing): neither is specialised on, so
# there is one compile per tile shape.
_NO_SPECIALIZE = {"do_not_specialize": ["R"]}
if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
    _NO_SPECIALIZE["do_not_specialize_on_alignment"] = ["nmap_ptr"]


@triton.jit(**_NO_SPECIALIZE)
def _subm_conv_kernel(
    feats_ptr, nmap_ptr, w_ptr, bias_ptr, out_ptr,
    perm_ptr, taps_ptr, ntaps_ptr,
    R, CI, CO,
    stride_f, stride_nm, stride_w, stride_o,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO
    offs_k = tl.arange(0, BLOCK_K)

    k_chunks = tl.cdiv(CI, BLOCK_K)
    n_taps = tl.load(ntaps_ptr + pid_m)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat loop over (present tap, Ci chunk) so the compiler can pipeline it as a whole
    for it in range(0, n_taps * k_chunks):
        t = it // k_chunks
        k = (it - t * k_chunks) * BLOCK_K + offs_k
        k_ok = k < CI
        v = tl.load(taps_ptr + pid_m * 27 + t)
        nb = tl.load(nmap_ptr + rows * stride_nm + v, mask=row_ok, other=-1)
        a = tl.load(
            feats_ptr + nb.to(tl.int64)[:, None] * stride_f + k[None, :],
            mask=(nb >= 0)[:, None] & k_ok[None, :],
            other=0.0,
        )
        # weight [Co, 27, Ci]: element (k, n) of the tap-v slice sits at n*27*Ci + v*Ci + k
        b = tl.load(
            w_ptr + offs_n[None, :].to(tl.int64) * stride_w + v * CI + k[:, None],
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 wrongly (as raw 16-bit ints)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_o + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# under TRITON_INTERPRET=1 `triton.jit` gives an interpreted function instead of a JITFunction
_INTERPRETED = not isinstance(_subm_conv_kernel, triton.runtime.JITFunction)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def subm_conv3d_triton(
    feats: torch.Tensor,
    nmap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: ConvPlan | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Submanifold conv on the Triton kernel. Shapes as `subm_conv3d`: feats [N, Ci], nmap int32 [R, 27],
    weight [Co, 3, 3, 3, Ci] (feats' dtype), bias [Co] or None -> [R, Co] in feats' dtype.

    plan: a `conv_plan(nmap, config.block_m)` to reuse (None: built here); config: override the tile table.
    """
    ci, co = feats.shape[1], weight.shape[0]
    r = nmap.shape[0]
    out = torch.empty(r, co, dtype=feats.dtype, device=feats.device)
    if r == 0 or co == 0:
        return out
    if ci == 0:  # nothing to multiply: only the bias
        out[:] = bias if bias is not None else 0
        return out
    config = config or tile_config(ci, co, _capability(feats.device))
    if plan is None or plan.block_m != config.block_m:
        plan = conv_plan(nmap, config.block_m)
    if feats.stride(1) != 1:
        feats = feats.contiguous()
    if nmap.stride(1) != 1:
        nmap = nmap.contiguous()
    weight = weight.contiguous()
    grid = (triton.cdiv(r, config.block_m), triton.cdiv(co, config.block_n))
    _subm_conv_kernel[grid](
        feats, nmap, weight, bias if bias is not None else weight, out,
        plan.perm, plan.taps, plan.ntaps,
        r, ci, co,
        feats.stride(0), nmap.stride(0), KERNEL_VOLUME * ci, out.stride(0),
        HAS_BIAS=bias is not None,
        DOT_FP32=_INTERPRETED and feats.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
