"""Load (and write) the official Pixal3D weights layout, strictly.

Layout of a weights directory (what `--weights DIR` points at):

    DIR/pipeline.json                    Hugging Face TencentARC/Pixal3D: {"name": ..., "args": {"models": {key: "ckpts/<name>"}, samplers, normalisations}}
    DIR/ckpts/<name>.json                {"name": Class, "args": {...}}
    DIR/ckpts/<name>.safetensors         state_dict under upstream key names (fp32 on disk)
    DIR/ckpts/ss_dec_conv3d_16l8_fp16.*  the SS decoder (from microsoft/TRELLIS-image-large; pipeline.json names it by HF path)
    DIR/dinov3-vitl16-pretrain-lvd1689m/ DINOv3 ViT-L/16 in transformers layout (config.json + model.safetensors)
    DIR/naf_release.pth                  valeoai/NAF release state_dict (read with weights_only=True)

Every file is checked against the network built from its config before a tensor is read: a missing
file, wrong class, missing or extra key, wrong shape or truncated file raises CheckpointError with one
line naming the file and the key. Upstream loads with strict=False; we never do.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
from .errors import first_line as _short
from .files import atomic_write
from .models.registry import CLASSES, build_model, model_class

# pipeline.json model key -> upstream classes accepted for it
PIPELINE_MODELS = {
    "sparse_structure_flow_model": {"SparseStructureFlowModel"},
    "sparse_structure_decoder": {"SparseStructureDecoder"},
    "shape_slat_flow_model_512": {"SLatFlowModel", "ElasticSLatFlowModel"},
    "shape_slat_flow_model_1024": {"SLatFlowModel", "ElasticSLatFlowModel"},
    "tex_slat_flow_model_1024": {"SLatFlowModel", "ElasticSLatFlowModel"},
    "shape_slat_decoder": {"FlexiDualGridVaeDecoder"},
    "tex_slat_decoder": {"SparseUnetVaeDecoder"},
}
# models a 512 (shape-only) run does not need
TEXTURE_ONLY = {"tex_slat_flow_model_1024", "tex_slat_decoder"}
HIRES_ONLY = {"shape_slat_flow_model_1024", "tex_slat_flow_model_1024", "tex_slat_decoder"}
DINOV3_DIRS = ("dinov3-vitl16-pretrain-lvd1689m", "dinov3")
NAF_FILES = ("naf_release.pth", "naf.pth")
NAF_DEFAULT_CONFIG = {
    "name": "NAF",
    "args": {"dim": 256, "heads_attn": 4, "heads_rope": 4, "kernel_size": 9, "use_encoder": True,
             "rope_base": 100.0, "rope_rescale": 2.0, "img_layers": 2},
}

HOW_TO_GET_WEIGHTS = """\
pixal3d-rt needs the official Pixal3D weights (about 24 GB), or --preset tiny for a structural demo.
  --weights TencentARC/Pixal3D        downloads them on first use into the Hugging Face cache (NAF: torch's hub cache)
  pixal3d-rt download --dir DIR       fetches everything into DIR for a machine without internet (--weights DIR)
or by hand into one directory, then pass --weights DIR:
  huggingface-cli download TencentARC/Pixal3D --local-dir DIR --include 'pipeline.json' 'ckpts/*'
  huggingface-cli download microsoft/TRELLIS-image-large --local-dir DIR --include 'ckpts/ss_dec_conv3d_16l8_fp16.*'
  huggingface-cli download camenduru/dinov3-vitl16-pretrain-lvd1689m --local-dir DIR/dinov3-vitl16-pretrain-lvd1689m
  curl -L -o DIR/naf_release.pth https://github.com/valeoai/NAF/releases/download/model/naf_release.pth"""


@dataclass
class Weights:
    """Every network of the pipeline plus the pipeline settings, however they were obtained."""

    models: dict  # pipeline key -> nn.Module (see PIPELINE_MODELS)
    configs: dict  # pipeline key -> {"name", "args"}
    dinov3: nn.Module
    dinov3_config: dict  # transformers DINOv3ViTConfig as a dict
    naf: nn.Module
    naf_config: dict
    pipeline_args: dict  # pipeline.json "args" (samplers, normalisations, ...)
    source: str = ""  # directory or preset name, for messages
    hashes: dict = field(default_factory=dict)  # file name -> sha256 prefix, where known


# ---------------------------------------------------------------------------------------------
# validation


def _check_against(module: nn.Module, header: dict, path: Path) -> None:
    """Compare a file's {key: shape} with the module's state_dict; raise on the first mismatch."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in header]
    extra = [k for k in header if k not in expected]
    if missing:
        raise CheckpointError(f"{path}: missing key '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f" for {type(module).__name__}")
    if extra:
        raise CheckpointError(f"{path}: unexpected key '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f" for {type(module).__name__}")
    for k, shape in expected.items():
        if tuple(header[k]) != shape:
            raise CheckpointError(f"{path}: key '{k}' has shape {list(header[k])}, {type(module).__name__} expects {list(shape)}")


def _safetensors_header(path: Path) -> dict:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def _load_safetensors_into(module: nn.Module, path: Path, header: dict) -> None:
    """Copy tensor by tensor into the module's existing parameters (casting to their dtype),
    so a 5.5 GB fp32 file never sits in memory next to its bf16 copy. `header` was checked."""
    from safetensors import safe_open

    targets = module.state_dict(keep_vars=True)
    try:
        with safe_open(str(path), "pt") as f:
            for k in header:
                t = f.get_tensor(k)
                with torch.no_grad():
                    targets[k].data.copy_(t)  # casts to the parameter's dtype and device
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: failed while reading tensors ({_short(e)})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _materialise(meta: nn.Module, build, device) -> nn.Module:
    """Allocate a network built on the meta device without paying for random init of ~1.4 B
    parameters, unless it has buffers outside its state_dict (computed at construction, e.g. RoPE
    tables): then `build()` constructs it for real on `device`."""
    non_persistent = set(dict(meta.named_buffers())) - set(meta.state_dict())
    if non_persistent:
        with torch.device(device):
            return build()
    return meta.to_empty(device=device)


def compute_config(config: dict, dtype: str | None) -> dict:
    """The config with its precision arguments overridden (CPU runs the fp32 oracle)."""
    if dtype is None:
        return config
    args = dict(config.get("args", {}))
    if "dtype" in args:
        args["dtype"] = dtype
    if "use_fp16" in args:
        args["use_fp16"] = dtype == "float16"
    return {**config, "args": args}


def load_network(base: Path, expect: set | None = None, device="cpu", dtype: str | None = None,
                 read: bool = True) -> tuple[nn.Module, dict]:
    """Load `<base>.json` + `<base>.safetensors` strictly. Returns (module in eval mode, file config).
    read=False: the file is checked but its tensors are left unread (allocated, uninitialised), for
    a host weights store that reads them on first use (`read_network_file`)."""
    base = Path(base)
    cfg_path, st_path = base.parent / (base.name + ".json"), base.parent / (base.name + ".safetensors")
    config = _network_config(base, expect)
    if not st_path.is_file():
        raise CheckpointError(f"{st_path}: file not found")
    header = _safetensors_header(st_path)
    run_config = compute_config(config, dtype)
    meta = _meta_network(run_config, cfg_path)
    _check_against(meta, header, st_path)  # before any allocation
    module = _materialise(meta, lambda: build_model(run_config), device)
    if read:
        _load_safetensors_into(module, st_path, header)
    return module.eval(), config


def read_network_file(module: nn.Module, base: Path) -> None:
    """(Re-)read `<base>.safetensors` into a network built from `<base>.json` whose tensors are
    allocated, strictly, casting to each tensor's dtype (runtime.residency re-reads dropped weights)."""
    base = Path(base)
    st_path = base.parent / (base.name + ".safetensors")
    header = _safetensors_header(st_path)
    _check_against(module, header, st_path)
    _load_safetensors_into(module, st_path, header)


def load_dinov3(directory: Path, device="cpu") -> tuple[nn.Module, dict]:
    from .models.dinov3 import build_dinov3

    directory = Path(directory)
    st_path = directory / "model.safetensors"
    header = _safetensors_header(st_path)
    meta, cfg = _meta_dinov3(directory)
    _check_against(meta, header, st_path)
    model = _materialise(meta, lambda: build_dinov3(cfg), device)
    _load_safetensors_into(model, st_path, header)
    return model.eval(), model.config.to_dict()


def load_naf(path: Path, device="cpu") -> tuple[nn.Module, dict]:
    path = Path(path)
    cfg_path = path.with_suffix(".json")  # the official release has none: the default is the released model
    config = _read_json(cfg_path) if cfg_path.is_file() else NAF_DEFAULT_CONFIG
    state = _read_naf_state(path)
    _check_against(_meta_network(config, cfg_path), {k: tuple(v.shape) for k, v in state.items()}, path)
    with torch.device(device):
        model = build_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), config


