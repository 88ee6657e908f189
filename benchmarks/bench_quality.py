"""Image quality of DRiffusion on the embedded digits model, by analogues of the paper's metrics.

    cd benchmarks && nice -n 5 ../.venv/bin/python bench_quality.py [--images 500] [--quick]

Every cell samples the same balanced prompts (digits 0-9, the canonical prompt) from the same
initial noise with DDIM, and is judged by the model's own digit classifier
(`embedded/digits/classifier`):

- *accuracy*: the classifier reads the prompted digit (the paper's CLIP score);
- *Frechet distance*: in the classifier's 64-d feature space, to the held-out real digits (FID);
- *PSNR*: against the sequential image of the same noise and prompt, per image, then averaged;
- *ideal speedup*: S / rounds (serial denoiser rounds).

Cells run in worker processes (``--workers``, one torch thread each) and each finished cell is
kept in ``--cache``, so an interrupted run resumes where it stopped. Writes the ``quality`` section
of BENCHMARKS.md and `docs/figures/digits_modes.png`. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from driffusion import count_rounds, parallelize, tapered
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `training` is a folder of the repository, not an installed package

from training.digits_classifier import (  # noqa: E402
    accuracy,
    features,
    frechet_distance,
    load_classifier,
)
from training.digits_data import PROMPT_TEMPLATES, load_digits_split  # noqa: E402
from training.eval_digits import sample_digits  # noqa: E402

FIGURE = ROOT / "docs" / "figures" / "digits_modes.png"
TEMPLATE = PROMPT_TEMPLATES[0]  # "a handwritten digit {w}": one fixed phrasing for every cell
FIXED_K = (2, 3, 4)
SCHEDULES = {  # aggressive k schedules beyond the paper, run at the schedule steps
    "tapered(5, 4)": tapered(5, 4),
    "tapered(5, 3, 0.7)": tapered(5, 3, 0.7),
    "tapered(4, 3)": tapered(4, 3),
    # the reverse taper: small blocks in the high-noise start, large ones after; found by a search
    # over tapers at 100 images (on this model the draft error comes from the first blocks)
    "tapered(3, 6, 0.2)": tapered(3, 6, 0.2),
}
SCHEDULE_STEPS = (50, 28, 20)  # the issue asks for 50 and 28; 20 shows where they break
GRID_SCHEDULE = "tapered(3, 6, 0.2)"  # the tapered row of the figure
OTHER_SEEDS = 10_000  # seed offset of the "sequential, other seeds" row (metric noise)
PSNR_CAP = 100.0  # dB, for an image identical to the sequential one


@dataclass(frozen=True)
class Cell:
    steps: int
    mode: str  # "sequential", "conservative" or "aggressive"
    label: str  # k as printed: "-", "4", "tapered(5, 4)"
    k: object = 1  # int or k schedule
    seed_offset: int = 0

    @property
    def rounds(self) -> int:
        return count_rounds(self.steps, self.mode, self.k)[0]


@dataclass
class Scored:
    cell: Cell
    accuracy: float
    frechet: float
    psnr: float | None  # None for the sequential reference itself
    seconds: float
    rounds: int


def plan_cells(steps_list: list[int], with_other_seeds: bool = True) -> list[Cell]:
    """Sequential first at every S (the PSNR reference), then the paper's grid, then schedules."""
    cells = []
    for s in steps_list:
        cells.append(Cell(s, "sequential", "-"))
        if with_other_seeds and s == steps_list[0]:
            cells.append(Cell(s, "sequential", "- (other seeds)", seed_offset=OTHER_SEEDS))
        for mode in ("conservative", "aggressive"):
            cells += [Cell(s, mode, str(k), k) for k in FIXED_K]
        if s in SCHEDULE_STEPS:
            cells += [Cell(s, "aggressive", name, ks) for name, ks in SCHEDULES.items()]
    return cells


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), images in [0, 1]; capped at PSNR_CAP."""
    mse = ((images.double() - reference.double()) ** 2).flatten(1).mean(1)
    per_image = (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).numpy()
    return float(per_image.mean())


# -- sampling, in worker processes ---------------------------------------------------------------
# One torch thread per process: on a shared 2-core machine, two OpenMP threads in one process stall
# at every barrier whenever another job holds a core (measured: 50x slower for small batches), while
# two single-threaded workers each keep a core busy.
_WORKER: dict = {}


def _init_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _WORKER.update(pipe=pipe, args=args, cells=plan_cells(args.steps))


def _cache_file(args: argparse.Namespace, cell: Cell) -> Path | None:
    """Where a finished cell is kept, so that an interrupted run resumes (None: no cache)."""
    if not args.cache:
        return None
    weights = Path(args.model) / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    key = (
        f"{weights.resolve()} {stat.st_size} {stat.st_mtime_ns} {args.images} {args.chunk} "
        f"{args.guidance} {args.seed} {TEMPLATE} {cell.steps} {cell.mode} {cell.label} "
        f"{cell.seed_offset}"
    )
    return Path(args.cache) / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt"


def _sample_cell(i: int) -> tuple[int, torch.Tensor, float]:
    """Cell i of the plan: (i, images (N, 3, H, W) in [0, 1], wall seconds)."""
    pipe, args, cell = _WORKER["pipe"], _WORKER["args"], _WORKER["cells"][i]
    if cell.mode == "sequential":
        if hasattr(pipe, "driffusion"):
            pipe.driffusion.restore()
            del pipe.driffusion
    else:
        parallelize(pipe, mode=cell.mode, k=cell.k)  # re-patches: one pipeline for every cell
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    labels = np.arange(args.images) % 10  # balanced digits, 0..9 repeating
    start, out = time.time(), []
    for j, lo in enumerate(range(0, args.images, args.chunk)):
        chunk = labels[lo : lo + args.chunk]
        seed = args.seed + cell.seed_offset + j  # chunk j has the same noise in every cell
        out.append(
            sample_digits(
                pipe, chunk, TEMPLATE, cell.steps, args.guidance, size, seed, batch=len(chunk)
            )
        )
        if cell.mode != "sequential" and pipe.driffusion.last_result.rounds != cell.rounds:
            raise RuntimeError(f"{_tag(i, cell)} ran {pipe.driffusion.last_result.rounds} rounds")
        print(f"{_tag(i, cell)} {lo + len(chunk)}/{args.images} images", flush=True)
    images, seconds = torch.cat(out), time.time() - start
    if (cache := _cache_file(args, cell)) is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "seconds": seconds}, cache)
    return i, images, seconds


def _tag(i: int, cell: Cell) -> str:
    return f"[cell {i + 1} S={cell.steps} {cell.mode} k={cell.label}]"


def run(args) -> tuple[list[Scored], dict, dict]:
    model = Path(args.model)
    classifier = load_classifier(model / "classifier")
    cells = plan_cells(args.steps)
    labels = np.arange(args.images) % 10
    results = {}
    for i, cell in enumerate(cells):
        if (cache := _cache_file(args, cell)) is not None and cache.exists():
            kept = torch.load(cache)
            results[i] = (kept["images"], kept["seconds"])
            print(f"{_tag(i, cell)} from the cache {cache}")
    todo = [i for i in range(len(cells)) if i not in results]
    total_work, done_work, start = sum(cells[i].steps for i in todo) * args.images, 0, time.time()
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(args.workers, len(todo) or 1), _init_worker, (args,)) as pool:
        for i, images, seconds in pool.imap_unordered(_sample_cell, todo) if todo else ():
            results[i] = (images, seconds)
            done_work += cells[i].steps * args.images
            elapsed = time.time() - start
            eta = elapsed / done_work * (total_work - done_work)
            print(
                f"{_tag(i, cells[i])} done in {seconds:.0f} s; {len(results)}/{len(cells)} cells, "
                f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
                flush=True,
            )
    size = results[0][0].shape[-1]
    real = load_digits_split(size)
    real_feats = features(classifier, torch.from_numpy(real.test_images))
    reference = {
        "held_out_accuracy": accuracy(
            classifier, torch.from_numpy(real.test_images), real.test_labels
        ),
        "train_vs_held_out_frechet": frechet_distance(
            features(classifier, torch.from_numpy(real.train_images)), real_feats
        ),
        "held_out": len(real.test_labels),
    }
    scored, sequential, grid = [], {}, {}
    for i, cell in enumerate(cells):  # planned order: each S's sequential cell comes first
        images, seconds = results[i]
        if cell.mode == "sequential" and cell.seed_offset == 0:
            sequential[cell.steps] = images
        same_noise = cell.seed_offset == 0 and cell.mode != "sequential"
        row = Scored(
            cell,
            accuracy(classifier, images, labels),
            frechet_distance(features(classifier, images), real_feats),
            psnr(images, sequential[cell.steps]) if same_noise else None,
            seconds,
            cell.rounds,
        )
        scored.append(row)
        if cell.steps == args.steps[0] and cell.seed_offset == 0:
            grid[(cell.mode, cell.label)] = images[:10]  # digits 0..9, chunk 0's noise
        print(
            f"{_tag(i, cell)} accuracy {row.accuracy:.3f}, FD {row.frechet:.2f}, PSNR "
            f"{'-' if row.psnr is None else f'{row.psnr:.1f}'} dB",
            flush=True,
        )
    return scored, reference, grid


# -- the figure ---------------------------------------------------------------------------------
def save_grid(grid: dict, steps: int, path: Path, cell_px: int = 64) -> None:
    """Rows: sequential, conservative k=4, aggressive k=4, aggressive tapered; columns: 0..9."""
    rows = [
        ("sequential", ("sequential", "-")),
        ("conservative k=4", ("conservative", "4")),
        ("aggressive k=4", ("aggressive", "4")),
        (f"aggr. {GRID_SCHEDULE}", ("aggressive", GRID_SCHEDULE)),
    ]
    rows = [(name, grid[key]) for name, key in rows if key in grid]
    label_w, head_h, pad = 150, 18, 2
    width = label_w + 10 * (cell_px + pad)
    height = head_h + len(rows) * (cell_px + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)  # PIL's default bitmap font: no font files needed
    draw.text((4, 4), f"DDIM, S={steps}", fill="black")
    for d in range(10):
        draw.text((label_w + d * (cell_px + pad) + cell_px // 2 - 3, 4), str(d), fill="black")
    for r, (name, images) in enumerate(rows):
        y = head_h + r * (cell_px + pad)
        draw.text((4, y + cell_px // 2 - 5), name, fill="black")
        arrays = (images.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        for d, array in enumerate(arrays):
            tile = Image.fromarray(array).resize((cell_px, cell_px), Image.NEAREST)
            canvas.paste(tile, (label_w + d * (cell_px + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")


# -- the section --------------------------------------------------------------------------------
def table(scored: list[Scored]) -> str:
    lines = [
        "| S | mode | k | rounds | ideal speedup | accuracy | Frechet distance | "
        "PSNR vs sequential (dB) | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in scored:
        c = r.cell
        p = "-" if r.psnr is None else f"{r.psnr:.1f}"
        lines.append(
            f"| {c.steps} | {c.mode} | {c.label} | {r.rounds} | {c.steps / r.rounds:.2f} | "
            f"{r.accuracy:.1%} | {r.frechet:.2f} | {p} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def _find(scored, steps, mode, label, seed_offset=0):
    for r in scored:
        c = r.cell
        if (c.steps, c.mode, c.label, c.seed_offset) == (steps, mode, label, seed_offset):
            return r
    return None


def _versus(row: Scored, seq: Scored) -> str:
    return (
        f"accuracy {100 * (row.accuracy - seq.accuracy):+.1f} points, Frechet distance "
        f"{row.frechet / seq.frechet - 1:+.1%}, PSNR {row.psnr:.1f} dB"
    )


def _targets_met(row: Scored, seq: Scored) -> bool:
    """The issue's targets: accuracy within 1 point and Frechet distance within 5% of sequential."""
    return seq.accuracy - row.accuracy <= 0.01 and row.frechet <= 1.05 * seq.frechet


