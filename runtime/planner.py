"""The memory planner: for each stage of a run, where each network's weights are and how the stage's
work is chunked, so that the predicted device peak stays inside the budget.

Per stage the prediction is

    peak = resident weights + the stage's own weights (whole, or streamed: the rest plus two units)
         + carried bytes (values earlier stages left alive)   fixed + per_unit·n
         + transient bytes (the stage's own allocations)      fixed + per_unit·n (flows: + per_unit2·n²)
         + the device's non-torch overhead (CUDA context, libraries)

where n is the stage's count (tokens; decoders: tokens of the HR grid). The coefficients are
measured (`calibrate` from a run with per-stage peaks: runtime/memory.py), never guessed; what the
knobs change is computed from the shapes they change (rows of a CFG pair, rows of a token chunk, the
bytes of the projection cache, the decoders' gather chunk). Times likewise: measured seconds per
stage, plus weight transfers at the host-to-device bandwidth.

Decisions, cheapest first: keep networks resident (across stages and images) while every stage
still fits; otherwise load a network for its stage and drop it after; then, per stage that still
does not fit, stream its big network block by block, split the CFG pair, chunk the row-local work,
drop the projection cache and shrink the decoders' chunks. If even the most frugal plan does not fit,
`PlanError` says the smallest budget that would.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .stages import BY_NAME, networks_for, stages_for

RESIDENT, STAGE, STREAMED = "resident", "stage", "streamed"
GIB = 2**30
# pinned host -> device copies over PCIe 4.0 x16 when not measured on the device at hand
DEFAULT_H2D_GBS = 20.0
# allocator slack on top of the predicted live bytes (caching allocator block rounding)
FRAGMENTATION = 0.08
# token-chunk sizes the planner tries for the flows' row-local work, and decoder gather chunks (bytes)
TOKEN_CHUNKS = (8192, 4096, 2048, 1024)
DECODER_CHUNK_BYTES = (64 << 20, 16 << 20)
DEFAULT_DECODER_CHUNK_BYTES = 256 << 20  # kernels.subm_conv.DEFAULT_CHUNK_BYTES
# gathers alive at once in a decoder conv chunk (the gathered rows and the conv output)
DECODER_CHUNK_LIVE = 2


class PlanError(Exception):
    """No plan fits the budget; `needed` is the smallest budget (bytes) the planner could fit."""

    def __init__(self, message: str, needed: int | None = None):
        super().__init__(message)
        self.needed = needed


@dataclass
class StageCost:
    """Measured bytes and seconds of one stage as functions of its count n."""

    carried_fixed: float = 0.0
    carried_per_unit: float = 0.0
    transient_fixed: float = 0.0
    transient_per_unit: float = 0.0
    seconds_fixed: float = 0.0
    seconds_per_unit: float = 0.0
    seconds_per_unit2: float = 0.0  # attention: quadratic in n
    measured_at: int | None = None  # the count it was measured at (None: not measured)
    source: str = ""

    @property
    def measured(self) -> bool:
        return self.measured_at is not None


@dataclass
class NetworkSize:
    bytes: int  # whole network on the device
    unit_bytes: int = 0  # largest streaming unit (a transformer block)
    rest_bytes: int = 0  # what stays on the device while its units stream
    units: int = 0


@dataclass
class FlowShape:
    """What the flow knobs change, from the network's widths: rows per token of the CFG pair, the
    projection cache (blocks x channels x itemsize per token and condition), the row-local share of
    a row's transient bytes (what a token chunk bounds; attention always sees every row)."""

    blocks: int
    channels: int
    itemsize: int
    row_local_share: float


@dataclass
class StagePlan:
    stage: str
    units: int  # the count planned for (tokens / HR tokens)
    weights: dict = field(default_factory=dict)  # network -> RESIDENT | STAGE | STREAMED
    weight_bytes: dict = field(default_factory=dict)  # network -> device bytes of its weights in this stage
    cfg_batched: bool = True
    token_chunk: int | None = None
    proj_cache: bool = True
    graphs: bool = True
    decoder_chunk_bytes: int | None = None
    resident_units: int = 0  # a streamed flow: its first units kept on the device (the rest stream)
    predicted_peak: int = 0
    predicted_seconds: float | None = None
    measured: bool = True  # its activation coefficients were measured

    def knobs(self) -> str:
        out = []
        if not self.cfg_batched:
            out.append("CFG split")
        if self.token_chunk:
            out.append(f"rows/{self.token_chunk}")
        if not self.proj_cache:
            out.append("no proj cache")
        if not self.graphs and BY_NAME[self.stage].sampled:
            out.append("no graphs")
        if self.decoder_chunk_bytes:
            out.append(f"chunk {self.decoder_chunk_bytes >> 20} MiB")
        if self.resident_units:
            out.append(f"{self.resident_units} blocks kept")
        return ", ".join(out) or "—"


