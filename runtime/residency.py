"""Where a network's weights are while a stage runs (DESIGN.md §5).

Every network keeps one master copy of its weights on the host (in the dtypes it computes in;
pinned when the device is CUDA, so copies to the device are asynchronous). A stage then places them:

* `resident`: copied to the device once and kept there (until `to_host()`);
* `stage`: copied to the device for the stage and freed after it;
* `streamed`: everything but the streaming units (the blocks) copied for the stage; each unit copied
  in just before its forward, the next one prefetched on a side stream while it runs, and dropped
  after its forward, so at most two units are on the device at once.

Parameters keep their identity (only `param.data` changes), so modules, hooks and the cuda flow
backend's references stay valid. `WeightStreamer` is the one unit streamer, used by `placed(streamed)`
and by the cuda flow backend's streamed block matrices. `HostWeightStore` keeps several networks'
host copies under a byte budget, dropping the least recently used and re-reading them from their
files when needed again.
"""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

RESIDENT, STAGE, STREAMED = "resident", "stage", "streamed"
MODES = (RESIDENT, STAGE, STREAMED)


def streaming_units(module: nn.Module) -> list[nn.Module]:
    """The modules streamed one at a time: `module.blocks`, else the modules of every direct child
    ModuleList; a ModuleList inside them (a decoder level) counts as its modules, since the
    decoders iterate over a level without calling it."""
    blocks = getattr(module, "blocks", None)
    lists = [blocks] if isinstance(blocks, nn.ModuleList) else [c for c in module.children() if isinstance(c, nn.ModuleList)]
    units = []
    for lst in lists:
        for m in lst:
            units.extend(m if isinstance(m, nn.ModuleList) else [m])
    return units


def host_copy(t: torch.Tensor, dtype: torch.dtype | None = None, pin: bool = False) -> torch.Tensor:
    """`t` as a contiguous host tensor of `dtype` (pinned if `pin`): `t` itself when it already is one."""
    h = t.detach().to("cpu", dtype or t.dtype).contiguous()
    return h.pin_memory() if pin and not h.is_pinned() else h


PAGE = 4096


