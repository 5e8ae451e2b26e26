"""Golden parity runners for the decoders and mesh extraction (fixtures ss_decoder, shape_decoder,
tex_decoder, fdg_to_mesh). Every size comes from the fixture itself."""
from __future__ import annotations

import copy

from pixal3d_rt.mesh.fdg import flexible_dual_grid_to_mesh
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.models.sc_vae import quantize_hr_coords
from pixal3d_rt.models.sparse import SparseTensor
from pixal3d_rt.models.ss_decoder import occupancy_to_coords
from pixal3d_rt.tools.parity import Fixture
from pixal3d_rt.tools.parity import register


def _fp32_model(fx: Fixture):
    """The fixture's network, forced to fp32 (parity is fp32), with its upstream weights loaded strictly."""
    config = copy.deepcopy(fx.config)
    config["args"]["use_fp16"] = False
    model = build_model(config).eval()
    model.load_state_dict(fx.w, strict=True)
    return model


def _sparse_inputs(fx: Fixture, name: str) -> SparseTensor:
    return SparseTensor(fx.inp[f"{name}.feats"], fx.inp[f"{name}.coords"])


@register("SparseStructureDecoder")
def run_ss_decoder(fx: Fixture) -> dict:
    model = _fp32_model(fx)
    mids = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: mids.__setitem__(n, o)) for n in ("input_layer", "middle_block")]
    hooks += [b.register_forward_hook(lambda m, i, o, k=k: mids.__setitem__(f"blocks.{k}", o)) for k, b in enumerate(model.blocks)]
    logits = model(fx.inp["z"])
    for h in hooks:
        h.remove()
    got = {"out.logits": logits, "out.coords_pooled": occupancy_to_coords(logits, pool=True)}
    got.update({f"mid.{k}": v for k, v in mids.items()})
    return got


def _level_mids(model, prefix: str = "mid.blocks") -> tuple[dict, list]:
    """Forward hooks recording decoder.blocks[i][j] outputs under the fixture's mid names."""
    mids, hooks = {}, []
    for i, level in enumerate(model.blocks):
        for j, block in enumerate(level):
            def hook(m, inp, out, i=i, j=j):
                if isinstance(out, tuple):  # up-block: (h, subdivision logits)
                    mids[f"{prefix}.{i}.{j}.0.feats"] = out[0].feats
                    mids[f"{prefix}.{i}.{j}.1.feats"] = out[1]
                    mids[f"{prefix}.{i}.{j}.feats"] = out[0].feats
                else:
                    mids[f"{prefix}.{i}.{j}.feats"] = out.feats
            hooks.append(block.register_forward_hook(hook))
    hooks.append(model.from_latent.register_forward_hook(lambda m, i, o: mids.__setitem__("mid.from_latent.feats", o)))
    return mids, hooks


@register("FlexiDualGridVaeDecoder")
def run_shape_decoder(fx: Fixture) -> dict:
    model = _fp32_model(fx)
    x = _sparse_inputs(fx, "x")
    mids, hooks = _level_mids(model)
    h, subs = model(x, return_subs=True)
    for hk in hooks:
        hk.remove()
    (m,) = model.mesh_inputs(h)
    got = {
        "out.h.feats": h.feats,
        "out.h.coords": h.coords,
        "out.vertices": m.vertices,
        "out.intersected": m.intersected,
        "out.quad_lerp": m.quad_lerp,
    }
    for i, s in enumerate(subs):
        got[f"out.subs.{i}.feats"] = s.feats
        got[f"out.subs.{i}.coords"] = s.coords
    for key in fx.out:
        if key.startswith("upsample") and key.endswith(".coords"):
            k = int(key[len("upsample") : -len(".coords")])
            got[f"out.{key}"] = model.upsample(x, upsample_times=k)
    # R_dec: the resolution of the fully upsampled coordinates = the decoder's `resolution`
    # (16 x the latent grid; the pipeline's literal 512)
    r_dec = int(fx.config["args"]["resolution"])
    hr_coords = model.upsample(x, upsample_times=len(model.blocks) - 1)
    for key in fx.out:
        if key.startswith("hr_quant_G") and key.endswith(".coords"):
            g = int(key[len("hr_quant_G") : -len(".coords")])
            got[f"out.{key}"] = quantize_hr_coords(hr_coords, r_dec, g)
    got.update(mids)
    return got


@register("SparseUnetVaeDecoder")
def run_tex_decoder(fx: Fixture) -> dict:
    model = _fp32_model(fx)
    x = _sparse_inputs(fx, "x")
    n_up = len(model.blocks) - 1
    guide = [_sparse_inputs(fx, f"guide_subs.{i}") for i in range(n_up)] if "guide_subs.0.feats" in fx.inp else None
    mids, hooks = _level_mids(model)
    h = model(x, guide_subs=guide)
    for hk in hooks:
        hk.remove()
    return {
        "out.h.feats": h.feats,
        "out.h.coords": h.coords,
        "out.pbr.feats": h.feats * 0.5 + 0.5,
        **mids,
    }


@register("flexible_dual_grid_to_mesh")
def run_fdg_to_mesh(fx: Fixture) -> dict:
    aabb = fx.config["args"].get("aabb", [[-0.5] * 3, [0.5] * 3])
    got = {}
    for case in fx.config["args"]["cases"]:
        inp = {k[len(case) + 1 :]: v for k, v in fx.inp.items() if k.startswith(case + ".")}
        args = (inp["coords"], inp["dual_vertices"], inp["intersected"])
        grid = int(inp["grid_size"])
        v, f, q = flexible_dual_grid_to_mesh(*args, inp["split_weight"], aabb=aabb, grid_size=grid, return_quads=True)
        _, f_none = flexible_dual_grid_to_mesh(*args, None, aabb=aabb, grid_size=grid)
        got[f"out.{case}.vertices"] = v
        got[f"out.{case}.faces"] = f
        got[f"out.{case}.faces_split_none"] = f_none
        got[f"mid.{case}.quads"] = q
    return got
