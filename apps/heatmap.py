"""Where the model looked: occlusion over a LLaVA model's image patches.

For an answer A to question Q about picture P, each of P's patches (the vision tower's
grid, 8x8 for the shipped 64x64 models) is painted over with the picture's corner colour
(easy-VQA's background) and the log-likelihood of A is computed again; a patch's score is
how much A's log-likelihood drops without it, scaled to [0, 1] and drawn over P (bright =
the answer depended on it). All occluded copies run as one batch: one forward pass of
N + 1 sequences, no backward pass.

Why occlusion and not gradients: gradient x input on the patch tokens was tried first;
the tokens come from the vision tower's penultimate layer, where every token already
mixes the whole picture, and its maps lit up the background, not the shape. Occlusion
works in pixel space, so its map is where the picture mattered.
Flamingo models are not covered (their pictures reach the LM through cross-attention to
resampled latents, not as patch tokens).
"""

import math

import numpy as np
import torch
from PIL import Image

from vlm.images import load_image
from vlm.lm import IMAGE_TOKEN

SIZE = 256  # pixels of the drawn map
IGNORE = -100  # label of tokens that are not the answer


def patch_saliency(model, image: Image.Image, question: str, answer: str) -> np.ndarray:
    """(g, g) scores in [0, 1], one per image patch, for `answer` to `question` about `image`.

    Raises:
        ValueError: the model does not read its pictures as patch tokens (not LLaVA-style).
    """
    if not hasattr(model, "splice") or not hasattr(model, "projector"):
        raise ValueError("a heatmap needs a LLaVA-style model (pictures read as patch tokens)")
    ids, labels = model.encode([("user", f"{IMAGE_TOKEN}\n{question}"), ("assistant", answer)])
    pixels = model.transform(image)  # (3, S, S)
    side = math.isqrt(model.image_token_count)
    patch = pixels.shape[-1] // side
    batch = pixels[None].repeat(side * side + 1, 1, 1, 1)  # (1 + g*g, 3, S, S); the first is intact
    for i in range(side * side):
        row, col = divmod(i, side)
        batch[i + 1, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = pixels[:, :1, :1]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids] * len(batch), device=device)
    targets = torch.tensor([labels] * len(batch), device=device)[:, 1:]
    with torch.inference_mode():
        embeds = model.splice(input_ids, model.encode_images(batch.to(device)))
        logits = model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids)).logits[:, :-1]
        scores = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        likelihood = (scores * (targets != IGNORE)).sum(-1).cpu()  # (1 + g*g,)
    drop = (likelihood[0] - likelihood[1:]).clamp(min=0).numpy().reshape(side, side)
    return drop / drop.max() if drop.max() > 0 else drop


def draw(image: Image.Image, saliency: np.ndarray) -> Image.Image:
    """`image` at SIZE x SIZE, kept bright where `saliency` is high and dimmed elsewhere
    (a tint would be confused with the shapes' own colours)."""
    picture = np.asarray(load_image(image).resize((SIZE, SIZE), Image.NEAREST), dtype=np.float32)
    heat = Image.fromarray((saliency * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    light = 0.15 + 0.85 * np.asarray(heat, dtype=np.float32)[..., None] / 255
    return Image.fromarray((picture * light).astype(np.uint8))