class PinnedArena:
    """Page-locked host memory of exactly the bytes asked for, carved into tensors: torch's pinned
    allocator rounds every tensor up to a power of two (a flow's matrices then take 1.38x their bytes
    of locked host memory). The buffer is registered with CUDA (cudaHostRegister) and unregistered by
    `release()` or when the arena is collected; its tensors stay valid after that, only no longer
    page-locked. Falls back to torch's pinned allocator where registration fails."""

    def __init__(self, shapes: list[tuple[tuple, torch.dtype]]):
        offsets, n = [], 0
        for shape, dtype in shapes:
            n = -(-n // 256) * 256  # every tensor 256-byte aligned
            offsets.append(n)
            n += dtype.itemsize * math.prod(shape)
        self.nbytes = n
        raw = torch.empty(n + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE  # page-aligned, as cudaHostRegister maps whole pages
        self.buffer = raw[start : start + n]
        self._registered = None
        if n:
            cudart = torch.cuda.cudart()
            if int(cudart.cudaHostRegister(self.buffer.data_ptr(), n, 0)) == 0:  # cudaSuccess
                self._registered = weakref.finalize(self, cudart.cudaHostUnregister, self.buffer.data_ptr())
            else:
                self.buffer = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        self.tensors = [self.buffer[o : o + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
                        for o, (shape, dtype) in zip(offsets, shapes)]

    @property
    def registered(self) -> bool:
        return self._registered is not None and self._registered.alive

    def release(self) -> None:
        """Unlock the pages now (the memory goes once no tensor of the arena is left)."""
        if self._registered is not None:
            self._registered()
        self.tensors, self.buffer = [], None


def _device_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new tensor on `device` holding `t`, copied in the current stream's order (asynchronous from
    pinned memory). On the CPU a separate copy as well, so the mechanics are observable there."""
    d = torch.empty(t.shape, dtype=t.dtype, device=device)
    d.copy_(t, non_blocking=True)
    return d


class _DeviceCopies:
    """The device copies made for one network, held weakly by storage: what counts as alive is what
    something (a parameter, a streamer slot) still references, so the sum is a measurement."""

    def __init__(self):
        self._refs: list[tuple[StorageWeakRef, int]] = []

    def add(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        self._refs.append((StorageWeakRef(s), s.nbytes()))

    def live_bytes(self) -> int:
        self._refs = [(r, n) for r, n in self._refs if not r.expired()]
        return sum(n for _, n in self._refs)


@dataclass
class _UnitCopy:
    tensors: dict
    ready: object = None  # CUDA event recorded after the copy (side stream)
    alloc_stream: object = None  # the stream whose order the memory was allocated (and is freed) in
    consumed: bool = False  # a compute stream waited for `ready`


class WeightStreamer:
    """Units of weights (dicts key -> host tensor) copied to the device one unit ahead of use.

    On CUDA the copies run on a side stream from pinned memory: a unit's memory is allocated in the
    compute stream's order and the side stream waits for that stream first (the memory may have
    belonged to a unit whose kernels are still queued); the compute stream waits for the copy's event
    before using it, and a unit dropped before use waits for its copy before its memory is freed.
    On the CPU a unit is copied synchronously. `cyclic`: after the last unit prefetch the first (a
    flow is called once per sampling step)."""

    def __init__(self, host_units: list[dict], device, *, cyclic: bool = False,
                 on_copy: Callable[[torch.Tensor], None] | None = None):
        self.host = host_units
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cyclic = cyclic
        self.on_copy = on_copy
        self._live: dict[int, _UnitCopy] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _next(self, i: int) -> int | None:
        if i + 1 < len(self.host):
            return i + 1
        return 0 if self.cyclic and len(self.host) > 1 else None

    def _issue(self, i: int) -> None:
        if i in self._live:
            return
        src = self.host[i]
        if not self.cuda:
            c = _UnitCopy({k: _device_copy(v, self.device) for k, v in src.items()})
        else:
            compute = torch.cuda.current_stream(self.device)
            dst = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in src.items()}
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                for k, v in src.items():
                    dst[k].copy_(v, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            c = _UnitCopy(dst, ready, compute)
        if self.on_copy is not None:
            for t in c.tensors.values():
                self.on_copy(t)
        self._live[i] = c

    def fetch(self, i: int) -> dict:
        """Unit i's device tensors, ready for the current stream; the next unit is prefetched and
        every other unit dropped (at most two on the device)."""
        nxt = self._next(i)
        for j in [j for j in self._live if j not in (i, nxt)]:
            self.release(j)
        self._issue(i)
        c = self._live[i]
        if self.cuda and not c.consumed:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(c.ready)
            if cur != c.alloc_stream:  # freed in its allocation stream's order: tell it about this reader
                for t in c.tensors.values():
                    t.record_stream(cur)
            c.consumed = True
        if nxt is not None:
            self._issue(nxt)
        return c.tensors

    def release(self, i: int) -> None:
        """Drop unit i's device copy (callers drop their own references to its tensors first)."""
        c = self._live.pop(i, None)
        if c is not None and c.ready is not None and not c.consumed:
            c.alloc_stream.wait_event(c.ready)  # its copy may still be writing into the memory

    def release_all(self) -> None:
        for i in list(self._live):
            self.release(i)

    def live_units(self) -> list[int]:
        return sorted(self._live)


@dataclass(eq=False)
class _Entry:
    """One parameter or buffer: the module's tensor (whose .data is swapped) and its host master."""

    tensor: torch.Tensor
    master: torch.Tensor | None  # None while dropped (re-read from the file on the next placement)
    persistent: bool  # in the state_dict (so in the file)

    @property
    def nbytes(self) -> int:
        return self.tensor.dtype.itemsize * self.numel

    def __post_init__(self):
        self.shape, self.numel = tuple(self.tensor.shape), self.tensor.numel()


def _unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*module.parameters(), *(b for b in module.buffers() if b is not None)]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class NetworkWeights:
    """One network's weights and where they are. The master copy stays on the host (compute dtype;
    pinned when the device is CUDA and `pin` allows); `placed(mode)` puts them on the device for a stage.

    units: the streaming units (default `streaming_units(module)`); everything else is the rest.
    reader: fills the module's state_dict tensors from its file (e.g. `partial(checkpoints.read_network_file,
    base=...)`); with it the host copy can be dropped (`drop_host`) and is re-read on the next
    placement. host_loaded=False: the module's state_dict tensors are not read yet (allocated only):
    they are dropped now and read on the first placement."""

    def __init__(self, module: nn.Module, device, *, units: list[nn.Module] | None = None, pin: bool = True,
                 reader: Callable[[nn.Module], None] | None = None, host_loaded: bool = True):
        self.module = module
        self.device = torch.device(device)
        self.pin = pin and self.device.type == "cuda"
        self.reader = reader
        if not host_loaded and reader is None:
            raise ValueError("NetworkWeights: host_loaded=False needs a reader")
        self.units = list(units) if units is not None else streaming_units(module)
        persistent = {id(t) for t in module.state_dict(keep_vars=True).values()}
        entries = {id(t): _Entry(t, None, id(t) in persistent) for t in _unique_tensors(module)}
        self._units: list[list[_Entry]] = []
        for u in self.units:
            mine = [entries[id(t)] for t in _unique_tensors(u)]
            if any(e in unit for unit in self._units for e in mine):
                raise ValueError("NetworkWeights: streaming units share tensors")
            self._units.append(mine)
        in_units = {id(e) for unit in self._units for e in unit}
        self._rest = [e for e in entries.values() if id(e) not in in_units]
        self._entries = list(entries.values())
        self._arenas: list[PinnedArena] = []  # the file's tensors' page-locked host memory (CUDA)
        from_file = [e for e in self._entries if e.persistent and host_loaded]
        for e, master in zip(from_file, self._new_masters(from_file, fill=True)):
            e.master = master
            e.tensor.data = e.master
        for e in self._entries:
            if not e.persistent:  # buffers outside the file stay for the network's lifetime
                e.master = host_copy(e.tensor, pin=self.pin)
                e.tensor.data = e.master
            elif not host_loaded:
                e.tensor.data = self._placeholder(e)
        self._unit_nbytes = [sum(e.nbytes for e in unit) for unit in self._units]
        self._copies = _DeviceCopies()
        self._resident = False
        self._mode: str | None = None

    # -- sizes ------------------------------------------------------------------------------------

    def bytes(self) -> int:
        """All parameters and buffers, as stored."""
        return sum(e.nbytes for e in self._entries)

    def unit_bytes(self) -> int:
        """The largest streaming unit (two are on the device at once when streamed)."""
        return max(self._unit_nbytes, default=0)

    def rest_bytes(self) -> int:
        return sum(e.nbytes for e in self._rest)

    def device_bytes(self, mode: str) -> int:
        """What `placed(mode)` keeps on the device at its peak: everything, or (streamed) the rest
        plus the largest two consecutive units (a unit and the one prefetched during its forward)."""
        _check_mode(mode)
        if mode != STREAMED:
            return self.bytes()
        u = self._unit_nbytes
        pairs = [a + b for a, b in zip(u, u[1:])] or u
        return self.rest_bytes() + max(pairs, default=0)

    def host_bytes(self) -> int:
        """Bytes of host copies held now."""
        return sum(e.nbytes for e in self._entries if e.master is not None)

    def live_device_bytes(self) -> int:
        """Bytes of this network's device copies still referenced by anything (measured, not counted)."""
        return self._copies.live_bytes()

    @property
    def host_loaded(self) -> bool:
        return all(e.master is not None for e in self._entries)

    @property
    def resident(self) -> bool:
        return self._resident

    @property
    def in_use(self) -> bool:
        """Inside a `placed()` block."""
        return self._mode is not None

    # -- placement --------------------------------------------------------------------------------

    @contextmanager
    def placed(self, mode: str):
        """The weights on the device for the block (see the module docstring for each mode). On exit
        (exceptions included) hooks are removed and, unless resident, the module is back on its host
        copies with the device copies freed."""
        _check_mode(mode)
        if self._mode is not None:
            raise RuntimeError("NetworkWeights.placed: already placed (placements do not nest)")
        self._mode = mode
        try:
            if self._resident or mode == RESIDENT:
                if not self._resident:
                    self.load_host()
                    try:
                        self._attach(self._entries)
                    except BaseException:  # out of device memory half way: back on the host
                        self._detach(self._entries)
                        raise
                    self._resident = True
                yield self
                return
            self.load_host()
            streaming = None
            try:
                self._attach(self._entries if mode == STAGE else self._rest)
                if mode == STREAMED:
                    streaming = _UnitHooks(self)
                yield self
            finally:
                if streaming is not None:
                    streaming.close()
                self._detach(self._entries)
        finally:
            self._mode = None

    def to_host(self) -> None:
        """A resident network back on its host copies, its device copies freed."""
        if self._mode is not None:
            raise RuntimeError("NetworkWeights.to_host: inside placed()")
        if self._resident:
            self._detach(self._entries)
            self._resident = False

    def drop_host(self) -> int:
        """Free the host copies of the file's tensors (re-read on the next placement). Returns the bytes
        freed. A resident network keeps running from its device copies."""
        if self.reader is None:
            raise RuntimeError("NetworkWeights.drop_host: no file to re-read from")
        if self._mode is not None:
            raise RuntimeError("NetworkWeights.drop_host: inside placed()")
        freed = 0
        for e in self._entries:
            if e.persistent and e.master is not None:
                freed += e.nbytes
                e.master = None
                if not self._resident:
                    e.tensor.data = self._placeholder(e)
        for arena in self._arenas:
            arena.release()
        self._arenas = []
        return freed

    def _new_masters(self, entries: list[_Entry], fill: bool = False) -> list[torch.Tensor]:
        """Host tensors for these entries (holding the module's values with `fill`, else empty): on
        CUDA one page-locked arena of their exact bytes; on the CPU the tensors themselves when fit."""
        if not self.pin:
            if fill:
                return [host_copy(e.tensor) for e in entries]
            return [torch.empty(e.shape, dtype=e.tensor.dtype) for e in entries]
        arena = PinnedArena([(e.shape, e.tensor.dtype) for e in entries])
        self._arenas.append(arena)
        if fill:
            for e, t in zip(entries, arena.tensors):
                t.copy_(e.tensor.detach())
                e.tensor.data = t  # the old storage goes now, not after the whole network is copied
        return arena.tensors

    def _placeholder(self, e: _Entry) -> torch.Tensor:
        # empty, so any use of a dropped tensor fails on its shape instead of computing with garbage
        return torch.empty(0, dtype=e.tensor.dtype)

    def load_host(self) -> None:
        """Read the host copies back from the file if they were dropped (placements do this)."""
        missing = [e for e in self._entries if e.master is None]
        if not missing:
            return
        if self._resident:  # reading puts the host copies under the module: its device copies would be lost
            raise RuntimeError("NetworkWeights.load_host: resident on the device (to_host first)")
        for e, master in zip(missing, self._new_masters(missing)):
            e.master = master
            e.tensor.data = e.master
        try:
            self.reader(self.module)  # converts to each tensor's dtype while reading
        except BaseException:
            for e in missing:
                e.master = None
                e.tensor.data = self._placeholder(e)
            raise

    def _attach(self, entries: list[_Entry]) -> None:
        for e in entries:
            d = _device_copy(e.master, self.device)
            self._copies.add(d)
            e.tensor.data = d

    def _detach(self, entries: list[_Entry]) -> None:
        for e in entries:
            e.tensor.data = e.master if e.master is not None else self._placeholder(e)


