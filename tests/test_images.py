import io
import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import fail_if_blocked
from vlm.errors import ImageError
from vlm.images import ImageTransform, load_image, resize_and_crop


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
