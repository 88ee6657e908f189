"""DRiffusion: draft-and-refine parallel diffusion sampling.

from driffusion import sample, Schedule
schedule = Schedule.from_diffusers(scheduler)          # after scheduler.set_timesteps(S)
result = sample(denoise, x, schedule, mode="aggressive", k=4)
"""

from .engine import MODES, SampleResult, count_rounds, draft_and_refine, plan, sample, tapered
from .jump import jump, step
from .schedule import Schedule

__all__ = [
    "MODES",
    "SampleResult",
    "Schedule",
    "count_rounds",
    "draft_and_refine",
    "jump",
    "parallelize",
    "plan",
    "sample",
    "step",
    "tapered",
]


def __getattr__(name: str):
    if name == "parallelize":  # imports diffusers: load it only when asked for
        from .parallel import parallelize

        return parallelize
    raise AttributeError(f"module 'driffusion' has no attribute {name!r}")
