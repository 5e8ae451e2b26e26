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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
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
Download them into one directory, then pass --weights DIR:
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


def _load_safetensors_into(module: nn.Module, path: Path) -> None:
    """Copy tensor by tensor into the module's existing parameters (casting to their dtype),
    so a 5.5 GB fp32 file never sits in memory next to its bf16 copy."""
    from safetensors import safe_open

    header = _safetensors_header(path)
    _check_against(module, header, path)
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


def _short(e: Exception) -> str:
    """The first line of an exception's text, cut to a readable length (library messages can be paragraphs)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _materialise(config: dict, device) -> nn.Module:
    """Build a network without paying for random init of ~1.4 B parameters: construct on the meta
    device and allocate empty storage, unless the class has buffers that are not in its state_dict
    (those are computed at construction and would be lost)."""
    model_class(config["name"])  # import the definition (and its module constants) outside the meta context
    with torch.device("meta"):
        meta = build_model(config)
    non_persistent = set(dict(meta.named_buffers())) - set(meta.state_dict())
    if non_persistent:
        with torch.device(device):
            return build_model(config)
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


def load_network(base: Path, expect: set | None = None, device="cpu", dtype: str | None = None) -> tuple[nn.Module, dict]:
    """Load `<base>.json` + `<base>.safetensors` strictly. Returns (module in eval mode, file config)."""
    base = Path(base)
    cfg_path, st_path = base.parent / (base.name + ".json"), base.parent / (base.name + ".safetensors")
    config = _read_json(cfg_path)
    name = config.get("name")
    if not isinstance(config.get("args", {}), dict) or not name:
        raise CheckpointError(f"{cfg_path}: expected {{\"name\": Class, \"args\": {{...}}}}")
    if name not in CLASSES:
        raise CheckpointError(f"{cfg_path}: unknown network class '{name}'")
    if expect and name not in expect:
        raise CheckpointError(f"{cfg_path}: class '{name}', expected {' or '.join(sorted(expect))}")
    if not st_path.is_file():
        raise CheckpointError(f"{st_path}: file not found")
    try:
        module = _materialise(compute_config(config, dtype), device)
    except TypeError as e:
        raise CheckpointError(f"{cfg_path}: arguments do not fit {name} ({e})") from None
    _load_safetensors_into(module, st_path)
    return module.eval(), config


def load_dinov3(directory: Path, device="cpu") -> tuple[nn.Module, dict]:
    from .models.dinov3 import build_dinov3

    directory = Path(directory)
    cfg = _read_json(directory / "config.json")
    try:
        with torch.device("meta"):
            meta = build_dinov3(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: not a DINOv3 ViT config ({_short(e)})") from None
    non_persistent = set(dict(meta.named_buffers())) - set(meta.state_dict())
    if non_persistent:  # RoPE tables are computed, not stored: build for real so they exist
        with torch.device(device):
            model = build_dinov3(cfg)
    else:
        model = meta.to_empty(device=device)
    _load_safetensors_into(model, directory / "model.safetensors")
    return model.eval(), model.config.to_dict()


def load_naf(path: Path, device="cpu") -> tuple[nn.Module, dict]:
    path = Path(path)
    cfg_path = path.with_suffix(".json")  # the official release has none: the default is the released model
    config = _read_json(cfg_path) if cfg_path.is_file() else NAF_DEFAULT_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict ({_short(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    with torch.device(device):
        model = build_model(config)
    _check_against(model, {k: tuple(v.shape) for k, v in state.items()}, path)
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


def load_weights(weights_dir, device="cpu", dtype: str | None = None, need: set | None = None, progress=None) -> Weights:
    """Load a weights directory in the official layout. `need` limits which pipeline models load."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise CheckpointError(f"{weights_dir}: weights directory not found")
    pj = _read_json(weights_dir / "pipeline.json")
    args = pj.get("args", pj)
    refs = args.get("models")
    if not isinstance(refs, dict):
        raise CheckpointError(f"{weights_dir / 'pipeline.json'}: no 'models' table in args")
    for key in ("shape_slat_normalization", "tex_slat_normalization"):
        if key not in args:
            raise CheckpointError(f"{weights_dir / 'pipeline.json'}: missing '{key}'")
    models, configs = {}, {}
    wanted = [k for k in PIPELINE_MODELS if need is None or k in need]
    for key in wanted:
        if key not in refs:
            raise CheckpointError(f"{weights_dir / 'pipeline.json'}: no entry for model '{key}'")
        base = resolve_model_ref(weights_dir, refs[key])
        if progress:
            progress(f"loading {key} from {base.name}")
        models[key], configs[key] = load_network(base, PIPELINE_MODELS[key], device, dtype)
    if progress:
        progress("loading DINOv3 and NAF")
    dino, dino_cfg = load_dinov3(_find(weights_dir, DINOV3_DIRS, "DINOv3 directory", True), device)
    naf, naf_cfg = load_naf(_find(weights_dir, NAF_FILES, "NAF checkpoint", False), device)
    return Weights(models, configs, dino, dino_cfg, naf, naf_cfg, args, source=str(weights_dir))


# ---------------------------------------------------------------------------------------------
# writing (tests, and the tiny preset on disk)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_network(module: nn.Module, config: dict, base: Path) -> None:
    """Write `<base>.json` + `<base>.safetensors` as the official checkpoints are: fp32 on disk."""
    from safetensors.torch import save_file

    base = Path(base)
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in module.state_dict().items()}
    _atomic_write(base.parent / (base.name + ".safetensors"), lambda p: save_file(state, p))
    _atomic_write(base.parent / (base.name + ".json"), lambda p: Path(p).write_text(json.dumps(config, indent=2)))


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
    _atomic_write(dd / "config.json", lambda p: Path(p).write_text(json.dumps(dcfg, indent=2, default=str)))
    dstate = {k: v.detach().float().contiguous().cpu() for k, v in w.dinov3.state_dict().items()}
    _atomic_write(dd / "model.safetensors", lambda p: save_file(dstate, p))
    nstate = {k: v.detach().contiguous().cpu() for k, v in w.naf.state_dict().items()}
    _atomic_write(d / NAF_FILES[0], lambda p: torch.save(nstate, p))
    _atomic_write(d / (Path(NAF_FILES[0]).stem + ".json"), lambda p: Path(p).write_text(json.dumps(w.naf_config, indent=2)))
    _atomic_write(d / "pipeline.json", lambda p: Path(p).write_text(json.dumps({"name": "Pixal3DImageTo3DPipeline", "args": args}, indent=2)))
    return d
