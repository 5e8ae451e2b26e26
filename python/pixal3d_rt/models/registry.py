"""Build a network from an upstream checkpoint config `{"name": Class, "args": {...}}`."""
from __future__ import annotations

import importlib

import torch.nn as nn

# upstream class name -> "module:attribute" of this project's definition
CLASSES = {
    "SparseStructureFlowModel": "pixal3d_rt.models.flow:SparseStructureFlowModel",
    "SLatFlowModel": "pixal3d_rt.models.flow:SLatFlowModel",
    "ElasticSLatFlowModel": "pixal3d_rt.models.flow:ElasticSLatFlowModel",
    "SparseStructureDecoder": "pixal3d_rt.models.ss_decoder:SparseStructureDecoder",
    "SparseUnetVaeDecoder": "pixal3d_rt.models.sc_vae:SparseUnetVaeDecoder",
    "FlexiDualGridVaeDecoder": "pixal3d_rt.models.sc_vae:FlexiDualGridVaeDecoder",
    "NAF": "pixal3d_rt.models.naf:NAF",
}


def model_class(name: str) -> type:
    if name not in CLASSES:
        raise KeyError(f"unknown network class {name!r}; known: {', '.join(sorted(CLASSES))}")
    mod, attr = CLASSES[name].split(":")
    return getattr(importlib.import_module(mod), attr)


def build_model(config: dict) -> nn.Module:
    """Instantiate `config["name"]` with `config["args"]` (the upstream constructor arguments)."""
    return model_class(config["name"])(**config.get("args", {}))
