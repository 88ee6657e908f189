"""DRiffusion: draft-and-refine parallel diffusion sampling.

    from driffusion import sample, Schedule
    schedule = Schedule.from_diffusers(scheduler)          # after scheduler.set_timesteps(S)
    result = sample(denoise, x, schedule, mode="aggressive", k=4)

Names are imported lazily, so that ``driffusion.api``, ``driffusion.specs`` and the client do not
pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "MODES": "engine",
    "SampleResult": "engine",
    "count_rounds": "engine",
    "draft_and_refine": "engine",
    "plan": "engine",
    "round_sizes": "engine",
    "sample": "engine",
    "tapered": "engine",
    "jump": "jumps",
    "step": "jumps",
    "Schedule": "schedule",
    "parallelize": "parallel",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'driffusion' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
