"""Weight residency (runtime/residency.py) on the CPU, where "the device" is a separate copy.

Every mode must compute exactly what the network computes in place; the bytes on the device are
measured as the device copies something still references (storage weak references), and checked
against `device_bytes(mode)` at their peak; every module must run on device copies, never on the
host masters; the host store must drop and re-read networks under a budget.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from pixal3d_rt.checkpoints import load_network, read_network_file, save_network
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.models.sparse import SparseTensor
from pixal3d_rt.presets import TINY_CONFIGS, randomize_
from pixal3d_rt.runtime import cuda_backend
from pixal3d_rt.runtime.residency import (
    MODES,
    RESIDENT,
    STAGE,
    STREAMED,
    HostWeightStore,
    NetworkWeights,
    streaming_units,
)
from torch.multiprocessing.reductions import StorageWeakRef


def _flow_config(blocks=3):
    cfg = TINY_CONFIGS["shape_slat_flow_model_512"]
    return {**cfg, "args": {**cfg["args"], "num_blocks": blocks}}


def _build(config, seed):
    return randomize_(build_model(config), torch.Generator().manual_seed(seed)).eval()


def _coords(n, grid, g):
    flat = torch.randperm(grid ** 3, generator=g)[:n].sort().values
    return torch.stack([torch.zeros_like(flat), flat // grid ** 2, (flat // grid) % grid, flat % grid], 1).int()


def _flow_case(model, n=40, seed=0):
    """A call of a tiny shape flow: (x, t, cond)."""
    g = torch.Generator().manual_seed(seed)
    a = model
    coords = _coords(n, a.resolution, g)
    x = SparseTensor(torch.randn(n, a.in_channels, generator=g), coords)
    cond = {"global": torch.randn(1, 5, a.cond_channels, generator=g),
            "proj": SparseTensor(torch.randn(n, a.proj_in_channels, generator=g), coords)}
    return x, torch.tensor([731.0]), cond


def _run_flow(model, case):
    x, t, cond = case
    return model(x, t, cond).feats


def _run_decoder(model, x):
    """The decoder's forward with its subdivisions, and `upsample`, which calls the last up-block's
    subdivision head directly (not through the block's forward)."""
    h, subs = model(SparseTensor(x.feats, x.coords), return_subs=True)
    return [h.feats, h.coords, *(s.feats for s in subs), model.upsample(SparseTensor(x.feats, x.coords), 2)]


class _Watch:
    """Hooks on every module of a network (registered inside placed(), so they run after its own):
    the peak of the live device bytes, and whether any module ran on a host master."""

    def __init__(self, w: NetworkWeights, host_ptrs: dict):
        self.w, self.host_ptrs = w, host_ptrs
        self.peak, self.on_host, self.samples = 0, [], []
        self.handles = []
        for name, m in w.module.named_modules():
            self.handles.append(m.register_forward_pre_hook(partial(self._before, name)))
            self.handles.append(m.register_forward_hook(lambda *_: self._sample()))

    def _sample(self):
        live = self.w.live_device_bytes()
        self.samples.append(live)
        self.peak = max(self.peak, live)

    def _before(self, name, m, _args):
        self._sample()
        if any(p.data_ptr() == self.host_ptrs[id(p)] for p in m.parameters(recurse=False)):
            self.on_host.append(name)

    def remove(self):
        for h in self.handles:
            h.remove()


def _host_ptrs(module):
    return {id(p): p.data_ptr() for p in module.parameters()}


def _assert_on_host(w: NetworkWeights, host_ptrs):
    assert all(p.data_ptr() == host_ptrs[id(p)] for p in w.module.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in w.module.modules())
    assert w.live_device_bytes() == 0


def _check_modes(model, run, mode):
    """Run `run(model)` in place, then in `mode`: identical outputs, every module on device copies,
    the measured peak equal to device_bytes(mode), nothing left on the device after (unless resident)."""
    with torch.no_grad():
        want = run(model)
    w = NetworkWeights(model, "cpu")
    host = _host_ptrs(model)
    with torch.no_grad(), w.placed(mode):
        watch = _Watch(w, host)
        got = run(model)
        watch.remove()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert watch.on_host == []
    assert watch.peak == w.device_bytes(mode)
    if mode == RESIDENT:
        assert w.live_device_bytes() == w.bytes()
        w.to_host()
    _assert_on_host(w, host)
    return w, watch


@pytest.mark.parametrize("mode", MODES)
def test_flow_every_mode_matches_in_place(mode):
    model = _build(_flow_config(), 1)
    case = _flow_case(model)
    w, watch = _check_modes(model, lambda m: [_run_flow(m, case)], mode)
    assert len(w.units) == 3 and w.rest_bytes() + 3 * w.unit_bytes() == w.bytes()
    if mode == STREAMED:
        # equal blocks: the peak is exactly two of them (the running one and the prefetched one)
        assert watch.peak == w.rest_bytes() + 2 * w.unit_bytes() < w.bytes()
        assert min(watch.samples) >= w.rest_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_sparse_decoder_every_mode_matches_in_place(mode):
    model = _build(TINY_CONFIGS["shape_slat_decoder"], 2)
    g = torch.Generator().manual_seed(3)
    x = SparseTensor(torch.randn(8, 8, generator=g), _coords(8, 16, g))
    w, _ = _check_modes(model, lambda m: _run_decoder(m, x), mode)
    # the levels' blocks are the units (a level is iterated, never called)
    assert [type(u).__name__ for u in w.units] == ["SparseConvNeXtBlock3d", "SparseResBlockC2S3d"] * 4
    sizes = [sum(t.numel() * t.element_size() for t in [*u.parameters(), *u.buffers()]) for u in w.units]
    assert len(set(sizes)) > 1 and w.device_bytes(STREAMED) == w.rest_bytes() + max(a + b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("mode", [STAGE, STREAMED])
def test_exception_inside_the_stage_leaves_the_module_on_the_host(mode):
    model = _build(_flow_config(), 4)
    case = _flow_case(model, seed=4)
    with torch.no_grad():
        want = _run_flow(model, case)
    w = NetworkWeights(model, "cpu")
    host = _host_ptrs(model)

    def fail(*_):
        raise RuntimeError("boom")

    failing = model.blocks[1].mlp.register_forward_hook(fail)  # in the middle of the second unit
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), w.placed(mode):
        _run_flow(model, case)
    failing.remove()
    _assert_on_host(w, host)
    assert not w.in_use
    with torch.no_grad(), w.placed(mode):  # and the next stage runs normally
        assert torch.equal(_run_flow(model, case), want)


def test_resident_stays_and_placements_do_not_nest():
    model = _build(_flow_config(2), 5)
    case = _flow_case(model, seed=5)
    with torch.no_grad():
        want = _run_flow(model, case)
    w = NetworkWeights(model, "cpu")
    with w.placed(RESIDENT):
        with pytest.raises(RuntimeError, match="nest"), w.placed(STAGE):
            pass
    device_ptrs = _host_ptrs(model)  # the device copies, kept after the block
    with torch.no_grad(), w.placed(STREAMED):  # a resident network is already on the device
        assert torch.equal(_run_flow(model, case), want)
    assert _host_ptrs(model) == device_ptrs and w.live_device_bytes() == w.bytes()
    w.to_host()
    assert w.live_device_bytes() == 0


def test_streaming_units_of_each_network():
    ss = build_model(TINY_CONFIGS["sparse_structure_decoder"])
    assert streaming_units(ss) == list(ss.blocks)
    flow = build_model(_flow_config(2))
    assert streaming_units(flow) == list(flow.blocks)


# ---------------------------------------------------------------------------------------------
# host store


def _on_disk(tmp_path, key, config, seed):
    model = _build(config, seed)
    base = tmp_path / key
    save_network(model, config, base)
    return model, base


def _open(store, key, base, reads):
    def reader(module):
        reads.append(key)
        read_network_file(module, base)

    module, _ = load_network(base, device="cpu", read=False)
    return store.add(key, NetworkWeights(module, "cpu", reader=reader, host_loaded=False))


def test_host_store_drops_and_rereads_under_its_budget(tmp_path):
    flow_cfg, dec_cfg = _flow_config(2), TINY_CONFIGS["shape_slat_decoder"]
    flow, flow_base = _on_disk(tmp_path, "flow", flow_cfg, 6)
    dec, dec_base = _on_disk(tmp_path, "dec", dec_cfg, 7)
    case = _flow_case(flow, seed=6)
    g = torch.Generator().manual_seed(8)
    x = SparseTensor(torch.randn(8, 8, generator=g), _coords(8, 16, g))
    with torch.no_grad():
        want_flow, want_dec = _run_flow(flow, case), _run_decoder(dec, x)

    reads = []
    budget = max(NetworkWeights(build_model(c), "cpu").bytes() for c in (flow_cfg, dec_cfg))
    store = HostWeightStore(budget)
    wf, wd = _open(store, "flow", flow_base, reads), _open(store, "dec", dec_base, reads)
    assert store.held_bytes() == 0 and reads == []  # nothing read before its first use
    with pytest.raises(RuntimeError):  # an unread network cannot compute
        _run_flow(wf.module, case)

    for key, mode in [("flow", STAGE), ("dec", STREAMED), ("flow", STREAMED), ("flow", STAGE), ("dec", STAGE)]:
        with torch.no_grad(), store.placed(key, mode) as w:
            got = [_run_flow(w.module, case)] if key == "flow" else _run_decoder(w.module, x)
        for a, b in zip(got, [want_flow] if key == "flow" else want_dec):
            assert torch.equal(a, b)
        assert store.held_bytes() <= budget
        assert w.host_loaded and w.live_device_bytes() == 0  # the one just used stays (it fits alone)
    # both never fit at once: each switch dropped the other and re-read this one
    assert reads == ["flow", "dec", "flow", "dec"]
    assert not wf.host_loaded and wf.host_bytes() == 0
    store.acquire("flow")  # re-read: the file's tensors, converted as the first time
    assert reads[-1] == "flow" and not wd.host_loaded
    for k, v in wf.module.state_dict().items():
        assert torch.equal(v, flow.state_dict()[k]), k


def test_a_resident_network_whose_host_copy_was_dropped_keeps_computing_on_its_device_copies(tmp_path):
    """The store may drop a resident network's host copy (the device copy is what computes); placing
    it again must neither re-read it nor put the host copies back under the module."""
    flow_cfg = _flow_config(2)
    flow, base = _on_disk(tmp_path, "flow", flow_cfg, 11)
    case = _flow_case(flow, seed=11)
    with torch.no_grad():
        want = _run_flow(flow, case)
    reads = []
    store = HostWeightStore(0)  # keeps no host copy after use
    w = _open(store, "flow", base, reads)
    with store.placed("flow", RESIDENT):
        pass
    on_device = [e.tensor.data_ptr() for e in w._entries]
    assert w.resident and store.held_bytes() == 0 and reads == ["flow"]
    for _ in range(2):
        with torch.no_grad(), store.placed("flow", RESIDENT) as placed:
            assert [e.tensor.data_ptr() for e in placed._entries] == on_device
            assert torch.equal(_run_flow(placed.module, case), want)
    assert reads == ["flow"]
    w.to_host()  # off the device: the next placement reads the file again
    with torch.no_grad(), store.placed("flow", STAGE) as placed:
        assert torch.equal(_run_flow(placed.module, case), want)
    assert reads == ["flow", "flow"]


def test_host_store_without_budget_keeps_everything_and_small_budget_drops_after_use(tmp_path):
    _, base = _on_disk(tmp_path, "flow", _flow_config(2), 9)
    reads = []
    store = HostWeightStore(None)
    w = _open(store, "flow", base, reads)
    for _ in range(2):
        with store.placed("flow", STAGE):
            pass
    assert reads == ["flow"] and store.held_bytes() == w.bytes()
    store.budget = w.bytes() // 2  # smaller than the network: read for each stage, dropped after it
    store.fit()
    assert store.held_bytes() == 0
    for _ in range(2):
        with store.placed("flow", STAGE) as placed:
            assert placed.host_loaded
        assert store.held_bytes() == 0
    assert reads == ["flow"] * 3


# ---------------------------------------------------------------------------------------------
# the cuda flow backend (CPU path)


def _backend_case(model):
    x, t, cond = _flow_case(model, n=36, seed=10)
    neg = {"global": torch.zeros_like(cond["global"]), "proj": SparseTensor(torch.zeros_like(cond["proj"].feats), x.coords)}
    return x, t, cond, neg


@pytest.mark.parametrize("residency", [RESIDENT, STREAMED])
def test_flow_backend_unload_and_reload_give_the_same_outputs(residency):
    model = _build(_flow_config(), 11)
    x, t, cond, neg = _backend_case(model)
    be = cuda_backend.wrap_flow(model, dtype="bfloat16", fused=False, residency=residency)
    with torch.no_grad():
        want = be.cfg_pair(x, t, cond, neg)
    copies = [StorageWeakRef(be.blocks[0].qkv_b.untyped_storage()), StorageWeakRef(be.in_w.untyped_storage())]
    if residency == STREAMED:
        assert be.streamer.live_units() == [0]  # block 0 prefetched for the next call, the others dropped
    else:
        copies.append(StorageWeakRef(be.blocks[0].qkv_w.untyped_storage()))  # a bf16 copy of the fp32 model
    be.unload()
    assert not be.loaded and be._state is None and be.streamer is None
    assert be.blocks == []
    # the bf16 block tensors were the backend's copies: freed; in_w is the model's own fp32 tensor
    assert copies[0].expired() and not copies[1].expired() and all(c.expired() for c in copies[2:])
    with torch.no_grad():
        got = be.cfg_pair(x, t, cond, neg)  # loads again
    assert be.loaded
    for a, b in zip(got, want):
        assert torch.equal(a.feats, b.feats)


def test_flow_backend_streams_from_the_host_masters_without_another_copy():
    model = _build(_flow_config(), 12).convert_to("bfloat16")
    x, t, cond, neg = _backend_case(model)
    with torch.no_grad():
        want = cuda_backend.wrap_flow(model, fused=False).cfg_pair(x, t, cond, neg)
    w = NetworkWeights(model, "cpu")
    be = cuda_backend.wrap_flow(model, fused=False, residency=STREAMED)
    assert be.streamer.host[1]["fc1_w"].data_ptr() == model.blocks[1].mlp.mlp[0].weight.data_ptr()
    with torch.no_grad():
        got = be.cfg_pair(x, t, cond, neg)
    for a, b in zip(got, want):
        assert torch.equal(a.feats, b.feats)
    assert w.live_device_bytes() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_host_copies_are_one_exact_page_locked_arena_per_read(tmp_path):
    """On CUDA a network's file tensors live in one page-locked arena of exactly their bytes (torch's
    pinned allocator would round each up to a power of two), dropped with the host copy and made
    again by the next read; placements compute as before."""
    from pixal3d_rt.runtime.residency import PinnedArena

    model, base = _on_disk(tmp_path, "flow", _flow_config(2), 13)
    case = _flow_case(model, seed=13)
    with torch.no_grad():
        want = _run_flow(model, case)
    module, _ = load_network(base, device="cpu", read=False)
    torch.cuda.synchronize()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    w = NetworkWeights(module, "cuda", reader=partial(read_network_file, base=base), host_loaded=False)
    store = HostWeightStore(0)  # keeps nothing after use
    store.add("flow", w)
    for _ in range(2):
        with torch.no_grad(), store.placed("flow", STAGE):
            (arena,) = w._arenas
            assert arena.registered and arena.nbytes < w.bytes() + 256 * len(w._entries)
            masters = [e.master for e in w._entries if e.persistent]
            assert all(m.is_pinned() and m.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
                       for m in masters)
            assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before  # not torch's pinned pool
            got = _run_flow(w.module, _case_on(case, "cuda"))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
        assert not w.host_loaded and w._arenas == [] and not arena.registered
    odd = PinnedArena([((3, 5), torch.bfloat16), ((), torch.float32), ((7,), torch.int64)])
    assert [tuple(t.shape) for t in odd.tensors] == [(3, 5), (), (7,)] and odd.nbytes == 256 + 256 + 56
    assert all(t.data_ptr() % 256 == 0 for t in odd.tensors) and odd.registered
    odd.release()
    assert not odd.registered


def _case_on(case, device):
    x, t, cond = case
    moved = lambda st: SparseTensor(st.feats.to(device), st.coords.to(device))  # noqa: E731
    return moved(x), t.to(device), {"global": cond["global"].to(device), "proj": moved(cond["proj"])}
