"""The demo base model's pretraining scenes: captions say what is where, the images show it."""

from __future__ import annotations

import re

import numpy as np

from datamodules import SyntheticScenesDataModule
from datamodules.scenes import COLUMNS, ROWS, scene_records

PHRASE = re.compile(
    r"a (small|large) (bright|dark) (circle|square|bar)"
    r" (?:at the|on the|in the) ?(top|bottom)? ?(left|right|centre)?"
)


def test_each_caption_names_one_to_three_shapes_with_size_brightness_and_place():
    for record in scene_records(200, 32, 0):
        phrases = [p for p in record.prompt.split(" and ") if p != "thin lines"]
        assert 1 <= len(phrases) <= 3, record.prompt
        assert all(PHRASE.fullmatch(p) for p in phrases), record.prompt


def test_a_single_shape_is_where_and_as_bright_as_its_caption_says():
    checked = 0
    for record in scene_records(400, 64, 1):
        phrases = record.prompt.split(" and ")
        if len(phrases) != 1 or phrases[0] == "thin lines":
            continue
        size, brightness, kind, row, column = PHRASE.fullmatch(phrases[0]).groups()
        if kind == "bar":  # low: its centre row moves by as much as it is high
            continue
        pixels = np.asarray(record.image.convert("L"), dtype=np.float64)
        x = int(64 * COLUMNS["" if column in (None, "centre") else column])
        y = int(64 * ROWS[row or ""])
        centre = pixels[y - 1 : y + 2, x - 1 : x + 2].mean()
        # The corner farthest from the shape is background (a single shape never reaches it).
        far_y = 2 if y > 32 else 61
        far_x = 2 if x > 32 else 61
        background = pixels[far_y - 2 : far_y + 3, far_x - 2 : far_x + 3].mean()
        if brightness == "bright":
            assert centre > background + 30, (record.prompt, centre, background)
        else:
            assert centre < background - 30, (record.prompt, centre, background)
        checked += 1
    assert checked >= 30


def test_validation_scenes_are_new_and_the_same_on_every_build():
    module = SyntheticScenesDataModule(n_train=8, n_val=4, seed=3)
    train, val = module.load_records("train"), module.load_records("val")
    again = SyntheticScenesDataModule(n_train=8, n_val=4, seed=3).load_records("train")
    assert [r.prompt for r in train] == [r.prompt for r in again]
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(train, again, strict=True)
    )
    train_pixels = {np.asarray(r.image).tobytes() for r in train}
    assert not any(np.asarray(r.image).tobytes() in train_pixels for r in val)
