"""The served sampler names, and how each is built from a pipeline's own scheduler config.

    check_supported(pipe.scheduler.config)        # raises ValueError naming what is supported
    samplers_for("v_prediction")                   # -> ("ddim", "ddpm", "euler", ...)
    scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)

``make_scheduler`` keeps what the model was trained with (betas, prediction type, timestep spacing,
offset: diffusers' ``from_config`` carries every key the new class knows) and sets only what
defines the sampler. Importing this module does not import torch or diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SAMPLERS = (
    "ddim",
    "ddpm",
    "euler",
    "euler_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
    "pndm",
    "flow_euler",
)

_NO_KARRAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_DPMPP_2M = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "use_lu_lambdas": False,
    **_NO_KARRAS,
}

# name -> (diffusers class, config entries that define the sampler)
_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", dict(_NO_KARRAS)),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", _DPMPP_2M),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {**_NO_KARRAS, "predict_x0": True, "solver_type": "bh2"}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False}),
}

_FLOW_TYPES = ("flow", "flow_prediction")
_NOT_FOR_SAMPLE = ("euler_ancestral", "pndm")  # diffusers refuses prediction_type="sample" there

# What Schedule.from_diffusers reads, with the limits of each (for the error message).
SUPPORTED = {
    "DDIMScheduler": "",
    "DDPMScheduler": "fixed variance_type",
    "EulerDiscreteScheduler": "",
    "EulerAncestralDiscreteScheduler": "epsilon or v_prediction",
    "DPMSolverMultistepScheduler": "algorithm_type dpmsolver++, solver_order 1 or 2",
    "UniPCMultistepScheduler": "predict_x0, bh2 (bh1 with sigma_min), no solver_p",
    "PNDMScheduler": "skip_prk_steps=True, epsilon or v_prediction",
    "FlowMatchEulerDiscreteScheduler": "stochastic_sampling=False",
}


def supported_text() -> str:
    """The supported schedulers, for error messages."""
    return ", ".join(f"{n} ({c})" if c else n for n, c in SUPPORTED.items())


def samplers_for(prediction_type: str) -> tuple[str, ...]:
    """The sampler names a model of this prediction type can be served with: flow-matching
    models get ``flow_euler`` only; epsilon / v-prediction models every other one."""
    if prediction_type in _FLOW_TYPES:
        return ("flow_euler",)
    if prediction_type in ("epsilon", "v_prediction"):
        return tuple(n for n in SAMPLERS if n != "flow_euler")
    if prediction_type == "sample":
        return tuple(n for n in SAMPLERS if n != "flow_euler" and n not in _NOT_FOR_SAMPLE)
    raise ValueError(
        "prediction_type must be one of epsilon, v_prediction, sample, flow, "
        f"got {prediction_type!r}"
    )


def _prediction_type(config: Mapping[str, Any]) -> str:
    name = str(config.get("_class_name", ""))
    if name.startswith("FlowMatch") or config.get("prediction_type") in _FLOW_TYPES:
        return "flow"
    if "shift" in config and "beta_schedule" not in config:  # a FlowMatch config without its name
        return "flow"
    return str(config.get("prediction_type", "epsilon"))


def sampler_name(config: Mapping[str, Any]) -> str:
    """The served name of a pipeline's own scheduler (its ``scheduler_config.json``), or "" when
    it is none of ``SAMPLERS`` as they are defined here (it is then still served as it is, as
    the default)."""
    class_name = str(config.get("_class_name", ""))
    for name, (recipe_class, overrides) in _RECIPES.items():
        if recipe_class != class_name:
            continue
        defining = {k: v for k, v in overrides.items() if k in ("use_karras_sigmas",)}
        if all(bool(config.get(k, False)) == bool(v) for k, v in defining.items()):
            return name
    return ""


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A diffusers scheduler for sampler ``name``, built from the pipeline's own scheduler config
    (``pipe.scheduler.config`` or its ``scheduler_config.json``) with ``from_config``."""
    if name not in _RECIPES:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    prediction_type = _prediction_type(base_config)
    allowed = samplers_for(prediction_type)
    if name not in allowed:
        raise ValueError(
            f"sampler {name!r} does not fit a {prediction_type} model; choose one of "
            f"{', '.join(allowed)}"
        )
    import diffusers

    class_name, overrides = _RECIPES[name]
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    if class_name in ("DDIMScheduler", "DDPMScheduler"):
        # latent models never clip x0; DDIM/DDPM default to clipping when the key is absent
        overrides = {"clip_sample": config.get("clip_sample", False), **overrides}
    scheduler = getattr(diffusers, class_name).from_config({**config, **overrides})
    check_supported(scheduler)
    return scheduler