def resolve_model_ref(weights_dir: Path, ref: str) -> Path:
    """pipeline.json names most models `ckpts/<name>` and the SS decoder by HF path
    (`microsoft/TRELLIS-image-large/ckpts/<name>`); both are looked up inside the weights directory."""
    candidates = [weights_dir / ref]
    parts = ref.split("/")
    if len(parts) > 2:
        candidates.append(weights_dir / "/".join(parts[2:]))
    for c in candidates:
        if (c.parent / (c.name + ".json")).is_file():
            return c
    return candidates[-1]


def _find(weights_dir: Path, names: tuple, kind: str, is_dir: bool) -> Path:
    for n in names:
        p = weights_dir / n
        if (p.is_dir() if is_dir else p.is_file()):
            return p
    raise CheckpointError(f"{weights_dir / names[0]}: {kind} not found (looked for {', '.join(names)})")


@dataclass
class WeightFiles:
    """Where every file of one weights set lies: a directory in the official layout, or the
    Hugging Face cache (pixal3d_rt.hub). Locating reads pipeline.json only; `check_weights` and
    `load_weights` read the rest."""

    source: str  # what the user named (directory or Hub id), for messages
    pipeline_json: Path
    pipeline_args: dict  # pipeline.json "args"
    models: dict  # pipeline key -> checkpoint base path (<base>.json + <base>.safetensors)
    dinov3_dir: Path
    naf: Path


