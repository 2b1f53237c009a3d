"""Where the model looked: occlusion maps for VQA answers (LLaVA and Flamingo) and for
search hits (CLIP).

The picture is cut into a grid of cells (the vision tower's patch grid, at most
MAX_GRID x MAX_GRID; 8x8 for the shipped 64x64 models). Each cell in turn is painted
over with the picture's corner colour (easy-VQA's background) and the score is computed
again; a cell's heat is how much the score drops without it, scaled to [0, 1] (bright =
the result depended on it). The intact picture and the occluded copies run as one batch:
one forward pass, no backward pass. A cell already all of the corner colour is not
recomputed (its copy would be the picture itself; its heat is 0), so a plain background
costs nothing: about a third of the 65 inputs remain for a typical easy-VQA picture.

    answer_saliency(vlm, picture, question, answer)   score: log-likelihood of the answer
    match_saliency(clip, picture, query_vector)       score: cosine similarity to the query

Why occlusion: it works in pixel space, so the map is where the picture mattered, and it
is the same method for both VLM kinds and for CLIP. Gradient x input on LLaVA's patch
tokens was tried first: those tokens come from the vision tower's penultimate layer,
where every token already mixes the whole picture, and the maps lit up the background.
Flamingo's cross-attention weights point at resampler latents, each of which mixes all
patches, so mapping them back to the picture says little; CLIP's own patch tokens are
likewise not aligned with its pooled embedding.
"""

import math

import numpy as np
import torch
from PIL import Image

from vlm.images import load_image
from vlm.lm import IMAGE_TOKEN

SIZE = 256  # pixels of the drawn map
MAX_GRID = 8  # cells per side: 1 + 64 inputs per map, whatever the tower's patch grid
IGNORE = -100  # label of tokens that are not the answer
METHOD = "occlusion: each patch painted over in turn (bright = the result depended on it)"


def occluded(pixels: torch.Tensor, grid: int) -> tuple[torch.Tensor, list[int]]:
    """(3, S, S) -> ((1 + n, 3, S, S), the n cells painted): the picture, then one copy per
    cell (row by row, index row * grid + col) with that cell painted the top-left pixel's
    colour; cells already all of that colour are left out."""
    side = pixels.shape[-1]
    edges = [round(i * side / grid) for i in range(grid + 1)]
    fill = pixels[:, :1, :1]
    copies, cells = [pixels], []
    for i in range(grid * grid):
        row, col = divmod(i, grid)
        area = (slice(None), slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1]))
        if torch.equal(pixels[area], fill.expand_as(pixels[area])):
            continue
        copy = pixels.clone()
        copy[area] = fill
        copies.append(copy)
        cells.append(i)
    return torch.stack(copies), cells


def answer_saliency(model, image: Image.Image, question: str, answer: str) -> np.ndarray:
    """(g, g) heat in [0, 1] per cell of `image` for a VQA model's `answer` to `question`:
    the drop of the answer's log-likelihood when the cell is hidden. Any
    VisionLanguageModel (LLaVA or Flamingo)."""
    ids, labels = model.encode([("user", f"{IMAGE_TOKEN}\n{question}"), ("assistant", answer)])
    pixels = model.transform(image)  # (3, S, S)
    grid = _grid(model.vision.num_patches)
    batch, cells = occluded(pixels, grid)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids] * len(batch), device=device)
    targets = torch.tensor([labels] * len(batch), device=device)[:, 1:]
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixels=batch.to(device, model.lm.dtype)
        ).logits[:, :-1]
        scores = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        likelihood = (scores * (targets != IGNORE)).sum(-1).cpu()  # (1 + n,)
    return _scaled(likelihood[0] - likelihood[1:], cells, grid)


def match_saliency(clip, image: Image.Image, vector: np.ndarray) -> np.ndarray:
    """(g, g) heat in [0, 1] per cell of `image` for a search query's (D,) normalised
    `vector`: the drop of the picture's cosine similarity to it when the cell is hidden."""
    pixels = clip.transform(image)  # (3, S, S)
    rows, cols = getattr(clip.model.visual, "grid_size", (MAX_GRID, MAX_GRID))  # a ResNet tower has none
    grid = _grid(rows * cols)
    batch, cells = occluded(pixels, grid)
    with torch.inference_mode():
        features = clip.image_features(batch).float()  # (1 + n, D), normalised
    similarity = features @ torch.from_numpy(np.asarray(vector, np.float32))  # (1 + n,)
    return _scaled(similarity[0] - similarity[1:], cells, grid)


def draw(image: Image.Image, saliency: np.ndarray) -> Image.Image:
    """`image` at SIZE x SIZE, kept bright where `saliency` is high and dimmed elsewhere
    (a tint would be confused with the shapes' own colours)."""
    picture = np.asarray(load_image(image).resize((SIZE, SIZE), Image.NEAREST), dtype=np.float32)
    heat = Image.fromarray((saliency * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    light = 0.15 + 0.85 * np.asarray(heat, dtype=np.float32)[..., None] / 255
    return Image.fromarray((picture * light).astype(np.uint8))


def _grid(patches: int) -> int:
    """Cells per side: the tower's patch grid, capped at MAX_GRID."""
    return max(1, min(MAX_GRID, math.isqrt(patches)))


def _scaled(drop: torch.Tensor, cells: list[int], grid: int) -> np.ndarray:
    """(n,) score drops of the painted cells -> (grid, grid) heat in [0, 1], 0 elsewhere."""
    heat = np.zeros(grid * grid, np.float32)
    heat[cells] = drop.clamp(min=0).numpy()
    heat = heat.reshape(grid, grid)
    return heat / heat.max() if heat.max() > 0 else heat
