"""A small CNN digit classifier: the judge of prompt-match accuracy and the feature extractor of the
Frechet distance (FID with this network's 64-d penultimate features in place of Inception's).

Trained on the real training split only, at the generator's resolution, and scored on the held-out
split. Input: grayscale images in [0, 1], (N, H, W) or RGB (N, 3, H, W) averaged to gray.

    python -m training.digits_classifier --out embedded/digits/classifier
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from training.digits_data import load_digits_split

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """conv-pool-conv-pool-fc(64)-fc(10); `features` is the 64-d ReLU layer."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (size // 4) ** 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_gray(x)  # (B, 1, H, W) in [0, 1]
        x = F.max_pool2d(F.relu(self.conv1(x * 2 - 1)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))  # (B, 10) logits


def _as_gray(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"images must be (N, H, W) or (N, 1|3, H, W), got shape {tuple(x.shape)}")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift by up to 1 px, add a little noise: decoded (non-blocky) samples are judged fairly."""
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_classifier(
    size: int = 16, epochs: int = 30, seed: int = 0
) -> tuple[DigitsClassifier, float]:
    """Train on the real training split; returns the model (eval mode) and held-out accuracy."""
    data = load_digits_split(size)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier(size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    acc = accuracy(model, torch.from_numpy(data.test_images), data.test_labels)
    return model, acc


@torch.no_grad()
def predict(model: DigitsClassifier, images: torch.Tensor) -> np.ndarray:
    return model(images).argmax(dim=1).numpy()


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: np.ndarray) -> float:
    return float((predict(model, images) == np.asarray(labels)).mean())


@torch.no_grad()
def features(model: DigitsClassifier, images: torch.Tensor) -> np.ndarray:
    return model.features(images).double().numpy()  # (N, 64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, eq. 6).

    Tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), a symmetric PSD form (no scipy).
    """
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_a @ s_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def save_classifier(model: DigitsClassifier, folder: str | Path, held_out_accuracy: float) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    config = {
        "size": model.size,
        "feature_dim": FEATURE_DIM,
        "held_out_accuracy": held_out_accuracy,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(folder: str | Path) -> DigitsClassifier:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = DigitsClassifier(config["size"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="embedded/digits/classifier")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    model, acc = train_classifier(args.size, seed=args.seed)
    save_classifier(model, args.out, acc)
    data = load_digits_split(args.size)
    fd = frechet_distance(
        features(model, torch.from_numpy(data.train_images)),
        features(model, torch.from_numpy(data.test_images)),
    )
    print(
        f"held-out accuracy {acc:.4f}; FD(real train, real held-out) {fd:.3f}; "
        f"{time.time() - start:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
