"""scikit-learn's handwritten digits as diffusion training data, and the prompts that describe them.

`load_digits` ships 1797 grayscale 8x8 images with 17 levels (0..16). They are upsampled by NEAREST
(each pixel becomes a block; bilinear loses the class even for a classifier) and split once, with a
fixed seed, into a training part (VAE, UNet, classifier) and a held-out part (classifier accuracy,
Frechet reference).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# "{w}" is the number word ("seven"), "{n}" the numeral ("7"). The canonical prompt is the first.
PROMPT_TEMPLATES = (
    "a handwritten digit {w}",
    "a handwritten digit {n}",
    "the number {n}",
    "the number {w}",
    "digit {n}",
    "digit {w}",
    "the digit {w}",
    "the digit {n}",
    "a handwritten {w}",
    "a handwritten {n}",
    "number {w}",
    "number {n}",
    "a {w}",
    "a {n}",
    "{w}",
    "{n}",
    "a picture of the number {w}",
    "an image of the digit {n}",
    "a drawing of a handwritten {w}",
    "the handwritten number {n}",
    "a photo of the digit {w}",
    "handwritten {n}",
    "a {w} written by hand",
    "the {w} digit",
    "{n} in white on black",
    "a handwritten {n} on a black background",
)


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [0, 1], shape (N, size, size), float32; labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def upsample_nearest(images_8x8: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) -> (N, size, size) by repeating each pixel size // 8 times along both axes."""
    if size % 8 != 0 or size < 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    factor = size // 8
    return images_8x8.repeat(factor, axis=1).repeat(factor, axis=2)


def load_digits_split(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """The digits at `size` px in [0, 1], split by a seeded permutation (stratification not needed:
    the classes are balanced to within a few images)."""
    bunch = load_digits()
    images = upsample_nearest(bunch.images.astype(np.float32) / 16.0, size)  # (N, size, size)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(images[train], labels[train], images[test], labels[test])


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, 3, H, W) in [-1, 1], the gray value replicated to RGB."""
    x = torch.from_numpy(images).float().mul(2.0).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def prompt_for(label: int, template: str = PROMPT_TEMPLATES[0]) -> str:
    return template.format(w=NUMBER_WORDS[label], n=str(label))


def random_prompts(
    labels: list[int], rng: random.Random, p_empty: float = 0.0, p_filler: float = 0.0
) -> list[str]:
    """One prompt per label from a random template; with probability p_empty the empty prompt (the
    unconditional branch of classifier-free guidance); with probability p_filler a made-up word at a
    random place, so that words the tokenizer has never seen do not hide the digit."""
    prompts = []
    for y in labels:
        if rng.random() < p_empty:
            prompts.append("")
            continue
        words = prompt_for(y, rng.choice(PROMPT_TEMPLATES)).split()
        if rng.random() < p_filler:
            words.insert(rng.randint(0, len(words)), _made_up_word(rng))
        prompts.append(" ".join(words))
    return prompts


def _made_up_word(rng: random.Random) -> str:
    """Random lower-case letters, never a number word."""
    while True:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        if word not in NUMBER_WORDS:
            return word


def prompt_corpus() -> list[str]:
    """Every templated prompt for every digit: the text the tokenizer's merges are learned from."""
    return [prompt_for(y, t) for t in PROMPT_TEMPLATES for y in range(10)]
