"""Where the model looked (apps/heatmap.py): the occlusion maps of both VQA models and of
a search hit are hottest on the shape (or the cell next to its edge), not the background,
on easy-VQA test pictures."""

import numpy as np
import pytest
import torch
from PIL import Image

from apps.heatmap import answer_saliency, match_saliency, occluded
from vlm.data import easyvqa
from vlm.hub import shipped_names
from vlm.images import load_image

PICTURES = range(10)  # the first easy-VQA test pictures: shapes of every size, anywhere


def _near_shape(picture: Image.Image, grid: int) -> np.ndarray:
    """(grid, grid) booleans: cells holding any of the shape's pixels, or next to one."""
    pixels = np.asarray(picture, dtype=np.int16)
    foreground = np.abs(pixels - pixels[0, 0]).sum(-1) > 30  # not the background colour
    side = pixels.shape[0] // grid
    cells = foreground[: side * grid, : side * grid].reshape(grid, side, grid, side).any((1, 3))
    padded = np.pad(cells, 1)
    return np.any([padded[1 + dy : 1 + dy + grid, 1 + dx : 1 + dx + grid] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0)


def _hottest_is_on_the_shape(saliency: np.ndarray, picture: Image.Image) -> bool:
    near = _near_shape(picture, saliency.shape[0])
    assert near.any() and not near.all()
    return bool(near.flat[saliency.argmax()])


def test_occluded_paints_one_cell_per_copy_and_skips_cells_of_the_fill_colour():
    pixels = torch.arange(3 * 10 * 10, dtype=torch.float32).reshape(3, 10, 10)
    pixels[:, 7:, 7:] = pixels[:, :1, :1]  # the bottom-right cell is already the corner colour
    batch, cells = occluded(pixels, 3)  # uneven cells: 3, 4, 3 pixels
    assert cells == [0, 1, 2, 3, 4, 5, 6, 7] and batch.shape == (9, 3, 10, 10) and torch.equal(batch[0], pixels)
    changed = (batch[1:] != pixels).any(1)  # (8, 10, 10)
    assert changed.sum((1, 2)).tolist() == [8, 12, 9, 12, 16, 12, 9, 12]  # the first cell holds the corner itself
    assert changed[4, 3:7, 3:7].all() and changed[4].sum() == 16  # the middle cell
    # cell 5 (row 1, column 2) is painted the corner colour
    assert torch.equal(batch[6, :, 3:7, 7:], pixels[:, :1, :1].expand(3, 4, 3))


@pytest.mark.parametrize("name", ["llava-easyvqa", "flamingo-easyvqa"])
def test_answer_heatmaps_light_the_shape(name):
    if name not in shipped_names():
        pytest.skip(f"{name} is not shipped")
    from vlm import load_vlm

    model = load_vlm(name)
    for index in PICTURES:
        item = easyvqa.images("test")[index]
        picture = load_image(item.path)
        saliency = answer_saliency(model, picture, "what shape is it?", item.shape)
        assert saliency.shape == (8, 8) and saliency.max() == 1.0
        assert _hottest_is_on_the_shape(saliency, picture), (name, index)


def test_a_search_hits_map_lights_the_shape():
    if "clip-easyvqa" not in shipped_names():
        pytest.skip("clip-easyvqa is not shipped")
    from vlm.clip import load_clip

    clip = load_clip("clip-easyvqa")
    for index in PICTURES:
        item = easyvqa.images("test")[index]
        picture = load_image(item.path)
        query = clip.encode_texts([f"a {item.color} {item.shape}"]).numpy()[0]
        saliency = match_saliency(clip, picture, query)
        assert saliency.shape == (8, 8)
        assert _hottest_is_on_the_shape(saliency, picture), index
