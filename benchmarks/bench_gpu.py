"""One GPU, SD2.1 768 px end to end: sequential against DRiffusion with the drafts batched.

    .venv/bin/python benchmarks/bench_gpu.py [--steps 50] [--k 2 3 4] [--repeats 3] [--write]
    .venv/bin/python benchmarks/bench_gpu.py --tiny --device cpu --steps 8 --k 2  # smoke run

A ``StableDiffusionPipeline`` with SD2.1-768's architecture and scheduler, random weights (fp16 on
cuda, fp32 on cpu), built from the configs below: nothing is downloaded. Each configuration is the
pipeline's own ``__call__`` (text encoder, 50 DDIM v-prediction steps with CFG 7.5, VAE decode):
first as it is, then through ``driffusion.parallelize(pipe, devices=None, mode, k)``, which on one
device evaluates each round's drafts as one batch. Reported: the median latency of ``--repeats``
runs after a warm-up, rounds and the ideal speedup S / rounds, the measured speedup, the peak
device memory and what DRiffusion adds to it, and the PSNR of the DRiffusion image against the
sequential one from the same seed. ``--cuda-graphs`` replays the UNet from CUDA graphs, one per
input shape, which removes the launch overhead (docs/facts.md predicts about 1.4x at k=4 then; eager
runs are launch-bound at CFG batch 2 and gain more). ``--write`` puts the table into the ``gpu``
section of BENCHMARKS.md (``gpu-graphs`` with ``--cuda-graphs``). Not a test.

On the lent GPU machine (torch, numpy; no diffusers, transformers, nor an installed driffusion):

1. here, once: ``bash benchmarks/gpu/fetch_wheels.sh`` downloads the wheels of diffusers,
   transformers and all they depend on but numpy, for CPython 3.12 on x86-64, into
   ``benchmarks/gpu/wheels/`` (git-ignored, 43 MB);
2. with the device tool: command ``bash benchmarks/gpu/run_on_device.sh --write``, carry
   ``["benchmarks/gpu/wheels"]``, timeout 600 s (about 3 minutes are expected). It installs what
   is missing from the wheels, offline; puts this checkout's ``driffusion`` on the path; runs
   eager, then ``--cuda-graphs``; writes ``$OUT/bench_gpu.md``, ``$OUT/bench_gpu_graphs.md`` and
   the device's copy of BENCHMARKS.md, whose ``gpu`` and ``gpu-graphs`` sections (with their
   command line) go into BENCHMARKS.md here.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from driffusion import count_rounds, parallelize
from driffusion.export.tiny import tiny_clip_vocab
from driffusion.families import get_family
from report import write_section

PROMPT = "a photo of an astronaut riding a horse"
GUIDANCE = 7.5


@dataclass(frozen=True)
class Sizes:
    """Model widths. ``FULL`` is stabilityai/stable-diffusion-2-1 (768 px); ``TINY`` a stand-in
    with the same structure that runs in seconds on a CPU."""

    unet_channels: tuple[int, ...]  # block_out_channels: one level each, the last without attention
    unet_heads: tuple[int, ...]  # diffusers' attention_head_dim, which is heads per level
    unet_layers: int  # resnets per level
    unet_groups: int  # GroupNorm groups (UNet)
    text_hidden: int  # CLIP width, also the UNet's cross_attention_dim
    text_layers: int  # SD2.1 keeps 23 of OpenCLIP ViT-H's 24 text layers
    text_heads: int
    text_intermediate: int  # MLP width
    text_vocab: int | None  # None: the offline tokenizer's own vocab size
    vae_channels: tuple[int, ...]  # 4 levels: VAE scale factor 8
    vae_layers: int  # resnets per level (VAE)
    vae_groups: int  # GroupNorm groups (VAE)
    image_size: int  # default height and width, px


FULL = Sizes(
    unet_channels=(320, 640, 1280, 1280),
    unet_heads=(5, 10, 20, 20),
    unet_layers=2,
    unet_groups=32,
    text_hidden=1024,
    text_layers=23,
    text_heads=16,
    text_intermediate=4096,
    text_vocab=49408,
    vae_channels=(128, 256, 512, 512),
    vae_layers=2,
    vae_groups=32,
    image_size=768,
)
TINY = Sizes(  # as export/tiny.py's "sd21"
    unet_channels=(16, 32),
    unet_heads=(2, 4),
    unet_layers=1,
    unet_groups=8,
    text_hidden=32,
    text_layers=3,
    text_heads=4,
    text_intermediate=64,
    text_vocab=None,
    vae_channels=(16, 16, 32, 32),
    vae_layers=1,
    vae_groups=8,
    image_size=64,
)


def build_pipeline(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD2.1's ``StableDiffusionPipeline`` with random weights, initialised on ``device``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = tiny_clip_vocab()  # an offline CLIP BPE: any prompt encodes
    levels = len(sizes.unet_channels)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 1.3e9 params
        unet = UNet2DConditionModel(
            sample_size=sizes.image_size // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            block_out_channels=sizes.unet_channels,
            layers_per_block=sizes.unet_layers,
            norm_num_groups=sizes.unet_groups,
            cross_attention_dim=sizes.text_hidden,
            attention_head_dim=sizes.unet_heads,
            use_linear_projection=True,  # SD2.x
            upcast_attention=True,  # SD2.1-768
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=sizes.text_vocab or len(vocab),
                hidden_size=sizes.text_hidden,
                intermediate_size=sizes.text_intermediate,
                num_hidden_layers=sizes.text_layers,
                num_attention_heads=sizes.text_heads,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=512,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=0,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=sizes.vae_channels,
            layers_per_block=sizes.vae_layers,
            norm_num_groups=sizes.vae_groups,
            latent_channels=4,
            sample_size=sizes.image_size,
            scaling_factor=0.18215,
        )
    # SD2.1's scheduler_config.json: DDIM, v-prediction, scaled_linear 0.00085..0.012, "leading"
    scheduler = DDIMScheduler(
        **{**get_family("sd21").scheduler_config, "timestep_spacing": "leading"}
    )
    # OpenCLIP (SD2.x's text encoder) pads with "!"
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


class GraphedForward:
    """Stands in for ``unet.forward``: one CUDA graph per input shape, captured on first use.

    Only (sample, timestep, encoder_hidden_states) vary, as in SD2.1; the graphs share one memory
    pool and are replayed one at a time on the current stream.
    """

    def __init__(self, unet: torch.nn.Module):
        self.eager = unet.forward
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False, **rest):
        if any(v is not None for v in rest.values()) or return_dict:
            raise ValueError(f"--cuda-graphs: unsupported UNet arguments {sorted(rest)}")
        inputs = (sample, torch.as_tensor(timestep, device=sample.device), encoder_hidden_states)
        key = tuple((x.shape, x.dtype) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture([x.clone() for x in inputs])
        graph, static, out = self.graphs[key]
        for buffer, x in zip(static, inputs, strict=True):
            buffer.copy_(x)
        graph.replay()
        return (out.clone(),)  # the next replay overwrites ``out``

    def _capture(self, static: list[torch.Tensor]):
        def run():
            return self.eager(*static[:2], encoder_hidden_states=static[2], return_dict=False)[0]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: kernel choice, workspaces
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph, static, out


# Eager: the tensors alive at the peak. Graph replays allocate nothing: their intermediates sit in
# the graphs' private pool, which only the allocator's reserved memory shows (emptied between
# configurations, so that each one holds only its own graphs).
PEAK = {False: torch.cuda.max_memory_allocated, True: torch.cuda.max_memory_reserved}


@dataclass
class Measured:
    """One configuration: its image (seeded), latencies and device memory."""

    image: np.ndarray  # (1, H, W, 3) in [0, 1]
    ms: list[float]
    peak_mib: float | None  # device memory peak over the timed runs (None off cuda), see PEAK
    rounds: int  # serial denoiser rounds

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)


def measure(pipe, unet, args, device: torch.device, graphed: bool) -> Measured:
    """Warm-up, then ``args.repeats`` timed runs of the pipeline as it is now patched.

    ``unet``: the real UNet (under ``parallelize``, ``pipe.unet`` is the drafting stand-in).
    """
    cuda = device.type == "cuda"
    if graphed:  # fresh graphs per configuration, so each pays for its own graph pool
        torch.cuda.empty_cache()
        unet.forward = GraphedForward(unet)

    def once() -> tuple[np.ndarray, float]:
        generator = torch.Generator().manual_seed(args.seed)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        image = pipe(
            PROMPT,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=generator,
            output_type="np",
        ).images
        if cuda:
            torch.cuda.synchronize(device)
        return image, (time.perf_counter() - start) * 1e3

    try:
        once()  # warm-up: cuDNN/cuBLAS kernel choice, allocator growth, graph capture
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        runs = [once() for _ in range(args.repeats)]
        peak = PEAK[graphed](device) / 2**20 if cuda else None
    finally:
        if graphed:
            del unet.forward  # back to the class's forward; the graphs are freed
            if cuda:
                torch.cuda.empty_cache()
    drafting = pipe.unet is not unet  # parallelized: the stand-in is in the pipeline
    rounds = pipe.driffusion.last_result.rounds if drafting else args.steps
    return Measured(runs[-1][0], [ms for _, ms in runs], peak, rounds)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1] (inf when equal, nan when either has NaNs)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def row(k: str, mode: str, steps: int, m: Measured, base: Measured, quality: str) -> str:
    ideal = steps / m.rounds
    speedup = base.median_ms / m.median_ms
    if m.peak_mib is None:
        peak = added = "n/a"
    else:
        peak, added = f"{m.peak_mib:.0f}", f"{m.peak_mib - base.peak_mib:+.0f}"
    return (
        f"| {k} | {mode} | {m.rounds} | {ideal:.2f} | {m.median_ms:.1f} | {speedup:.2f} | "
        f"{speedup / ideal:.0%} | {peak} | {added} | {quality} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny stand-in model (smoke run)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps S")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="draft block sizes")
    parser.add_argument("--mode", choices=("aggressive", "conservative"), default="aggressive")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    parser.add_argument("--height", type=int, help="px; default 768 (64 with --tiny)")
    parser.add_argument("--width", type=int, help="px; default 768 (64 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="initial noise seed")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the UNet from graphs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="write the gpu section")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1 or min(args.k) < 1:
        parser.error("--repeats, --steps and every --k must be >= 1")
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs a cuda device")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else FULL
    args.height = args.height or sizes.image_size
    args.width = args.width or sizes.image_size
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    import diffusers
    import transformers

    pipe = build_pipeline(sizes, device, dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        resident = f"; weights resident {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB"
    else:
        name, resident = "CPU", ""
    header = (
        f"Device: {name} ({device.type}, {str(dtype).removeprefix('torch.')}); torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}."
    )
    print(header, file=sys.stderr, flush=True)

    failed = False
    unet = pipe.unet
    base = measure(pipe, unet, args, device, args.cuda_graphs)
    print(f"sequential: {base.median_ms:.1f} ms", file=sys.stderr, flush=True)
    rows = [
        "| k | mode | rounds | ideal speedup | median ms | speedup | of ideal | peak device MiB "
        "| added MiB | PSNR vs seq dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("-", "sequential", args.steps, base, base, "-"),
    ]
    for k in args.k:
        parallelize(pipe, devices=None, mode=args.mode, k=k)
        try:
            m = measure(pipe, unet, args, device, args.cuda_graphs)
        except Exception as error:  # a failed k (NaNs in fp16, a capture error) keeps the others
            traceback.print_exc()
            rows.append(f"| {k} | {args.mode} | failed: {type(error).__name__}: {error} |")
            failed = True
            continue
        finally:
            pipe.driffusion.restore()
        print(f"k={k}: {m.median_ms:.1f} ms", file=sys.stderr, flush=True)
        expected, _ = count_rounds(args.steps, args.mode, k)
        if m.rounds != expected:
            print(f"k={k}: {m.rounds} rounds, count_rounds says {expected}", file=sys.stderr)
            failed = True
        rows.append(row(str(k), args.mode, args.steps, m, base, f"{psnr(m.image, base.image):.1f}"))
    table = "\n".join(rows)
    runs = "UNet replayed from CUDA graphs" if args.cuda_graphs else "Eager"
    model = "tiny stand-in" if args.tiny else "SD2.1"
    size = f"{args.height}x{args.width} px"
    title = f"## One GPU, {model} {size}: sequential vs DRiffusion (`benchmarks/bench_gpu.py`)"
    memory = (
        f"`torch.cuda.{PEAK[args.cuda_graphs].__name__}` over the timed runs; *added MiB*: that "
        "minus the sequential run's"
        if device.type == "cuda"
        else "measured on cuda only"
    )
    body = f"""{title}

{header}
{runs}, random weights{resident}. Each run is the pipeline's own call (text encoder,
{args.steps} DDIM v-prediction steps with CFG {GUIDANCE}, VAE decode); median of {args.repeats}
after a warm-up. DRiffusion: `parallelize(pipe, devices=None, mode="{args.mode}", k=k)`, each
round's drafts as ONE batch on the one device. *ideal speedup* = S / rounds; *of ideal* = speedup
/ ideal speedup; *peak device MiB*: {memory}. With one denoiser instance and no replica, the
added memory is what batching k drafts costs
(their activations; the engine's own states are k latents, well under 1 MiB); the paper's +186
to 226 MB per instance is for one draft per GPU. *PSNR vs seq dB*: the DRiffusion image against
the sequential one from the same seed.

{table}
"""
    print(body)
    if args.write:
        try:
            write_section("gpu-graphs" if args.cuda_graphs else "gpu", body)
        except OSError as error:  # e.g. no git on a lent machine: the table above is the result
            print(f"BENCHMARKS.md not written: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
