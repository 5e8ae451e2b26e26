"""Export specs: one per stage network, the single source of its engine interface.

A spec names the network's inputs and outputs, their dtypes and shapes (ints are static, strings
name a dynamic axis), and the optimisation profiles (min/opt/max per dynamic axis). ONNX export
reads its dynamic axes from here, the TensorRT build its profiles, the engine runner its bindings.
It lives in the runtime because both sides read it: export imports runtime, never the reverse.

| spec            | network (pipeline key)          | dynamic axes            |
|-----------------|---------------------------------|-------------------------|
| ss_flow         | sparse_structure_flow_model     | B (1..2: CFG halves)    |
| shape_lr_flow   | shape_slat_flow_model_512 @32³  | B, N (tokens)           |
| shape_hr_flow   | shape_slat_flow_model_1024 @64³/@96³ | B, N               |
| tex_flow        | tex_slat_flow_model_1024        | B, N                    |
| ss_decoder      | sparse_structure_decoder        | -                       |
| dinov3_lr/_hr   | DINOv3 at the LR / HR image size (512 / 1024) | -         |

Sparse flows take one batch item's tokens `[B, N, C]` where B stacks the conditional and the
unconditional pass over the same coordinates, and the 3D RoPE as precomputed real `rope_cos`,
`rope_sin [N, head_dim/2]` (ONNX and TensorRT have no complex numbers). The SS flow's coordinates
are the fixed R³ grid, so its rotation is a constant of the engine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

# token counts of the reference object: opt points of the dynamic-N profiles
REFERENCE_TOKENS = {"shape_lr_flow": 4377, "shape_hr_flow": 17489, "tex_flow": 17489}
# upper bound of N for the HR stages: 64k covers the heavy 1024 case (≈45k) and the 1536 cap (49,152)
DEFAULT_MAX_TOKENS_HR = 65536
MIN_TOKENS = 1  # thin objects can have very few active voxels; an engine must still run them
MAX_BATCH = 2  # conditional + unconditional pass

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints (static) or axis names (dynamic)
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def concrete(self, dims: dict) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)


@dataclass(frozen=True)
class Profile:
    """min/opt/max of every dynamic axis, e.g. {"B": (1, 2, 2), "N": (1, 17489, 65536)}."""

    name: str
    axes: dict

    def dims(self, which: str) -> dict:
        i = {"min": 0, "opt": 1, "max": 2}[which]
        return {a: v[i] for a, v in self.axes.items()}

    def contains(self, dims: dict) -> bool:
        return all(lo <= dims[a] <= hi for a, (lo, _, hi) in self.axes.items())


@dataclass
class ExportSpec:
    name: str
    model_key: str  # pipeline key (Weights.models) or "dinov3"
    kind: str  # "dense_flow" | "sparse_flow" | "ss_decoder" | "dinov3"
    inputs: list
    outputs: list
    profiles: list
    meta: dict = field(default_factory=dict)  # what a runner needs to feed it (head_dim, rope_freq, image size, ...)

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for t in self.inputs for d in t.shape)

    def onnx_dynamic_axes(self) -> dict:
        """{tensor name: {axis index: axis name}} for torch.onnx.export (inputs and outputs)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in [*self.inputs, *self.outputs] if any(isinstance(d, str) for d in t.shape)}

    def input_shapes(self, dims: dict) -> dict:
        return {t.name: t.concrete(dims) for t in self.inputs}

    def output_shapes(self, dims: dict) -> dict:
        return {t.name: t.concrete(dims) for t in self.outputs}

    def profile_for(self, dims: dict) -> int:
        """Index of the profile whose range holds `dims`, preferring the one whose opt is nearest."""
        fits = [i for i, p in enumerate(self.profiles) if p.contains(dims)]
        if not fits:
            ranges = "; ".join(f"{p.name}: " + ", ".join(f"{a} {lo}..{hi}" for a, (lo, _, hi) in p.axes.items()) for p in self.profiles)
            raise ValueError(f"{self.name}: shape {dims} is outside every profile of the engine ({ranges})")
        return min(fits, key=lambda i: sum(abs(dims[a] - o) for a, (_, o, _) in self.profiles[i].axes.items()))

    def static_dims(self) -> dict:
        return {}

    def to_json(self) -> dict:
        return {"name": self.name, "model_key": self.model_key, "kind": self.kind,
                "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
                "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
                "profiles": [{"name": p.name, "axes": {a: list(v) for a, v in p.axes.items()}} for p in self.profiles],
                "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "ExportSpec":
        ts = lambda l: [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in l]  # noqa: E731
        profs = [Profile(p["name"], {a: tuple(v) for a, v in p["axes"].items()}) for p in d["profiles"]]
        return cls(d["name"], d["model_key"], d["kind"], ts(d["inputs"]), ts(d["outputs"]), profs, dict(d.get("meta", {})))


# ---------------------------------------------------------------------------------------------


def _flow_meta(args: dict) -> dict:
    heads = args.get("num_heads") or args["model_channels"] // args.get("num_head_channels", 64)
    return {"class": None, "resolution": int(args["resolution"]), "in_channels": int(args["in_channels"]),
            "out_channels": int(args["out_channels"]), "head_dim": int(args["model_channels"] // heads),
            "rope_freq": [float(f) for f in args.get("rope_freq", (1.0, 10000.0))]}


def ss_flow_spec(config: dict, global_tokens: int) -> ExportSpec:
    a = config["args"]
    R, cin, cout = a["resolution"], a["in_channels"], a["out_channels"]
    cc = a["cond_channels"]
    cp = a.get("proj_in_channels") or cc
    meta = _flow_meta(a) | {"class": config["name"]}
    return ExportSpec(
        "ss_flow", "sparse_structure_flow_model", "dense_flow",
        inputs=[TensorSpec("x", ("B", cin, R, R, R)), TensorSpec("t", ("B",)),
                TensorSpec("cond_global", ("B", global_tokens, cc)), TensorSpec("cond_proj", ("B", R ** 3, cp))],
        outputs=[TensorSpec("velocity", ("B", cout, R, R, R))],
        profiles=[Profile("cfg", {"B": (1, MAX_BATCH, MAX_BATCH)})],
        meta=meta,
    )


def sparse_flow_spec(name: str, model_key: str, config: dict, global_tokens: int, tokens: tuple[int, int, int]) -> ExportSpec:
    a = config["args"]
    meta = _flow_meta(a) | {"class": config["name"]}
    cc = a["cond_channels"]
    cp = a.get("proj_in_channels") or cc
    concat = int(a["in_channels"]) - int(a["out_channels"])  # texture: noise ⊕ normalised shape latent
    x_ch = int(a["in_channels"]) - concat
    meta |= {"concat_channels": concat}
    inputs = [TensorSpec("x", ("B", "N", x_ch)), TensorSpec("t", ("B",)),
              TensorSpec("cond_global", ("B", global_tokens, cc)), TensorSpec("cond_proj", ("B", "N", cp)),
              TensorSpec("rope_cos", ("N", meta["head_dim"] // 2)), TensorSpec("rope_sin", ("N", meta["head_dim"] // 2))]
    if concat:
        inputs.append(TensorSpec("concat_cond", ("B", "N", concat)))
    return ExportSpec(name, model_key, "sparse_flow", inputs,
                      outputs=[TensorSpec("velocity", ("B", "N", int(a["out_channels"])))],
                      profiles=[Profile("tokens", {"B": (1, MAX_BATCH, MAX_BATCH), "N": tokens})], meta=meta)


def ss_decoder_spec(config: dict, flow_config: dict) -> ExportSpec:
    a = config["args"]
    r = int(flow_config["args"]["resolution"])
    up = 2 ** (len(a["channels"]) - 1)
    return ExportSpec(
        "ss_decoder", "sparse_structure_decoder", "ss_decoder",
        inputs=[TensorSpec("latent", (1, int(a["latent_channels"]), r, r, r))],
        outputs=[TensorSpec("logits", (1, int(a["out_channels"]), r * up, r * up, r * up))],
        profiles=[], meta={"class": config["name"], "resolution": r},
    )


def dinov3_spec(name: str, dino_config: dict, image_size: int) -> ExportSpec:
    ps = int(dino_config["patch_size"])
    if image_size % ps:
        raise ValueError(f"{name}: image size {image_size} is not a multiple of the patch size {ps}")
    tokens = 1 + int(dino_config["num_register_tokens"]) + (image_size // ps) ** 2
    return ExportSpec(
        name, "dinov3", "dinov3",
        inputs=[TensorSpec("image", (1, 3, image_size, image_size))],
        outputs=[TensorSpec("tokens", (1, tokens, int(dino_config["hidden_size"])))],
        profiles=[], meta={"image_size": image_size, "patch_size": ps, "num_register_tokens": int(dino_config["num_register_tokens"])},
    )


SPEC_NAMES = ("ss_flow", "shape_lr_flow", "shape_hr_flow", "tex_flow", "ss_decoder", "dinov3_lr", "dinov3_hr")


def build_specs(configs: dict, dino_config: dict, geometry, max_tokens: int | None = None,
                only: list[str] | None = None) -> list[ExportSpec]:
    """Every spec the given configs allow (a 512-only weights directory has no HR networks).

    configs: pipeline key -> {"name", "args"}; dino_config: transformers DINOv3 config dict;
    geometry: config.Geometry (image sizes); max_tokens caps N of the sparse flows."""
    g = 1 + int(dino_config["num_register_tokens"])
    specs = []
    if "sparse_structure_flow_model" in configs:
        specs.append(ss_flow_spec(configs["sparse_structure_flow_model"], g))
    sparse = [("shape_lr_flow", "shape_slat_flow_model_512"), ("shape_hr_flow", "shape_slat_flow_model_1024"),
              ("tex_flow", "tex_slat_flow_model_1024")]
    for name, key in sparse:
        if key not in configs:
            continue
        grid = int(configs[key]["args"]["resolution"])
        # the LR stage cannot exceed its grid; the HR stages run at grid (1024) or 1.5·grid (1536)
        hi = grid ** 3 if name == "shape_lr_flow" else min(DEFAULT_MAX_TOKENS_HR, (grid * 3 // 2) ** 3)
        hi = min(hi, max_tokens) if max_tokens else hi
        opt = min(REFERENCE_TOKENS[name], hi)
        specs.append(sparse_flow_spec(name, key, configs[key], g, (min(MIN_TOKENS, hi), opt, hi)))
    if "sparse_structure_decoder" in configs and "sparse_structure_flow_model" in configs:
        specs.append(ss_decoder_spec(configs["sparse_structure_decoder"], configs["sparse_structure_flow_model"]))
    specs.append(dinov3_spec("dinov3_lr", dino_config, geometry.lr_image))
    if "shape_slat_flow_model_1024" in configs:
        specs.append(dinov3_spec("dinov3_hr", dino_config, geometry.hr_image))
    if only:
        unknown = set(only) - set(SPEC_NAMES)
        if unknown:
            raise ValueError(f"unknown network(s) {', '.join(sorted(unknown))}; known: {', '.join(SPEC_NAMES)}")
        specs = [s for s in specs if s.name in only]
    return specs