def _pipeline_args(path: Path) -> dict:
    pj = _read_json(path)
    args = pj.get("args", pj) if isinstance(pj, dict) else None
    if not isinstance(args, dict) or not isinstance(args.get("models"), dict):
        raise CheckpointError(f"{path}: no 'models' table in args (not a Pixal3D pipeline.json)")
    for key in ("shape_slat_normalization", "tex_slat_normalization"):
        norm = args.get(key)
        if not (isinstance(norm, dict) and all(isinstance(norm.get(k), list) and norm[k]
                                               and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and math.isfinite(v) for v in norm[k]) for k in ("mean", "std"))
                and len(norm["mean"]) == len(norm["std"]) and all(v > 0 for v in norm["std"])):
            raise CheckpointError(f"{path}: '{key}' must be {{\"mean\": [numbers], \"std\": [positive numbers]}} "
                                  "of one length")
    for key in SAMPLER_KEYS:
        problem = _sampler_problem(args.get(key, {}))
        if problem:
            raise CheckpointError(f"{path}: '{key}' {problem}")
    return args


SAMPLER_KEYS = ("sparse_structure_sampler", "shape_slat_sampler", "tex_slat_sampler")
SAMPLER_PARAMS = ("steps", "rescale_t", "guidance_strength", "guidance_rescale", "guidance_interval")  # what the sampler takes


def _sampler_problem(sampler) -> str | None:
    """What is wrong with a pipeline.json sampler entry ({"params": {...}}), or None."""
    params = sampler.get("params", {}) if isinstance(sampler, dict) else None
    if not isinstance(params, dict):
        return 'must be {"params": {...}}'
    for k, v in params.items():
        if k not in SAMPLER_PARAMS:
            return f"has unknown parameter '{k}' (known: {', '.join(SAMPLER_PARAMS)})"
        if k == "guidance_interval":
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                               and math.isfinite(x) for x in v)):
                return "has a guidance_interval that is not [start, end]"
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return f"has a parameter '{k}' that is not a number"
    return None


def wanted_models(need: set | None) -> list:
    return [k for k in PIPELINE_MODELS if need is None or k in need]


