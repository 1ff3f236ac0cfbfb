"""make_scheduler: diffusers schedulers by name, built from one training noise-schedule config."""

from __future__ import annotations

from diffusers import (DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UnCLIPScheduler, UniPCMultistepScheduler)


class KarloScheduler(UnCLIPScheduler):
    """diffusers' UnCLIPScheduler (Karlo's sampler) stepping to the next of its own timesteps by itself.

    UnCLIPScheduler.step falls back to t - 1 unless told the previous timestep (diffusers' unCLIP pipelines pass
    it); here it is looked up in `self.timesteps`, so the scheduler runs in the one loop like any other.
    """

    def step(self, model_output, timestep, sample, prev_timestep=None, generator=None, return_dict=True):
        if prev_timestep is None and self.num_inference_steps is not None:
            later = self.timesteps[self.timesteps < timestep]   # timesteps descend
            prev_timestep = later[0] if len(later) else None
        return super().step(model_output, timestep, sample, prev_timestep=prev_timestep, generator=generator,
                            return_dict=return_dict)

SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddim-inverse": (DDIMInverseScheduler, {}),  # DDIM inversion: clean image -> its noise
    "unclip": (KarloScheduler, {}),              # Karlo's DDPM variant (cosine schedule only; eps or x0)
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
    if overrides.get("thresholding") and key in ("euler", "unclip"):
        raise ValueError(f"sampler {name!r} does not support dynamic thresholding; use ddpm, ddim, dpm++ or unipc")
    if key == "unclip" and settings.get("prediction_type") not in ("epsilon", "sample"):
        raise ValueError(f"sampler 'unclip' takes epsilon or sample predictions, not {settings.get('prediction_type')!r}")
    return cls.from_config(settings)


def training_scheduler(config: dict | None = None) -> DDPMScheduler:
    """The DDPM scheduler used to noise training samples (`add_noise`, `get_velocity`)."""
    return make_scheduler("ddpm", config)
