import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, SiglipImageProcessorPil

from tests.helpers import fail_if_blocked
from vlm.errors import ImageError
from vlm.images import ImageTransform, load_image, resize_and_crop, to_tensor


def _saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "L", "CMYK", "1", "RGB"])
def test_any_mode_becomes_rgb(mode):
    red = Image.new("RGB", (8, 8), (255, 0, 0)) if mode not in ("L", "LA", "1") else Image.new("L", (8, 8), 255)
    image = load_image(red.convert(mode))
    assert image.mode == "RGB"
    expected = (255, 0, 0) if mode not in ("L", "LA", "1") else (255, 255, 255)
    assert image.getpixel((3, 3)) == expected


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    array = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    image = load_image(_saved(Image.fromarray(array), "PNG"))
    assert image.mode == "RGB"
    assert abs(image.getpixel((0, 0))[0] - 128) <= 1


def test_transparent_pixels_become_white_not_black():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(_saved(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_palette_with_transparency():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    image = load_image(_saved(rgba.convert("P"), "PNG"))
    assert image.getpixel((1, 1)) == (0, 0, 255)


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(_saved(wide, "JPEG", exif=exif.tobytes()))
    assert image.size == (10, 20)


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _saved(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(path)


def test_empty_file_and_text_file_are_image_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    for name in ("empty.png", "notes.png"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)


def test_missing_file_is_image_error(tmp_path):
    with pytest.raises(ImageError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_huge_header_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 Mpixel, tiny file
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(path)


@pytest.mark.parametrize("size", [(64, 64), (256, 256), (300, 97), (33, 50)])
def test_transform_gives_model_input_size(size):
    transform = ImageTransform(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels = transform(Image.new("RGB", size, (255, 255, 255)))
    assert pixels.shape == (3, 64, 64)
    assert pixels.max().item() == pytest.approx(1.0)


def test_same_size_is_untouched():
    image = Image.new("RGB", (64, 64), (1, 2, 3))
    assert resize_and_crop(image, 64) is image


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    with fail_if_blocked(10), pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


# Transformers' PIL-backend processors (transformers 5's plain CLIPImageProcessor is the
# torchvision backend, which differs by up to one 8-bit level; AutoImageProcessor gives the
# PIL one with backend="pil").
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIDE = 32
# (width, height), both orientations, odd sides; where round() and int() give different long
# sides (32 * 45 / 21 = 68.57) the old rounding put the crop one pixel off. For padding, an odd
# (long - short) decides which side gets the spare row or column.
NON_SQUARE = [(45, 21), (21, 45), (59, 37), (37, 59), (100, 33), (33, 100), (70, 41), (41, 70), (17, 90), (64, 23)]
NON_SQUARE += [tuple(int(v) for v in np.random.default_rng(0).integers(16, 120, 2)) for _ in range(20)]


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _max_diff_to(processor, **options) -> float:
    worst = 0.0
    for seed, (width, height) in enumerate(NON_SQUARE):
        image = _random_image(width, height, seed)
        theirs = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
        ours = to_tensor(image, size=SIDE, **options)
        assert ours.shape == theirs.shape == (3, SIDE, SIDE)
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


def test_sizes_include_ones_where_rounding_and_truncating_differ():
    def long_side(w, h, f):
        return f(SIDE * max(w, h) / min(w, h))

    assert sum(long_side(w, h, round) != long_side(w, h, int) for w, h in NON_SQUARE) >= 10


def test_crop_equals_clip_image_processor_on_non_square_images():
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    assert _max_diff_to(processor, mean=CLIP_MEAN, std=CLIP_STD) <= 1e-6


def test_no_crop_equals_siglip_image_processor():
    processor = SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE})
    assert _max_diff_to(processor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop=False) <= 1e-6


def test_pad_to_square_equals_llava_image_processor_with_do_pad():
    processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    )
    assert _max_diff_to(processor, mean=CLIP_MEAN, std=CLIP_STD, pad_to_square=True) <= 1e-6


def test_transform_passes_crop_and_padding_to_to_tensor():
    transform = ImageTransform(SIDE, CLIP_MEAN, CLIP_STD)
    assert (transform.crop, transform.pad_to_square) == (True, False)  # CLIP, as before
    image = _random_image(45, 21, seed=1)
    for options in ({"crop": False}, {"pad_to_square": True}):
        expected = to_tensor(image, size=SIDE, mean=CLIP_MEAN, std=CLIP_STD, **options)
        assert not torch.equal(expected, transform(image))
        assert torch.equal(ImageTransform(SIDE, CLIP_MEAN, CLIP_STD, **options)(image), expected)
