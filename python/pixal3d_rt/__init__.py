"""pixal3d-rt: Pixal3D inference runtime (image -> textured PBR GLB).

    from pixal3d_rt import Pipeline
    pipe = Pipeline.from_pretrained("TencentARC/Pixal3D")   # or a weights directory
    asset = pipe.run("photo.png", seed=42)
    asset.save_glb("photo.glb")
"""
__version__ = "0.1.0"
__all__ = ["Pipeline", "Result", "Pixal3DError"]


def __getattr__(name):  # torch is imported on first use, not by `import pixal3d_rt`
    if name in ("Pipeline", "Result"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Pixal3DError":
        from .errors import Pixal3DError

        return Pixal3DError
    raise AttributeError(f"module 'pixal3d_rt' has no attribute {name!r}")
