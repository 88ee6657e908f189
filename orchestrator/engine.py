"""The draft-and-refine engine (docs/algorithm.md, "One block").

The engine is a generator: it yields a :class:`Round` (the states to evaluate, already scaled the
way the model sees them, with their timesteps) and is sent back the model outputs for that round.
One driver, :func:`sample`, calls a ``denoise`` function synchronously; the Triton orchestrator
drives the very same generator with concurrent (async) requests. All draft-and-refine logic lives
here, once.

Notation: ``a`` anchor index, ``kb`` block size, ``E_a`` anchor output, ``xd_j`` draft at step j,
``ed_j`` the model output at ``xd_j``, S the number of steps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from .jumps import advance, jump_noise, observe
from .schedule import Schedule

MODES = ("sequential", "aggressive", "conservative")

# k: a fixed block size, a list (block b uses k[b]; the last entry repeats), or a callable
# (anchor index, number of steps) -> block size.
KSpec = int | Sequence[int] | Callable[[int, int], int]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[int], torch.Tensor]
PostStep = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Round:
    """One round: every state evaluated at the same time, as one batch."""

    x: torch.Tensor  # (m*B, ...) model inputs: m states of batch B, scaled as the model sees them
    t: torch.Tensor  # (m*B,) the timestep of each row
    steps: tuple[int, ...]  # (m,) the step index of each state
    index: int  # 0-based round number


@dataclass
class SampleResult:
    """What :func:`sample` returns."""

    sample: torch.Tensor  # final state x_S, in the scheduler's state space
    rounds: int  # serial denoiser rounds: latency is proportional to this
    evaluations: int  # states evaluated in all (about S in every mode)
    round_sizes: list[int] = field(default_factory=list)  # states per round


@dataclass(frozen=True)
class Block:
    """One planned block: anchor ``a``, drafts ``a+1 .. last_draft``, refinement up to ``end``."""

    anchor: int
    size: int  # kb
    exact_anchor: bool  # the anchor output is evaluated at the refined state (its own round)
    last_draft: int  # a+1 .. last_draft are drafted (empty when last_draft == anchor)
    end: int  # refinement walks a -> end; the next anchor is ``end``


def validate(mode: str, k: KSpec) -> None:
    """Raise ``ValueError`` naming the problem for a bad mode or k."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(k, bool) or not (isinstance(k, int) or callable(k) or isinstance(k, Sequence)):
        raise ValueError(f"k must be an int >= 1, a list of ints or a callable, got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(k, Sequence) and not callable(k):
        if len(k) == 0:
            raise ValueError("k schedule is an empty list: give at least one block size >= 1")
        for b, kb in enumerate(k):
            _check_block_size(kb, f"k[{b}]")


def _check_block_size(kb, what: str) -> int:
    if isinstance(kb, bool) or not isinstance(kb, int) or kb < 1:
        raise ValueError(f"{what} must be an int >= 1, got {kb!r}")
    return kb


def tapered(k_early: int, k_late: int, switch: float = 0.6) -> Callable[[int, int], int]:
    """A k schedule: blocks anchored before ``switch * S`` use ``k_early``, later ones ``k_late``.

    Where the draft error sits depends on the model, so measure before choosing (BENCHMARKS.md):
    on the exact Gaussian mixture it is in the last, low-noise blocks, and ``tapered(5, 4)``
    matches fixed k=4 in 12 rounds instead of 14; on the trained digits model it is in the
    early, high-noise blocks, and ``tapered(3, 6, switch=0.2)`` beats fixed k=4 (12 rounds instead
    of 14 at S=50, PSNR against sequential 58.0 instead of 55.1 dB).
    """
    _check_block_size(k_early, "k_early")
    _check_block_size(k_late, "k_late")
    if not 0.0 <= switch <= 1.0:
        raise ValueError(f"switch must be in [0, 1], got {switch}")

    def k(anchor: int, num_steps: int) -> int:
        return k_early if anchor < switch * num_steps else k_late

    k.__name__ = f"tapered({k_early}, {k_late}, switch={switch})"
    return k


def _block_size(k: KSpec, block: int, anchor: int, num_steps: int) -> int:
    if isinstance(k, int):
        return k
    if callable(k):
        return _check_block_size(k(anchor, num_steps), f"k schedule at anchor {anchor}")
    return k[min(block, len(k) - 1)]


def plan(num_steps: int, mode: str, k: KSpec = 1) -> list[Block]:
    """The blocks of a run of ``num_steps`` steps; rounds and evaluations follow from it."""
    validate(mode, k)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {num_steps!r}")
    blocks, a, b = [], 0, 0
    while a < num_steps:
        if mode == "sequential":
            kb, exact, refine = 1, True, 1
        else:
            kb = _block_size(k, b, a, num_steps)
            exact = mode == "conservative" or a == 0
            refine = kb + 1 if mode == "conservative" else kb
        last = min(a + kb, num_steps - 1) if mode != "sequential" else a
        end = min(a + refine, num_steps)
        blocks.append(Block(a, kb, exact, max(last, a), end))
        a, b = end, b + 1
    return blocks


def round_sizes(num_steps: int, mode: str, k: KSpec = 1) -> list[int]:
    """States evaluated in each serial denoiser round of a run, without running it: a block's
    exact anchor is a round of one, its drafts a round of ``last_draft - anchor``."""
    sizes = []
    for blk in plan(num_steps, mode, k):
        if blk.exact_anchor:
            sizes.append(1)
        if blk.last_draft > blk.anchor:
            sizes.append(blk.last_draft - blk.anchor)
    return sizes


def count_rounds(num_steps: int, mode: str, k: KSpec = 1) -> tuple[int, int]:
    """(rounds, evaluations) of a run, without running it."""
    sizes = round_sizes(num_steps, mode, k)
    return len(sizes), sum(sizes)


def draft_and_refine(
    x: torch.Tensor,
    schedule: Schedule,
    mode: str = "aggressive",
    k: KSpec = 4,
    noise: Noise | None = None,
    *,
    post_step: PostStep | None = None,
    on_refined: Callable[[int, torch.Tensor], None] | None = None,
) -> Generator[Round, torch.Tensor, SampleResult]:
    """Run DRiffusion as a generator of rounds; returns the :class:`SampleResult`.

    ``noise(i)`` gives the noise z_i of sequential step i (stochastic samplers only). A draft
    ``J(a -> j)`` uses z_{j-1} (Euler ancestral: z_a .. z_{j-1}; see ``jumps.jump_noise``), so
    the first draft equals the refined ``Step(a)`` bit for bit.
    Multistep samplers carry a :class:`~driffusion.multistep.History` from step to step: a block's
    drafts jump with the anchor's output and the refined history before the anchor, and the
    refinement replays the sampler's own steps with the drafts' outputs.

    ``post_step(x, i)``, when given, edits every state that lands on step i (0 < i < S), drafts
    included, before it is evaluated or stepped from: what an inpainting pipeline's loop does to
    the latents after each ``scheduler.step``. ``on_refined(i, x_i)`` is called with every state
    of the refined trajectory, i = 1 .. S in order (what a step-by-step loop would hold after
    each step: progress callbacks).
    """
    blocks = plan(schedule.num_steps, mode, k)
    if schedule.stochastic and noise is None:
        raise ValueError(f"{schedule.kind} with this configuration is stochastic: pass noise")
    z = noise if schedule.stochastic else (lambda i: None)
    rounds: list[int] = []

    def evaluate(states: torch.Tensor, steps: list[int]):
        """Yield one round for ``states`` (m, B, ...); returns the m model outputs."""
        batch = states.shape[1]
        xs = states.flatten(0, 1)  # (m*B, ...)
        if schedule.input_scales is not None:
            scales = torch.tensor([schedule.input_scales[j] for j in steps], dtype=xs.dtype)
            xs = xs * scales.repeat_interleave(batch).view(-1, *[1] * (xs.ndim - 1)).to(xs.device)
        t = schedule.timesteps[list(steps)].repeat_interleave(batch).to(xs.device)
        out = yield Round(xs, t, tuple(steps), len(rounds))
        rounds.append(len(steps))
        _check_output(out, xs, len(rounds) - 1, steps)
        return out.view(states.shape)

    def landed(state: torch.Tensor, i: int) -> torch.Tensor:
        return post_step(state, i) if post_step is not None and i < schedule.num_steps else state

    state, anchor_out, history = x, None, None
    for n, blk in enumerate(blocks):
        a = blk.anchor
        if blk.exact_anchor:
            (anchor_out,) = yield from evaluate(state[None], [a])
        # 1. draft xd_j = J(x_a, E_a; a -> j) for j = a+1 .. last_draft, straight into the round
        #    (multistep samplers: with the refined history before the anchor)
        at_anchor = observe(schedule, history, state, anchor_out, a)
        targets = list(range(a + 1, blk.last_draft + 1))
        drafts = state.new_empty((len(targets), *state.shape))  # (m, B, ...)
        for n_j, j in enumerate(targets):
            advance(schedule, at_anchor, a, j, jump_noise(schedule, z, a, j), out=drafts[n_j])
            if post_step is not None:
                drafts[n_j] = landed(drafts[n_j], j)
        # 2. evaluate every draft in ONE round
        outs = (yield from evaluate(drafts, targets)) if targets else []
        # 3. refine along the original trajectory: x_{a+1} = Step(x_a, E_a) == xd_{a+1}, then
        #    x_{m+1} = Step(x_m, ed_m), the history taking in each draft output in turn
        history = at_anchor
        state = drafts[0] if targets else landed(advance(schedule, history, a, a + 1, z(a)), a + 1)
        if on_refined is not None:
            on_refined(a + 1, state)
        for m in range(a + 1, blk.end):
            history = observe(schedule, history, state, outs[m - a - 1], m)
            state = landed(advance(schedule, history, m, m + 1, z(m)), m + 1)
            if on_refined is not None:
                on_refined(m + 1, state)
        # aggressive: noise caching, E_{a'} = ed_{a'} computed at the draft xd_{a'}
        if n + 1 < len(blocks) and not blocks[n + 1].exact_anchor:
            anchor_out = outs[blk.end - a - 1]
    return SampleResult(state, len(rounds), sum(rounds), rounds)


def _check_output(out, x: torch.Tensor, index: int, steps: list[int]) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"denoiser must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(
            f"denoiser returned shape {tuple(out.shape)} for input shape {tuple(x.shape)} "
            f"in round {index} (steps {steps}): it must return one output per input row"
        )
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():  # one cheap pass first
        raise ValueError(f"denoiser returned NaN or inf in round {index} (steps {steps})")