class _UnitHooks:
    """The streamed mode's hooks: a forward pre-hook on every module of a unit attaches the unit
    (any of its submodules may be called directly, e.g. a decoder's subdivision head), a forward hook
    on the unit drops it."""

    def __init__(self, w: NetworkWeights):
        self.w = w
        hosts = [{k: e.master for k, e in enumerate(unit)} for unit in w._units]
        self.streamer = WeightStreamer(hosts, w.device, on_copy=w._copies.add)
        self.attached: set[int] = set()
        self.handles = []
        try:
            for i, u in enumerate(w.units):
                for m in u.modules():
                    self.handles.append(m.register_forward_pre_hook(partial(self._enter, i)))
                self.handles.append(u.register_forward_hook(partial(self._leave, i)))
        except BaseException:
            self.close()
            raise

    def _enter(self, i: int, *_) -> None:
        if i in self.attached:
            return
        for j in list(self.attached):
            self._leave(j)
        copies = self.streamer.fetch(i)
        for k, e in enumerate(self.w._units[i]):
            e.tensor.data = copies[k]
        self.attached.add(i)

    def _leave(self, i: int, *_) -> None:
        self.w._detach(self.w._units[i])
        self.attached.discard(i)
        self.streamer.release(i)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for i in list(self.attached):
            self._leave(i)
        self.streamer.release_all()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"residency {mode!r}: one of {', '.join(MODES)}")