@dataclass
class Plan:
    budget: int
    resolution: int
    stages: list
    resident: list
    overhead: int
    notes: list = field(default_factory=list)

    def __getitem__(self, stage: str) -> StagePlan:
        for s in self.stages:
            if s.stage == stage:
                return s
        raise KeyError(stage)

    def __contains__(self, stage: str) -> bool:
        return any(s.stage == stage for s in self.stages)

    @property
    def peak(self) -> int:
        return max(s.predicted_peak for s in self.stages)

    @property
    def all_resident(self) -> bool:
        return all(m == RESIDENT for s in self.stages for m in s.weights.values())

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "resolution": self.resolution, "resident": self.resident,
                "overhead_bytes": self.overhead, "predicted_peak_bytes": self.peak, "notes": self.notes,
                "stages": [asdict(s) for s in self.stages]}


class MemoryModel:
    """Network sizes + measured stage costs + device facts; `plan(...)` fills a Plan."""

    def __init__(self, networks: dict, costs: dict, *, flow_shapes: dict | None = None, overhead: int = 0,
                 h2d_gbs: float = DEFAULT_H2D_GBS, steps: int = 12, flow_knobs: bool = True):
        self.networks = networks  # name -> NetworkSize
        self.costs = costs  # stage -> StageCost; "stage@R" -> its cost in runs at resolution R, where measured apart
        self.resolution: int | None = None  # the resolution being planned (set by `plan`)
        self.flow_shapes = flow_shapes or {}  # stage -> FlowShape (flows with a projection cache)
        self.overhead = int(overhead)
        self.h2d = h2d_gbs * 1e9
        self.steps = steps
        self.flow_knobs = flow_knobs  # the cuda backend's CFG pair, token chunks, projection cache

    # --------------------------------------------------------------------------------------
    # predictions

    def cost(self, stage: str) -> StageCost | None:
        """The stage's cost at the resolution being planned (its own entry where one was measured)."""
        return self.costs.get(f"{stage}@{self.resolution}") or self.costs.get(stage)

    def _weights_bytes(self, net: str, mode: str, kept_units: int = 0) -> int:
        size = self.networks[net]
        if mode == STREAMED and size.units:  # the kept units plus two in flight
            return min(size.bytes, size.rest_bytes + (kept_units + 2) * size.unit_bytes)
        return size.bytes

    def transient(self, sp: StagePlan) -> float:
        c = self.cost(sp.stage) or StageCost()
        n = sp.units
        fixed, per_unit = c.transient_fixed, c.transient_per_unit * n
        fs = self.flow_shapes.get(sp.stage)
        if fs is not None:
            cache = fs.blocks * fs.channels * fs.itemsize * n * 2  # both CFG conditions, measured with it on
            per_unit -= cache
            rows_share = 1.0 if sp.cfg_batched else 0.5
            if sp.token_chunk:
                rows = n * (2 if sp.cfg_batched else 1)
                rows_share *= (1 - fs.row_local_share) + fs.row_local_share * min(1.0, sp.token_chunk / rows)
            per_unit = max(0.0, per_unit) * rows_share + (cache if sp.proj_cache else 0)
        total = max(0.0, fixed + per_unit)
        if sp.decoder_chunk_bytes and total > DECODER_CHUNK_LIVE * DEFAULT_DECODER_CHUNK_BYTES:
            # only a workload that filled the default chunks gets their difference back
            total -= DECODER_CHUNK_LIVE * (DEFAULT_DECODER_CHUNK_BYTES - sp.decoder_chunk_bytes)
        return total

    def carried(self, sp: StagePlan) -> float:
        c = self.cost(sp.stage) or StageCost()
        return c.carried_fixed + c.carried_per_unit * sp.units

    def peak(self, sp: StagePlan, resident: set) -> int:
        stage_weights = sum(self._weights_bytes(n, m, sp.resident_units) for n, m in sp.weights.items() if m != RESIDENT)
        resident_weights = sum(self.networks[n].bytes for n in resident)
        live = self.carried(sp) + self.transient(sp)
        return int(resident_weights + stage_weights + live * (1 + FRAGMENTATION) + self.overhead)

    def seconds(self, sp: StagePlan, transfers_only: bool = False) -> float | None:
        """Predicted seconds of the stage (None when its cost was not measured; transfers_only: the
        weight copies alone, for comparing plans)."""
        c = self.cost(sp.stage)
        if (c is None or not c.measured) and not transfers_only:
            return None
        n = sp.units
        t = 0.0 if c is None or not c.measured else c.seconds_fixed + c.seconds_per_unit * n + c.seconds_per_unit2 * n * n
        if not sp.cfg_batched:
            t *= CFG_SPLIT_SLOWDOWN
        st = BY_NAME[sp.stage]
        forwards = self.steps * (2 if st.sampled else 1)
        for net, mode in sp.weights.items():
            size = self.networks[net]
            if mode == STAGE:
                t += size.bytes / self.h2d
            elif mode == STREAMED:
                # one block ahead on a side stream: the stage takes the longer of compute and copies
                # (the kept units are copied once)
                kept = min(sp.resident_units, size.units) / size.units if size.units else 0.0
                units_bytes = size.bytes - size.rest_bytes
                t = (max(t, forwards * units_bytes * (1 - kept) / self.h2d)
                     + (size.rest_bytes + units_bytes * kept) / self.h2d)
        return t

    # --------------------------------------------------------------------------------------
    # planning

    def units_for(self, resolution: int, tokens: dict) -> dict:
        """Counts per stage: the known ones from `tokens` (stage name -> count), the rest predicted
        (HR tokens and decoded voxels: the measured count of the cost table scaled with the output grid)."""
        out = dict(tokens)
        if resolution != 512 and "shape_hr_flow" not in out:
            c = self.cost("shape_hr_flow")
            base = c.measured_at if c is not None and c.measured_at else 17_500
            out["shape_hr_flow"] = int(min(base * (resolution / 1024) ** 2, 49_152))
        for key, default in (("ss_flow", 4096), ("shape_lr_flow", 4_400)):
            if key not in out:
                c = self.cost(key)
                out[key] = c.measured_at if c is not None and c.measured_at else default
        out.setdefault("tex_flow", out.get("shape_hr_flow", 0))
        out.setdefault("shape_latent", out["shape_lr_flow"] if resolution == 512 else out["shape_hr_flow"])
        if "voxels" not in out:  # the decoded count of the measured object: as measured at this resolution,
            at = self.costs.get(f"shape_decoder@{resolution}")  # else its surface growing with the grid past 1024
            c = self.costs.get("shape_decoder")
            if at is not None and at.measured_at:
                out["voxels"] = at.measured_at
            else:
                base = c.measured_at if c is not None and c.measured_at else 4_200_000
                out["voxels"] = int(base * max(1.0, resolution / 1024) ** 2)
        return out

    def _stage_plans(self, resolution: int, units: dict, resident: set) -> list:
        """Stage plans with `resident` kept on the device and no knob turned."""
        plans = []
        for st in stages_for(resolution):
            n = units.get(st.tokens, 0) if st.tokens else 0
            sp = StagePlan(st.name, n, {net: (RESIDENT if net in resident else STAGE) for net in st.networks},
                           measured=(self.cost(st.name) or StageCost()).measured)
            if st.sampled and not self.flow_knobs:
                sp.cfg_batched = sp.graphs = False  # eager flows: the sampler calls them once per condition
            plans.append(sp)
        return plans

    def plan(self, budget: int, resolution: int, tokens: dict | None = None, *, fixed: dict | None = None) -> Plan:
        """The plan for a run at `resolution` inside `budget` bytes of device memory. `tokens`: counts
        known so far (stage name -> count). `fixed`: stage plans already executed (kept as they ran).
        Raises PlanError with the smallest budget that fits when none does."""
        self.resolution = resolution
        units = self.units_for(resolution, tokens or {})
        nets = networks_for(resolution)
        plans = self._stage_plans(resolution, units, set())
        for sp in plans:
            self._fit_stage(sp, budget, set())
        floor = max(self.peak(sp, set()) for sp in plans)
        if floor > budget:
            worst = max(plans, key=lambda sp: self.peak(sp, set()))
            raise PlanError(f"no plan fits {budget / GIB:.2f} GiB at resolution {resolution}: stage {worst.stage} needs "
                            f"{floor / GIB:.2f} GiB even with its weights streamed and its work chunked", needed=floor)
        # keep a network resident when every stage still fits and the predicted time does not grow
        # (resident weights save their reloads but can push another stage into streaming)
        uses = {n: sum(n in st.networks for st in stages_for(resolution)) for n in nets}
        resident: set = set()
        best = self._total_seconds(resolution, units, budget, resident)
        for net in sorted(nets, key=lambda n: (-uses[n], self.networks[n].bytes)):
            trial = resident | {net}
            if not all(self._fits_with(sp, budget, trial) for sp in plans):
                continue
            t = self._total_seconds(resolution, units, budget, trial)
            if t <= best:
                resident, best = trial, t
        final = []
        for sp in self._stage_plans(resolution, units, resident):
            if fixed and sp.stage in fixed:
                final.append(fixed[sp.stage])
                continue
            self._fit_stage(sp, budget, resident)
            self._keep_units(sp, budget, resident)
            sp.weight_bytes = {n: self._weights_bytes(n, m, sp.resident_units) for n, m in sp.weights.items()}
            sp.predicted_peak = self.peak(sp, resident)
            sp.predicted_seconds = self.seconds(sp)
            final.append(sp)
        plan = Plan(budget, resolution, final, sorted(resident, key=nets.index), self.overhead)
        if any(not sp.measured for sp in final):
            plan.notes.append("stages marked * have no measured activation cost on this device: their peak counts "
                              "weights and carried values only")
        return plan

    def _total_seconds(self, resolution: int, units: dict, budget: int, resident: set) -> float:
        total = 0.0
        for sp in self._stage_plans(resolution, units, resident):
            self._fit_stage(sp, budget, resident)
            self._keep_units(sp, budget, resident)
            total += self.seconds(sp, transfers_only=not sp.measured) or 0.0
        return total

    def _fits_with(self, sp: StagePlan, budget: int, resident: set) -> bool:
        trial = replace(sp, weights={n: (RESIDENT if n in resident else STAGE) for n in sp.weights})
        return self._fit_stage(trial, budget, resident)

    def _fit_stage(self, sp: StagePlan, budget: int, resident: set) -> bool:
        """Make the stage fit by turning knobs in order of their time cost, then turn back every
        earlier knob the stage no longer needs; True when it fits."""
        if self.peak(sp, resident) <= budget:
            return True
        st = BY_NAME[sp.stage]
        steps = []
        if st.sampled and self.flow_knobs:
            steps += [("cfg_batched", False)] + [("token_chunk", c) for c in TOKEN_CHUNKS] + [("proj_cache", False)]
        if sp.stage in ("upsample", "shape_decoder", "tex_decoder"):
            steps += [("decoder_chunk_bytes", c) for c in DECODER_CHUNK_BYTES]
        for net in sp.weights:  # streaming only where two units are less than the whole network
            if sp.weights[net] != RESIDENT and self._weights_bytes(net, STREAMED) < self.networks[net].bytes:
                steps.append(("stream", net))
        first: dict = {}  # knob -> its value before any turn (in the order first turned)
        for key, value in steps:
            before = self._turn(sp, key, value)
            first.setdefault(key if key != "stream" else ("stream", value), before)
            if self.peak(sp, resident) <= budget:
                # undo every earlier knob the last one made unnecessary (each back to its start)
                for knob in reversed(list(first)[:-1]):
                    name = knob if not isinstance(knob, tuple) else "stream"
                    now = self._turn(sp, name, first[knob])
                    if self.peak(sp, resident) > budget:
                        self._turn(sp, name, now)
                return True
        return False

    def _keep_units(self, sp: StagePlan, budget: int, resident: set) -> None:
        """A streamed flow (cuda backend) keeps as many of its units on the device as the budget
        leaves room for: only the others cross the bus at every forward."""
        if not (BY_NAME[sp.stage].sampled and self.flow_knobs):
            return
        streamed = [self.networks[n] for n, m in sp.weights.items() if m == STREAMED and self.networks[n].units]
        if len(streamed) != 1 or not streamed[0].unit_bytes:
            return
        size = streamed[0]
        sp.resident_units = 0
        room = budget - self.peak(sp, resident)
        sp.resident_units = max(0, min(size.units - 1, int(room // size.unit_bytes)))

    @staticmethod
    def _turn(sp: StagePlan, key: str, value):
        """Set a knob; returns its previous value."""
        if key == "stream":  # value: the network, or (network, mode) to undo
            net, mode = value if isinstance(value, tuple) else (value, STREAMED)
            before = (net, sp.weights[net])
            sp.weights[net] = mode
            sp.graphs = not any(m == STREAMED for m in sp.weights.values())  # streamed copies change every forward
            return before
        before = getattr(sp, key)
        setattr(sp, key, value)
        return before

    # --------------------------------------------------------------------------------------
    # persistence of measured costs

    def costs_to_json(self) -> dict:
        return {k: asdict(v) for k, v in self.costs.items()}

    @staticmethod
    def costs_from_json(d: dict) -> dict:
        return {k: StageCost(**v) for k, v in d.items()}


# H200: a CFG pair run as two batch-1 forwards against one batched forward (326.5 ms vs 2 x 169.4 ms)
CFG_SPLIT_SLOWDOWN = 2 * 169.39 / 326.52


def fit_costs(runs: list, source: str) -> dict:
    """Stage costs from measured runs: each run a list of rows {stage, units, carried, transient,
    seconds}. One run gives proportional coefficients; runs at several counts a least-squares line."""
    by_stage: dict = {}
    for run in runs:
        for row in run:
            by_stage.setdefault(row["stage"], []).append(row)
    costs = {}
    for stage, rows in by_stage.items():
        c = StageCost(source=source, measured_at=int(max(r["units"] for r in rows)))
        for name in ("carried", "transient", "seconds"):
            fixed, slope = _line([(r["units"], r[name]) for r in rows if r.get(name) is not None])
            setattr(c, f"{name}_fixed", fixed)
            setattr(c, f"{name}_per_unit" if name != "seconds" else "seconds_per_unit", slope)
        costs[stage] = c
    return costs


def _line(points: list) -> tuple:
    """(intercept, slope) through the points; one distinct x (or x = 0): all of it as the intercept
    when x is 0, else proportional."""
    pts = [(float(x), float(y)) for x, y in points]
    if not pts:
        return 0.0, 0.0
    xs = {x for x, _ in pts}
    if len(xs) == 1:
        x = next(iter(xs))
        y = max(y for _, y in pts)
        return (y, 0.0) if x == 0 else (0.0, y / x)
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    if intercept < 0:  # a negative intercept would under-predict small counts
        slope, intercept = max(y / x for x, y in pts if x), 0.0
    return intercept, max(0.0, slope)


def load_costs(path) -> dict:
    return MemoryModel.costs_from_json(json.loads(Path(path).read_text()))


def format_plan(plan: Plan, model: MemoryModel | None = None) -> str:
    """The plan as a table: stage, weights where, chunking, predicted peak, predicted time."""
    rows = [("stage", "tokens", "weights", "knobs", "peak GiB", "time s")]
    for sp in plan.stages:
        weights = ", ".join(f"{_short(n)}:{m}" for n, m in sp.weights.items()) or "—"
        t = "—" if sp.predicted_seconds is None else f"{sp.predicted_seconds:.2f}"
        rows.append((sp.stage + ("" if sp.measured else " *"), f"{sp.units:,}" if sp.units else "—", weights, sp.knobs(),
                     f"{sp.predicted_peak / GIB:.2f}", t))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = [sp.predicted_seconds for sp in plan.stages]
    head = (f"budget {plan.budget / GIB:.2f} GiB, resolution {plan.resolution}: predicted peak {plan.peak / GIB:.2f} GiB"
            + (f", time {sum(total):.1f} s" if all(t is not None for t in total) else "")
            + f"; resident: {', '.join(_short(n) for n in plan.resident) or 'none'}")
    return "\n".join([head, *lines, *plan.notes])


SHORT_NAMES = {"sparse_structure_flow_model": "ss_flow", "sparse_structure_decoder": "ss_dec",
               "shape_slat_flow_model_512": "shape_flow_512", "shape_slat_flow_model_1024": "shape_flow_1024",
               "tex_slat_flow_model_1024": "tex_flow_1024", "shape_slat_decoder": "shape_dec", "tex_slat_decoder": "tex_dec"}


def _short(net: str) -> str:
    return SHORT_NAMES.get(net, net)


def network_size(module) -> NetworkSize:
    """Bytes of a network, of its largest streaming unit and of the rest (residency.streaming_units)."""
    from .memory import tensor_bytes
    from .residency import streaming_units

    if hasattr(module, "network_size"):  # an engine: its sizes as exported (runtime/engine.py)
        return module.network_size()
    units = streaming_units(module)
    unit_bytes = [tensor_bytes(u) for u in units]
    total = tensor_bytes(module)
    return NetworkSize(total, max(unit_bytes, default=0), total - sum(unit_bytes), len(units))