def weight_files_from_dir(weights_dir, need: set | None = None) -> WeightFiles:
    """Locate the files of a weights directory (nothing but pipeline.json is read)."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise CheckpointError(f"{weights_dir}: weights directory not found")
    args = _pipeline_args(weights_dir / "pipeline.json")
    bases = {}
    for key in wanted_models(need):
        if not isinstance(args["models"].get(key), str):
            raise CheckpointError(f"{weights_dir / 'pipeline.json'}: no entry for model '{key}'")
        bases[key] = resolve_model_ref(weights_dir, args["models"][key])
    dino = _find(weights_dir, DINOV3_DIRS, "DINOv3 directory", True)
    naf = _find(weights_dir, NAF_FILES, "NAF checkpoint", False)
    return WeightFiles(str(weights_dir), weights_dir / "pipeline.json", args, bases, dino, naf)


def locate_weights(ref, need: set | None = None, progress=None) -> WeightFiles:
    """`--weights` as the user gives it: a directory, or a Hugging Face id (e.g. TencentARC/Pixal3D)
    resolved through huggingface_hub (cache first, downloads otherwise; HF_HUB_OFFLINE honoured)."""
    if isinstance(ref, WeightFiles):
        return ref
    path = Path(ref)
    if path.is_dir():
        return weight_files_from_dir(path, need)
    from . import hub

    if hub.is_hub_id(str(ref)) and not path.exists():
        return hub.resolve(str(ref), need=need, progress=progress)
    raise CheckpointError(f"{ref}: weights directory not found (give a directory in the official layout or a "
                          "Hugging Face id such as TencentARC/Pixal3D)")


def _network_config(base: Path, expect: set | None) -> dict:
    cfg_path = base.parent / (base.name + ".json")
    config = _read_json(cfg_path)
    name = config.get("name") if isinstance(config, dict) else None
    if not isinstance(name, str) or not isinstance(config.get("args", {}), dict):
        raise CheckpointError(f"{cfg_path}: expected {{\"name\": Class, \"args\": {{...}}}}")
    if name not in CLASSES:
        raise CheckpointError(f"{cfg_path}: unknown network class '{name}'")
    if expect and name not in expect:
        raise CheckpointError(f"{cfg_path}: class '{name}', expected {' or '.join(sorted(expect))}")
    return config


def _meta_network(config: dict, cfg_path: Path) -> nn.Module:
    model_class(config["name"])  # import the definition (and its module constants) outside the meta context
    try:
        with torch.device("meta"):
            return build_model(config)
    except Exception as e:  # a constructor given arguments it was not written for can fail in any way
        raise CheckpointError(f"{cfg_path}: arguments do not fit {config['name']} ({_short(e)})") from None


def _meta_dinov3(directory: Path) -> tuple[nn.Module, dict]:
    from .models.dinov3 import build_dinov3

    cfg = _read_json(directory / "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{directory / 'config.json'}: not a DINOv3 ViT config (expected a JSON object)")
    try:
        with torch.device("meta"):
            return build_dinov3(cfg), cfg
    except Exception as e:  # transformers' config classes fail in many ways on unexpected values
        raise CheckpointError(f"{directory / 'config.json'}: not a DINOv3 ViT config ({_short(e)})") from None


def _read_naf_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; torch's advice after that line is to disable it
        raise CheckpointError(f"{path}: not a plain PyTorch state_dict, refused without executing it "
                              f"({_short(e).split(' Re-running')[0].rstrip('. ')}); download naf_release.pth again") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    return state


# pipeline.json normalisation of each flow's output latents
LATENT_NORMALIZATION = {"shape_slat_flow_model_512": "shape_slat_normalization",
                        "shape_slat_flow_model_1024": "shape_slat_normalization",
                        "tex_slat_flow_model_1024": "tex_slat_normalization"}


def check_weights(files: WeightFiles, need: set | None = None) -> list[dict]:
    """Preflight: every config read and its network built on the meta device (no memory), every
    safetensors header compared with it key by key and shape by shape, the NAF state_dict read
    safely; no weight tensor of a large network is read. Raises CheckpointError on the first
    problem; returns one row per network (key, files, class, parameters, bytes on disk)."""
    rows = []
    for key in wanted_models(need):
        base = files.models[key]
        config = _network_config(base, PIPELINE_MODELS[key])
        cfg_path, st_path = base.parent / (base.name + ".json"), base.parent / (base.name + ".safetensors")
        if not st_path.is_file():
            raise CheckpointError(f"{st_path}: file not found")
        header = _safetensors_header(st_path)  # before the network: a config cannot make us allocate for a lie
        net = _meta_network(config, cfg_path)
        _check_against(net, header, st_path)
        norm = LATENT_NORMALIZATION.get(key)
        if norm and len(files.pipeline_args[norm]["mean"]) != getattr(net, "out_channels", None):
            raise CheckpointError(f"{files.pipeline_json}: '{norm}' has {len(files.pipeline_args[norm]['mean'])} channels, "
                                  f"{key} outputs {getattr(net, 'out_channels', '?')}")
        rows.append({"network": key, "file": str(st_path), "class": config["name"],
                     "parameters": sum(p.numel() for p in net.parameters()), "bytes": st_path.stat().st_size})
    dino_st = files.dinov3_dir / "model.safetensors"
    header = _safetensors_header(dino_st)
    dino, _ = _meta_dinov3(files.dinov3_dir)
    _check_against(dino, header, dino_st)
    rows.append({"network": "dinov3", "file": str(dino_st), "class": "DINOv3ViTModel",
                 "parameters": sum(p.numel() for p in dino.parameters()), "bytes": dino_st.stat().st_size})
    state = _read_naf_state(files.naf)
    cfg_path = files.naf.with_suffix(".json")
    config = _read_json(cfg_path) if cfg_path.is_file() else NAF_DEFAULT_CONFIG
    naf = _meta_network(config, cfg_path)
    _check_against(naf, {k: tuple(v.shape) for k, v in state.items()}, files.naf)
    rows.append({"network": "naf", "file": str(files.naf), "class": "NAF",
                 "parameters": sum(v.numel() for v in state.values()), "bytes": files.naf.stat().st_size})
    return rows


def load_weights(weights, device="cpu", dtype: str | None = None, need: set | None = None, progress=None,
                 checked: list | None = None, read: bool = True) -> Weights:
    """Load a weights set (directory, Hub id or WeightFiles) after checking all of it (`check_weights`;
    pass its rows as `checked` when already done). `need` limits which pipeline models load;
    `progress(name, bytes, total_bytes)` is told after each network. read=False: the pipeline
    networks are checked but their tensors left unread (a host weights store reads them per stage)."""
    files = locate_weights(weights, need)
    size = {r["network"]: r["bytes"] for r in (checked if checked is not None else check_weights(files, need))}
    total = sum(size.values())
    models, configs = {}, {}
    for key in wanted_models(need):
        models[key], configs[key] = load_network(files.models[key], PIPELINE_MODELS[key], device, dtype, read=read)
        if progress:
            progress(key, size[key], total)
    dino, dino_cfg = load_dinov3(files.dinov3_dir, device)
    naf, naf_cfg = load_naf(files.naf, device)
    if progress:
        progress("dinov3+naf", size["dinov3"] + size["naf"], total)
    return Weights(models, configs, dino, dino_cfg, naf, naf_cfg, files.pipeline_args, source=files.source)


# ---------------------------------------------------------------------------------------------
# writing (tests, and the tiny preset on disk)


def save_network(module: nn.Module, config: dict, base: Path) -> None:
    """Write `<base>.json` + `<base>.safetensors` as the official checkpoints are: fp32 on disk."""
    from safetensors.torch import save_file

    base = Path(base)
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in module.state_dict().items()}
    atomic_write(base.parent / (base.name + ".safetensors"), lambda p: save_file(state, p))
    atomic_write(base.parent / (base.name + ".json"), lambda p: Path(p).write_text(json.dumps(config, indent=2)))


CKPT_NAMES = {  # official file names (pixal3d.md §5.3)
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_1_3B_64_bf16",
    "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
    "shape_slat_flow_model_512": "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
    "tex_slat_flow_model_1024": "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
    "shape_slat_decoder": "ckpts/shape_dec_next_dc_f16c32_fp16",
    "tex_slat_decoder": "ckpts/tex_dec_next_dc_f16c32_fp16",
}


def write_weights(w: Weights, weights_dir) -> Path:
    """Write a Weights bundle in the official layout (used to test the loader with real files)."""
    from safetensors.torch import save_file

    d = Path(weights_dir)
    args = dict(w.pipeline_args)
    args["models"] = {k: CKPT_NAMES[k] for k in w.models}
    for k, m in w.models.items():
        save_network(m, w.configs[k], resolve_model_ref(d, CKPT_NAMES[k]))
    dd = d / DINOV3_DIRS[0]
    dcfg = {k: v for k, v in w.dinov3_config.items() if k not in ("_attn_implementation_autoset",)}
    dcfg["model_type"] = "dinov3_vit"
    atomic_write(dd / "config.json", lambda p: Path(p).write_text(json.dumps(dcfg, indent=2, default=str)))
    dstate = {k: v.detach().float().contiguous().cpu() for k, v in w.dinov3.state_dict().items()}
    atomic_write(dd / "model.safetensors", lambda p: save_file(dstate, p))
    nstate = {k: v.detach().contiguous().cpu() for k, v in w.naf.state_dict().items()}
    atomic_write(d / NAF_FILES[0], lambda p: torch.save(nstate, p))
    atomic_write(d / (Path(NAF_FILES[0]).stem + ".json"), lambda p: Path(p).write_text(json.dumps(w.naf_config, indent=2)))
    atomic_write(d / "pipeline.json", lambda p: Path(p).write_text(json.dumps({"name": "Pixal3DImageTo3DPipeline", "args": args}, indent=2)))
    return d
