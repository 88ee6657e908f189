"""The request API beyond one text-to-image image, through a real server and its real clients:
``num_images``, the ``scheduler`` choice, img2img (``image``, ``strength``) and the streamed
``driffusion_stream`` model. The served pipeline is the tiny SD2.1-like one with PNDM as its own
scheduler, as SD1.5 and SD2.1-base ship, so the PLMS sampler goes through the whole served path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from driffusion import count_rounds
from driffusion.client import DriffusionClient, DriffusionError
from driffusion.export.tiny import build_tiny_pipeline, load_tiny_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.samplers import samplers_for

STEPS = 8
PROMPT = "a red cube"


@pytest.fixture(scope="module")
def pndm_pipeline(tmp_path_factory):
    """The tiny SD2.1 pipeline with SD1.5's scheduler: PNDM (PLMS, skip_prk_steps)."""
    from diffusers import PNDMScheduler

    folder = build_tiny_pipeline("sd21", tmp_path_factory.mktemp("pndm") / "sd-pndm")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True)  # keeps betas, v, offset
    (folder / "scheduler" / "scheduler_config.json").unlink()
    scheduler.save_config(folder / "scheduler")
    model_index = json.loads((folder / "model_index.json").read_text())
    model_index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(model_index))
    return folder


@pytest.fixture(scope="module")
def repository(pndm_pipeline, tmp_path_factory):
    settings = RepositorySettings(denoiser_instances=2, orchestrator_instances=1, max_images=3)
    out = tmp_path_factory.mktemp("request-api") / "repo"
    return build_repository(pndm_pipeline, out, settings, progress=None)


@pytest.fixture(scope="module")
def server(repository, start_triton_server):
    return start_triton_server(repository)


@pytest.fixture(scope="module")
def client(server):
    with DriffusionClient(server.grpc_url) as c:
        c.wait_ready(timeout_s=60)
        yield c


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Within one uint8 level: ONNX Runtime vs torch, or batched kernels vs one-row ones."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b).max()) <= 1


def pipeline_image(pipeline, seed: int, **kwargs) -> np.ndarray:
    image = pipeline(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images[0]
    return (image * 255).round().astype(np.uint8)


# --- the pipeline's own sampler: PNDM --------------------------------------------------------


def test_a_pndm_pipeline_is_served_as_diffusers_samples_it(client, pndm_pipeline):
    pipe = load_tiny_pipeline(pndm_pipeline)
    pipe.set_progress_bar_config(disable=True)
    reference = pipeline_image(pipe, seed=7)
    out = client.generate(PROMPT, steps=STEPS, seed=7, guidance_scale=4.0, mode="sequential")
    assert close(out.image, reference)
    assert out.rounds == count_rounds(STEPS + 1, "sequential")[0]  # PLMS: S + 1 model calls
    k1 = client.generate(PROMPT, steps=STEPS, seed=7, guidance_scale=4.0, k=1)
    assert np.array_equal(k1.image, out.image)


# --- num_images ------------------------------------------------------------------------------


def test_n_images_are_the_single_image_requests_of_their_seeds(client):
    batch = client.generate(PROMPT, steps=STEPS, seed=11, num_images=3, mode="aggressive", k=3)
    assert batch.images.shape == (3, 64, 64, 3)
    for i in range(3):
        single = client.generate(PROMPT, steps=STEPS, seed=11 + i, mode="aggressive", k=3)
        assert single.images.shape == (1, 64, 64, 3)  # one rule: a leading axis for one image
        assert close(batch.images[i], single.image)
    assert batch.rounds == single.rounds  # n images travel through the same rounds


def test_num_images_past_the_limit_is_refused(client):
    with pytest.raises(DriffusionError, match=r"num_images must be in \[1, 3\], got 4") as err:
        client.generate(PROMPT, num_images=4)
    assert err.value.is_invalid_argument


# --- scheduler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", samplers_for("v_prediction"))
def test_every_sampler_of_the_model_serves_and_k1_is_sequential(client, name):
    seq = client.generate(PROMPT, steps=STEPS, seed=3, scheduler=name, mode="sequential")
    k1 = client.generate(PROMPT, steps=STEPS, seed=3, scheduler=name, k=1)
    assert np.array_equal(seq.image, k1.image)
    k4 = client.generate(PROMPT, steps=STEPS, seed=3, scheduler=name, k=4)
    calls = STEPS + 1 if name == "pndm" else STEPS
    assert k4.rounds == count_rounds(calls, "aggressive", 4)[0]


def test_a_sampler_the_model_cannot_use_is_refused_naming_the_allowed_ones(client):
    with pytest.raises(DriffusionError, match="scheduler must be one of ddim, ddpm") as err:
        client.generate(PROMPT, scheduler="flow_euler")
    assert err.value.is_invalid_argument and "flow_euler" in str(err.value)


# --- img2img -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_at_k1_is_diffusers_img2img(client, pndm_pipeline, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    start = client.generate("a blue circle", steps=STEPS, seed=1).image
    pipe = StableDiffusionImg2ImgPipeline(**load_tiny_pipeline(pndm_pipeline).components)
    pipe.set_progress_bar_config(disable=True)
    reference = pipeline_image(
        pipe, seed=5, image=start.astype(np.float32)[None] / 255.0, strength=strength
    )
    fields = dict(steps=STEPS, seed=5, guidance_scale=4.0, image=start, strength=strength)
    out = client.generate(PROMPT, mode="aggressive", k=1, **fields)
    assert close(out.image, reference)
    run = int(STEPS * strength)  # the strength's tail of the steps, plus PLMS's extra call
    assert out.evaluations == run + 1
    drafted = client.generate(PROMPT, mode="aggressive", k=3, **fields)
    assert drafted.rounds == count_rounds(run + 1, "aggressive", 3)[0]


def test_img2img_fields_are_checked(client):
    start = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(DriffusionError, match="strength needs an image"):
        client.generate(PROMPT, strength=0.5)
    with pytest.raises(DriffusionError, match=r"strength must be in \(0, 1\]"):
        client.generate(PROMPT, image=start, strength=1.5)
    with pytest.raises(DriffusionError, match="image height must be a multiple of 16"):
        client.generate(PROMPT, image=np.zeros((60, 64, 3), np.uint8))


# --- streaming --------------------------------------------------------------------------------


def test_the_stream_reports_every_round_and_ends_with_the_plain_models_images(client):
    fields = dict(steps=12, seed=4, mode="aggressive", k=4, num_images=2)
    seen = []
    streamed = client.stream(PROMPT, preview=True, on_progress=seen.append, **fields)
    plain = client.generate(PROMPT, **fields)
    rounds = count_rounds(13, "aggressive", 4)[0]  # PLMS: 12 steps are 13 calls
    assert [p.round for p in seen] == list(range(1, rounds + 1))
    assert all(p.rounds == rounds for p in seen) and seen[-1].steps_done == 13
    assert all(p.preview.shape == (2, 8, 8, 3) for p in seen)  # at latent resolution
    assert np.array_equal(streamed.images, plain.images)


def test_generate_stream_shows_a_line_per_round(server, tmp_path):
    out = tmp_path / "x.png"
    done = subprocess.run(
        [sys.executable, "-m", "driffusion.cli", "generate", "--prompt", PROMPT, "--steps", "8"]
        + ["--stream", "--out", str(out), "--url", server.grpc_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "round" in line]
    rounds = count_rounds(9, "aggressive", 4)[0]
    assert len(lines) == rounds and f"round {rounds}/{rounds}" in lines[-1]
    assert out.exists()