def _dominates(a: Scored, b: Scored, acc_tol: float, fd_tol: float) -> bool:
    """No more rounds and no lower PSNR (one of them strictly better), and neither accuracy nor
    Frechet distance worse than b's by more than the seed-to-seed noise."""
    return (
        a.rounds <= b.rounds
        and a.psnr >= b.psnr
        and (a.rounds < b.rounds or a.psnr > b.psnr)
        and a.accuracy >= b.accuracy - acc_tol
        and a.frechet <= b.frechet * (1 + fd_tol)
    )


def reading(scored: list[Scored], steps_list: list[int]) -> str:
    """Targets, metric noise, dominance and where it breaks, all computed from the table."""
    out = []
    s0 = steps_list[0]
    seq, k4 = _find(scored, s0, "sequential", "-"), _find(scored, s0, "aggressive", "4")
    other = _find(scored, s0, "sequential", "- (other seeds)", OTHER_SEEDS)
    if seq and k4:
        out.append(
            f"**Targets** (S={s0}, aggressive k=4 against sequential: accuracy within 1 point, "
            f"Frechet distance within 5%): {_versus(k4, seq)}: "
            f"{'met' if _targets_met(k4, seq) else 'MISSED'}."
        )
    acc_tol = fd_tol = 0.0
    if seq and other:
        acc_tol = abs(other.accuracy - seq.accuracy)
        fd_tol = abs(other.frechet / seq.frechet - 1)
        paired = [r for r in scored if r.psnr is not None]
        ref = {r.cell.steps: r for r in scored if r.cell.label == "-"}
        fd_moves = max(abs(r.frechet / ref[r.cell.steps].frechet - 1) for r in paired)
        text = (
            f"**Metric noise**: the sequential sampler on other seeds moves accuracy "
            f"{100 * (other.accuracy - seq.accuracy):+.1f} points and the Frechet distance "
            f"{other.frechet / seq.frechet - 1:+.1%}, the scale of a difference between unrelated "
            f"sample sets; every other row shares its sequential row's noise, and no DRiffusion "
            f"row moves the Frechet distance by more than {fd_moves:.1%}. "
        )
        if len({r.accuracy for r in scored}) == 1:
            text += (
                f"Accuracy is {seq.accuracy:.1%} in every cell: at this guidance the classifier "
                "cannot tell the cells apart, and PSNR is the metric that separates them."
            )
        out.append(text)
    for s in steps_list:
        schedules = [r for r in scored if r.cell.steps == s and r.cell.label in SCHEDULES]
        fixed = [
            r
            for r in scored
            if r.cell.steps == s and r.cell.mode == "aggressive" and r.cell.label.isdigit()
        ]
        if not schedules:
            continue
        wins, losers = [], []
        for sch in schedules:
            beaten = [f for f in fixed if _dominates(sch, f, acc_tol, fd_tol)]
            wins += [
                f"`{sch.cell.label}` dominates fixed k={f.cell.label} ({sch.rounds} vs "
                f"{f.rounds} rounds, PSNR {sch.psnr:.1f} vs {f.psnr:.1f} dB, Frechet "
                f"{sch.frechet:.2f} vs {f.frechet:.2f})"
                for f in beaten
            ]
            if not beaten:
                losers.append(f"`{sch.cell.label}` ({sch.rounds} rounds, {sch.psnr:.1f} dB)")
        verdict = "; ".join(wins) if wins else "no schedule dominates a fixed k"
        if losers:
            verdict += f"; {', '.join(losers)} dominate no fixed k"
        out.append(f"**S={s}, aggressive schedules**: {verdict}.")
    late = _find(scored, s0, "aggressive", "tapered(4, 3)")  # k=4 with smaller late blocks
    five = [
        _find(scored, s0, "aggressive", name) for name in ("tapered(5, 4)", "tapered(5, 3, 0.7)")
    ]
    if k4 and late and all(five) and abs(late.psnr - k4.psnr) < 0.5:
        out.append(
            f"**Where the error comes from** (S={s0}): `tapered(4, 3)` differs from k=4 only in "
            f"the late, low-noise blocks and moves PSNR by {late.psnr - k4.psnr:+.1f} dB; "
            f"`tapered(5, 4)` and `tapered(5, 3, 0.7)` share their first blocks and differ by "
            f"{five[1].psnr - five[0].psnr:+.1f} dB. On this model the first, high-noise blocks "
            "set the draft error, unlike the exact Gaussian mixture of the core section, where "
            "it sits in the last blocks; hence the reverse taper: small blocks first, large after."
        )
    breaks = []
    for s in steps_list:
        ref = _find(scored, s, "sequential", "-")
        for label in ("4", GRID_SCHEDULE):
            row = _find(scored, s, "aggressive", label)
            if ref and row:
                met = "targets met" if _targets_met(row, ref) else "targets MISSED"
                name = f"k={label}" if label.isdigit() else f"`{label}`"
                breaks.append(f"S={s}, {name}: {row.rounds} rounds, {_versus(row, ref)} ({met})")
    if breaks:
        out.append(
            "**Fewer steps** (aggressive against the sequential sampler at the same S): "
            + "; ".join(breaks)
            + "."
        )
    ref = {r.cell.steps: r for r in scored if r.cell.label == "-"}
    missed = [
        f"S={r.cell.steps} {r.cell.mode} k={r.cell.label} ({_versus(r, ref[r.cell.steps])})"
        for r in scored
        if r.psnr is not None and not _targets_met(r, ref[r.cell.steps])
    ]
    out.append(
        "**Rows that miss the targets** against their own S: "
        + ("; ".join(missed) if missed else "none")
        + "."
    )
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "embedded" / "digits"))
    parser.add_argument("--images", type=int, default=500, help="images per cell")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 28, 20])
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--chunk", type=int, default=250, help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="sampling processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "driffusion-bench-quality"),
        help="folder of finished cells, so that an interrupted run resumes ('' for none)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 images, S=50 only")
    args = parser.parse_args()
    if args.quick:
        args.images, args.steps = 100, [50]
    torch.set_num_threads(args.threads)
    scored, ref, grid = run(args)
    save_grid(grid, args.steps[0], FIGURE)
    body = f"""## Image quality on the digits model (`benchmarks/bench_quality.py`)

The embedded digits model (`{Path(args.model).name}`: latent diffusion, v-prediction, DDIM eta=0),
guidance {args.guidance}, prompt "{TEMPLATE}" for digits 0-9 in turn, {args.images}
images per cell, the same initial noise in every cell (the "other seeds" row excepted).
Metrics, analogues of the paper's: *accuracy*, the digits classifier reads the prompted digit
(CLIP score); *Frechet distance* in that classifier's 64-d features to the {ref["held_out"]}
held-out real digits (FID); *PSNR* against the sequential image of the same noise, mean over
images; *ideal speedup* S / rounds. References: the classifier reads
{ref["held_out_accuracy"]:.1%} of the held-out real digits; the real training split is at
Frechet distance {ref["train_vs_held_out_frechet"]:.2f} from them. *wall s*: seconds per cell on
this shared 2-core CPU ({args.workers} cells at a time, one process and {args.threads} torch
thread each), each round's drafts as one batch; on a CPU a batch of k states costs about k
times one state, so wall time is the cost of this benchmark, not the latency claim.

{table(scored)}

{reading(scored, args.steps)}

![digits 0-9, same noise per column; rows as labelled](docs/figures/digits_modes.png)

Sampling cost: the cells' wall times add up to {sum(r.seconds for r in scored) / 60:.0f} min,
{args.workers} cells at a time.
"""
    write_section("quality", body)


if __name__ == "__main__":
    main()
