"""make_scheduler: diffusers schedulers by name, built from one training noise-schedule config."""

from __future__ import annotations

from diffusers import (DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)

SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddim-inverse": (DDIMInverseScheduler, {}),  # DDIM inversion: clean image -> its noise
}
ALIASES = {"dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpmpp": "dpm++", "dpm": "dpm++"}

# The training noise schedule every component uses unless its config says otherwise (saved as
# scheduler_config.json). Cosine schedule: Nichol & Dhariwal 2021, "Improved DDPM".
DEFAULT_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="epsilon", clip_sample=False)


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, config: dict | None = None, **overrides):
    """A diffusers scheduler by name ("ddpm", "ddim", "dpm++", ...) over a training noise-schedule config.

    Args:
        config: the component's scheduler_config.json (num_train_timesteps, beta_schedule, prediction_type...).
        overrides: e.g. thresholding=True, dynamic_thresholding_ratio=0.995 (Imagen's dynamic thresholding).
    """
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SCHEDULERS)})")
    cls, defaults = SCHEDULERS[key]
    settings = {**DEFAULT_NOISE_SCHEDULE, **(config or {}), **defaults, **overrides}
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    if overrides.get("thresholding") and key in ("euler",):
        raise ValueError(f"sampler {name!r} does not support dynamic thresholding; use ddpm, ddim, dpm++ or unipc")
    return cls.from_config(settings)


def training_scheduler(config: dict | None = None) -> DDPMScheduler:
    """The DDPM scheduler used to noise training samples (`add_noise`, `get_velocity`)."""
    return make_scheduler("ddpm", config)
