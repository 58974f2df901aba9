"""Images cost memory for their decoded pixels, not for float copies of them; a size limit names the file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.images as images
from datamodules.images import ImageLoadError, ImageTransform, load_image, set_max_image_pixels

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GIB_IN_KIB = 1024 * 1024

# Loads the image given, at a 32-px draft, and prints its size, two pixels and the peak resident
# memory (ru_maxrss, KiB on Linux) before and after: the imports (torch) are not the image's cost.
MEASURE = """
import json, resource, sys
from datamodules.images import load_image
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = load_image(sys.argv[1], draft_size=32)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"size": img.size, "left": img.getpixel((0, 0)), "right": img.getpixel((63, 63)),
                  "imported_kib": imported, "peak_kib": peak}))
"""


def test_a_13000_px_16_bit_png_loads_at_a_32_px_draft_within_1_gb(tmp_path):
    # 13,000 x 13,000 16-bit pixels: 338 MB decoded, about 360 KB as a PNG (left half 65535, right
    # half 25700 = 100 * 257), just under Pillow's limit of 178,956,970 pixels.
    path = tmp_path / "huge.png"
    huge = Image.new("I;16", (13000, 13000), 25700)
    huge.paste(65535, (0, 0, 6500, 13000))
    huge.save(path)
    del huge
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", MEASURE, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    # Shrunk by 13000 // (2 * 32) = 203 to 13000 // 203 = 64 px; the halves meet at 6500 / 203.125 = 32.
    assert result["size"] == [64, 64]
    assert result["left"] == [255, 255, 255] and result["right"] == [100, 100, 100]
    # float64 conversion of the whole image took 5.5 GB here.
    assert result["peak_kib"] - result["imported_kib"] < GIB_IN_KIB, result


def test_16_bit_values_are_divided_by_257_and_rounded(tmp_path):
    # 128 / 257 = 0.498, 129 / 257 = 0.502, 385 / 257 = 1.498, 386 / 257 = 1.502, 25700 / 257 = 100.
    values = np.array([[0, 128, 129, 385, 386, 25700, 65535]], dtype=np.uint16)
    path = tmp_path / "steps.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 0, 1, 1, 2, 100, 255]
    # Mode "I" (32-bit) holds values outside 0..65535 too: clipped.
    wide = Image.fromarray(np.array([[-5, 70000, 257]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(images.to_rgb(wide))[0, :, 0].tolist() == [0, 255, 1]


def test_a_large_png_is_shrunk_before_conversion_to_much_the_same_training_image(tmp_path):
    # 512 px for a 64-px transform: shrunk by 512 // 128 = 4 to 128 px, then resized as before.
    y, x = np.mgrid[0:512, 0:512]
    pixels = ((x + y) // 4 % 256).astype(np.uint8)
    pixels[:, 200:260] = 255  # an edge, where box averaging could differ most
    path = tmp_path / "large.png"
    Image.fromarray(pixels).save(path)
    drafted = load_image(path, draft_size=64)
    assert drafted.size == (128, 128) and drafted.mode == "RGB"
    transform = ImageTransform(64)
    full = transform(load_image(path))
    assert (transform(drafted) - full).abs().max() < 0.05  # of the range [-1, 1]


def test_an_image_over_max_image_pixels_is_refused_naming_file_size_and_setting(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 80)).save(path)
    monkeypatch.setattr(images, "max_image_pixels", 5000)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert str(caught.value).startswith(
        f"cannot read image {path}: 100 x 80 = 8,000 pixels is more than max_image_pixels, 5,000 "
    )
    assert "set_max_image_pixels" in str(caught.value)
    monkeypatch.setattr(images, "max_image_pixels", 8000)
    assert load_image(path).size == (100, 80)


def test_a_limit_above_pillows_raises_pillows(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (60, 60)).save(path)  # 3,600 pixels
    # As if Pillow's limit were 1,000 (it refuses more than twice that while opening a file).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(images, "max_image_pixels", 2000)
    with pytest.raises(
        ImageLoadError, match=rf"^cannot read image {path}: .*3600 pixels.*set_max_image_pixels"
    ):
        load_image(path)
    set_max_image_pixels(4000)
    assert Image.MAX_IMAGE_PIXELS == 4000 and images.max_image_pixels == 4000
    assert load_image(path).size == (60, 60)
    set_max_image_pixels(1500)  # lower: Pillow's stays where it is
    assert Image.MAX_IMAGE_PIXELS == 4000
    with pytest.raises(ImageLoadError, match=r"60 x 60 = 3,600 pixels is more than max_image_pixels, 1,500"):
        load_image(path)
