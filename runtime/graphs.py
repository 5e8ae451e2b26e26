"""CUDA graphs over static buffers: run once eagerly, capture, then replay (DESIGN.md §4).

A `GraphRunner` wraps a no-argument function that reads only from buffers the caller keeps at fixed
addresses (inputs are copied into them before each call) and returns a tensor. The first call runs
the function eagerly: that warms every library path at this shape (cuBLAS heuristics, cuDNN plans,
Triton compilation) and its result is the real result of that step, so no forward is wasted on
warm-up. The graph is then captured (capture records launches, it executes nothing) and later calls
replay it. The capture does not wait for the eager call to finish on the GPU: its host-side work
(recording every launch) overlaps that call's execution, which `torch.cuda.graph` would serialise
with a device synchronisation first (`PIXAL3D_SYNC_CAPTURE=1` restores that). The output of a replay lives in the graph's pool and is overwritten by the next replay:
callers copy out what they keep.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

_capture_stream = None  # one side stream for every capture (capture cannot use the legacy default stream)


def capture_stream() -> "torch.cuda.Stream":
    global _capture_stream
    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
    return _capture_stream


class GraphRunner:
    def __init__(self, fn: Callable[[], torch.Tensor], pool=None, enabled: bool = True):
        """pool: a graph memory-pool handle shared with other runners, or a callable returning one
        (read at capture time), or None for a private pool."""
        self.fn = fn
        self.pool = pool
        self.enabled = enabled and torch.cuda.is_available()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: torch.Tensor | None = None
        self.calls = 0
        self.capture_error: str | None = None
        # host seconds of the last eager call (its enqueue) and of the capture: where a cold stage's
        # time goes when the GPU waits for the host (small token counts)
        self.eager_host_s = 0.0
        self.capture_host_s = 0.0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.static_out
        t0 = time.perf_counter()
        out = self.fn()
        t1 = time.perf_counter()
        self.eager_host_s = t1 - t0
        if self.enabled and self.capture_error is None:
            self._capture()
            self.capture_host_s = time.perf_counter() - t1
        return out

    def _capture(self) -> None:
        g = torch.cuda.CUDAGraph()
        try:
            pool = self.pool() if callable(self.pool) else self.pool
            if os.environ.get("PIXAL3D_SYNC_CAPTURE", "0") == "1":  # off-switch: wait for the eager call
                torch.cuda.synchronize()
            # no synchronize first: the graph reads only the caller's static buffers and allocates
            # from its own pool, so nothing it records depends on the eager call still running
            with torch.cuda.stream(capture_stream()):
                g.capture_begin(pool=pool)
                try:
                    self.static_out = self.fn()
                finally:
                    g.capture_end()
            self.graph = g
        except Exception as e:  # a path that cannot be captured keeps running eagerly (recorded)
            self.capture_error = f"{type(e).__name__}: {e}"
            self.graph = None
            self.static_out = None
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.graph = None
        self.static_out = None