def check_supported(scheduler_or_config) -> None:
    """Raise ``ValueError`` naming the scheduler and what is supported, unless DRiffusion can run
    it. Takes a scheduler class name, a scheduler config (a mapping with ``_class_name``, as in
    ``scheduler_config.json``) or a scheduler."""
    if isinstance(scheduler_or_config, str):
        name, config = scheduler_or_config, {}
    elif isinstance(scheduler_or_config, Mapping):
        if "_class_name" not in scheduler_or_config:
            raise ValueError("scheduler config has no _class_name: cannot tell which scheduler")
        name, config = str(scheduler_or_config["_class_name"]), scheduler_or_config
    elif hasattr(scheduler_or_config, "config"):
        name, config = type(scheduler_or_config).__name__, scheduler_or_config.config
    else:
        raise ValueError(
            "expected a scheduler class name, a scheduler config or a scheduler, "
            f"got {type(scheduler_or_config).__name__}"
        )
    if name not in SUPPORTED:
        raise ValueError(f"unsupported scheduler {name}; supported: {supported_text()}")
    problem = _config_problem(name, config)
    if problem is not None:
        setting, why = problem
        raise ValueError(
            f"unsupported scheduler {name}({setting}): {why}; supported: {supported_text()}"
        )


def _config_problem(name: str, c: Mapping[str, Any]) -> tuple[str, str] | None:
    """(setting, reason) for a configuration of a supported class that cannot be run."""

    def get(key, default=None):
        return c.get(key, default)

    prediction = get("prediction_type", "epsilon")
    if name == "DDPMScheduler" and get("variance_type", "fixed_small") not in (
        "fixed_small",
        "fixed_small_log",
        "fixed_large",
    ):
        return f"variance_type={get('variance_type')!r}", "learned variances need extra channels"
    if name in ("EulerAncestralDiscreteScheduler", "PNDMScheduler") and prediction not in (
        "epsilon",
        "v_prediction",
    ):
        return f"prediction_type={prediction!r}", "diffusers' step() takes epsilon or v_prediction"
    if name == "PNDMScheduler" and not get("skip_prk_steps", False):
        return "skip_prk_steps=False", "the Runge-Kutta warm-up (PRK) is not supported, PLMS is"
    if name == "FlowMatchEulerDiscreteScheduler" and get("stochastic_sampling", False):
        return "stochastic_sampling=True", "only the deterministic flow Euler sampler is supported"
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        if get("use_flow_sigmas", False) or prediction in _FLOW_TYPES:
            return "use_flow_sigmas=True", "flow-matching sigmas are supported by FlowMatchEuler"
    if name == "DPMSolverMultistepScheduler":
        if get("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "deis"):  # deis -> ++
            return f"algorithm_type={get('algorithm_type')!r}", "only dpmsolver++ is supported"
        if get("solver_order", 2) not in (1, 2):
            return f"solver_order={get('solver_order')}", "orders 1 and 2 (DPM++ 2M) are supported"
        if get("variance_type") is not None:
            return f"variance_type={get('variance_type')!r}", "learned variances are not supported"
    if name == "UniPCMultistepScheduler":
        if not get("predict_x0", True):
            return "predict_x0=False", "only the data-prediction form (predict_x0) is supported"
        if get("solver_p") is not None:
            return "solver_p=...", "an external predictor is not supported"
        if (
            not get("lower_order_final", True)
            and get("final_sigmas_type", "zero") == "zero"
            and get("solver_order", 2) > 1
        ):
            return "lower_order_final=False", "a higher-order step onto sigma=0 diverges"
        if get("solver_type", "bh2") == "bh1" and get("final_sigmas_type", "zero") == "zero":
            # B(h) = h is -inf on the last step: diffusers' own step() returns NaN there
            return "solver_type='bh1'", "bh1 needs final_sigmas_type='sigma_min'"
    return None