class StepNoise:
    """z_i for each sequential step i, drawn lazily IN STEP ORDER from one generator, so every mode
    and k sees the same noise and the sequential mode matches a diffusers ``step`` loop that draws
    ``randn(shape, generator)`` once a step. With a list of generators, row b of the batch is
    drawn from generator b (a batch of images each as its own one-image run)."""

    def __init__(
        self,
        like: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ):
        self._like, self._generator, self._drawn = like, generator, []
        if isinstance(generator, Sequence) and len(generator) != like.shape[0]:
            raise ValueError(
                f"{len(generator)} generators for a batch of {like.shape[0]}: one per row"
            )

    def __call__(self, i: int) -> torch.Tensor:
        while len(self._drawn) <= i:
            if isinstance(self._generator, Sequence):
                z = torch.cat([self._draw(self._like[:1].shape, g) for g in self._generator])
            else:
                z = self._draw(self._like.shape, self._generator)
            self._drawn.append(z.to(self._like.device))
        return self._drawn[i]

    def _draw(self, shape, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else self._like.device
        return torch.randn(shape, generator=generator, device=device, dtype=self._like.dtype)


def sample(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    mode: str = "aggressive",
    k: KSpec = 4,
    generator: torch.Generator | None = None,
    *,
    noise: Noise | None = None,
) -> SampleResult:
    """Sample with DRiffusion. ``denoise(x (B, ...), t (B,)) -> (B, ...)`` returns the raw model
    output in the scheduler's prediction type; each round calls it once with all of that round's
    states. ``x`` is the initial noise already scaled by ``init_noise_sigma``.
    ``generator`` feeds the noise of stochastic samplers (or pass ``noise(i) -> z_i`` yourself)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("x must be a floating-point torch.Tensor of shape (B, ...)")
    if noise is None and schedule.stochastic:
        noise = StepNoise(x, generator)
    return drive(draft_and_refine(x, schedule, mode, k, noise), lambda r: denoise(r.x, r.t))


Rounds = Generator[Round, torch.Tensor, SampleResult]


def drive(rounds: Rounds, evaluate: Callable[[Round], torch.Tensor]) -> SampleResult:
    """Run an engine generator to the end, each round evaluated by ``evaluate(round)``."""
    try:
        r = next(rounds)
        while True:
            r = rounds.send(evaluate(r))
    except StopIteration as done:
        return done.value


async def drive_async(
    rounds: Rounds, evaluate: Callable[[Round], Awaitable[torch.Tensor]]
) -> SampleResult:
    """:func:`drive` for an async ``evaluate`` (the served orchestrator's concurrent calls)."""
    try:
        r = next(rounds)
        while True:
            r = rounds.send(await evaluate(r))
    except StopIteration as done:
        return done.value
