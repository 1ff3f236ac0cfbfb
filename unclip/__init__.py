"""unclip: a DALL-E 2-style text-to-image system (CLIP prior + diffusion decoder + upsamplers)."""

__version__ = "0.1.0"

from .interpolation import mix, slerp, text_diff  # noqa: E402

__all__ = ["UnCLIPPipeline", "UnCLIPOutput", "SamplingSettings", "slerp", "mix", "text_diff", "__version__"]


def __getattr__(name):
    # The pipeline pulls in the prior and decoder packages; import it on first use so that the light
    # parts of unclip (data builders, the CLI's --help) start fast.
    if name in ("UnCLIPPipeline", "UnCLIPOutput", "SamplingSettings"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")