class HostWeightStore:
    """Host copies of several networks under a host byte budget (None: no limit). Placing a network
    through the store re-reads it if it was dropped, first dropping the least recently used others
    that can be re-read; after the stage, networks are dropped (least recently used first) until the
    copies held fit the budget. A network larger than the budget is read for its stage and dropped
    after it. Networks without a reader are never dropped.

    Something else holding a network's host tensors (a cuda flow backend streaming from them) keeps
    that memory alive: unload it before the store drops the network."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = budget_bytes
        self.networks: OrderedDict[str, NetworkWeights] = OrderedDict()  # least recently used first
        self._held: set = set()  # networks a `held` block keeps

    def add(self, key: str, weights: NetworkWeights) -> NetworkWeights:
        self.networks[key] = weights
        self.fit()
        return weights

    def held_bytes(self) -> int:
        """Bytes of host copies held now, over all networks."""
        return sum(w.host_bytes() for w in self.networks.values())

    def acquire(self, key: str) -> NetworkWeights:
        """The network with its host copy present (re-read if dropped), now the most recently used."""
        w = self.networks[key]
        self.networks.move_to_end(key)
        if w.resident:  # runs from its device copies; its host copy is read again once it leaves the device
            return w
        if not w.host_loaded and self.budget is not None:
            self._drop_until(self.budget - (w.bytes() - w.host_bytes()), keep=key)
        w.load_host()
        return w

    @contextmanager
    def placed(self, key: str, mode: str):
        w = self.acquire(key)
        try:
            with w.placed(mode):
                yield w
        finally:
            self.fit()

    @contextmanager
    def held(self, key: str):
        """The network's host copy present and kept for the block, for a user that makes its own device
        copies from it (the cuda flow backend reads its weights there at each new condition)."""
        w = self.acquire(key)
        self._held.add(key)
        try:
            yield w
        finally:
            self._held.discard(key)
            self.fit()

    def fit(self) -> None:
        """Drop least recently used networks (not in use, with a file) until the copies fit the budget."""
        if self.budget is not None:
            self._drop_until(self.budget)

    def _drop_until(self, limit: int, keep: str | None = None) -> None:
        held = self.held_bytes()
        for k, w in list(self.networks.items()):
            if held <= limit:
                return
            if k != keep and k not in self._held and w.reader is not None and not w.in_use and w.host_bytes():
                held -= w.drop_host()
