"""Where a Flamingo model loses what the image shows: probes on its frozen vision tower's
patch tokens and on its Perceiver Resampler's latents.

    .venv/bin/python -m experiments.feature_probe --model flamingo-easyvqa

For each of colour and shape, a small probe (a per-token MLP, max-pooled over the tokens,
then a linear layer) is trained on the easyvqa:train images' features and scored on the
easyvqa:test images. If the patch tokens support an accuracy the latents do not, the
resampler drops that information before the language model ever sees it. A third column
trains a new resampler of the model's configuration (plus a linear layer on its mean
latent) to name the value from the patch tokens: whether that size of resampler can keep
it at all. Writes docs/benchmarks/feature_probe.md and .json.
"""

import argparse

import torch
from PIL import Image
from torch import nn

from benchmarks.common import write_report
from vlm.data import easyvqa
from vlm.errors import VlmError
from vlm.flamingo import FlamingoModel
from vlm.load import load_vlm
from vlm.resampler import PerceiverResampler, ResamplerConfig

LABELS = {"color": easyvqa.COLORS, "shape": easyvqa.SHAPES}


def features(model: FlamingoModel, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(patch tokens (M, N, D), resampled latents (M, R, D), images) of a split."""
    images = easyvqa.images(split)
    pixels = torch.stack([model.transform(Image.open(image.path)) for image in images])
    patches, latents = [], []
    with torch.inference_mode():
        for batch in pixels.split(256):
            patches.append(model.vision(batch))
            latents.append(model.resampler(patches[-1][:, None]))
    return torch.cat(patches), torch.cat(latents), images


class TokenProbe(nn.Module):
    """(M, T, dim) tokens -> (M, classes): a per-token MLP, max-pooled over the tokens, then linear."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.tokens = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, 256))
        self.head = nn.Linear(256, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(tokens).amax(1))


class ResamplerProbe(nn.Module):
    """(M, N, dim) patch tokens -> (M, classes): a new resampler, its latents averaged, then linear."""

    def __init__(self, dim: int, classes: int, resampler: ResamplerConfig):
        super().__init__()
        self.resampler = PerceiverResampler(dim=dim, config=resampler)
        self.head = nn.Linear(dim, classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(self.resampler(patches[:, None]).mean(1))


def probe_accuracy(
    make_probe, train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, epochs: int
) -> float:
    """Train `make_probe()` on (M, T, D) train tokens; accuracy on the test tokens."""
    torch.manual_seed(0)
    probe = make_probe()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(probe(train[batch]), train_y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        return (probe(test).argmax(1) == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flamingo-easyvqa")
    args = parser.parse_args()
    model = load_vlm(args.model)
    if not isinstance(model, FlamingoModel):
        raise VlmError(f"{args.model}: not a Flamingo model (this probe reads its resampler)")
    model = model.float().eval()  # shipped weights are fp16
    train_patches, train_latents, train_images = features(model, "train")
    test_patches, test_latents, test_images = features(model, "test")
    dim, results = train_patches.shape[-1], {}
    for attribute, values in LABELS.items():
        train_y = torch.tensor([values.index(getattr(image, attribute)) for image in train_images])
        test_y = torch.tensor([values.index(getattr(image, attribute)) for image in test_images])
        results[attribute] = {
            "patch tokens": probe_accuracy(
                lambda: TokenProbe(dim, len(values)), train_patches, train_y, test_patches, test_y, epochs=40
            ),
            "resampled latents": probe_accuracy(
                lambda: TokenProbe(dim, len(values)), train_latents, train_y, test_latents, test_y, epochs=40
            ),
            "new resampler trained on the label": probe_accuracy(
                lambda: ResamplerProbe(dim, len(values), model.config.resampler),
                train_patches,
                train_y,
                test_patches,
                test_y,
                epochs=30,
            ),
        }
    columns = list(results["shape"])
    table = ["| probe target | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [
        f"| {attribute} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |" for attribute, r in results.items()
    ]
    sections = [
        f"Model: `{args.model}`. Features: the vision tower's {train_patches.shape[1]} patch tokens "
        f"(width {train_patches.shape[2]}) and the resampler's {train_latents.shape[1]} latents of the same width.",
        f"Probes trained on the {len(train_images):,} easyvqa:train images, scored on the {len(test_images):,} easyvqa:test images.",
        "",
        *table,
    ]
    write_report(
        "feature_probe", "Feature probe: what the resampler keeps", sections, {"model": args.model, "results": results}
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
