"""What every DataModule shares: the long-prompt policy, labels in batches, padding, inspect-data."""

import json
import logging
import math

import open_clip
import pytest
import torch
from PIL import Image

from datamodules import ImageTextDataModule, Record
from datamodules.images import ImageTransform
from experiments.cli import main as medsd
from experiments.inspect_data import summarize
from lightning_modules.backbones import build_clip_tokenizer
from lightning_modules.prompts import PromptTokenizer

SHORT = "small left pleural effusion"
LONG = " ".join(["moderate right pleural effusion with adjacent atelectasis"] * 12)  # > 77 tokens
LABELS = ["Pleural Effusion", "Pneumothorax", "No Finding"]


class InMemory(ImageTextDataModule):
    def __init__(self, records: dict[str, list[Record]], **kwargs):
        super().__init__(image_size=16, batch_size=8, **kwargs)
        self.by_split = records

    def load_records(self, split: str) -> list[Record]:
        return self.by_split.get(split, [])


def record(prompt: str, labels=None, meta=None) -> Record:
    return Record(Image.new("L", (24, 16), 128), prompt, labels, meta)


@pytest.fixture(scope="module")
def clip() -> PromptTokenizer:
    return PromptTokenizer(build_clip_tokenizer(), max_length=77)


def test_prompt_lengths_count_special_tokens(clip):
    # open_clip's tokenizer (the reference) pads with 0 after start, BPE pieces and end tokens.
    reference = int((open_clip.tokenize([SHORT]) != 0).sum())
    assert clip.lengths([SHORT]) == [reference] and reference > 4
    assert clip.lengths([LONG])[0] > 77


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_prompts_are_counted_and_logged(clip, policy, caplog):
    dm = InMemory({"train": [record(SHORT), record(LONG), record(LONG)]}, long_prompts=policy)
    dm.tokenizer = clip
    with caplog.at_level(logging.WARNING):
        kept = dm.usable_records("train")
    assert "2 " in caplog.text and "77 tokens" in caplog.text
    if policy == "drop":
        assert [r.prompt for r in kept] == [SHORT]
        assert dm.dropped["train"] == {"prompt longer than the text encoder's 77 tokens": 2}
    else:
        assert len(kept) == 3 and dm.truncated["train"] == 2 and not dm.dropped["train"]
        batch = next(iter(dm.train_dataloader()))
        assert batch["input_ids"].shape == (3, 77)


def test_long_prompts_can_be_an_error(clip):
    dm = InMemory({"train": [record(SHORT), record(LONG)]}, long_prompts="error")
    dm.tokenizer = clip
    with pytest.raises(ValueError, match=r"1 of 2 train prompts are longer than the text encoder's 77"):
        dm.train_dataloader()


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="long_prompts"):
        InMemory({}, long_prompts="shorten")


def test_labels_keep_blank_uncertain_and_negative_apart():
    values = [{"Pleural Effusion": 1.0, "Pneumothorax": None, "No Finding": 0.0},
              {"Pleural Effusion": -1.0, "Pneumothorax": 0.0, "No Finding": None}]  # fmt: skip
    dm = InMemory({"train": [record(SHORT, v) for v in values]})
    batch = next(iter(dm.val_dataloader()))
    assert batch["label_names"] == LABELS
    labels = batch["labels"]
    assert labels[0, 0] == 1 and math.isnan(labels[0, 1]) and labels[0, 2] == 0
    assert labels[1, 0] == -1 and labels[1, 1] == 0 and math.isnan(labels[1, 2])


def test_pad_to_square_keeps_the_whole_image():
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    padded = ImageTransform(20, pad_to_square=True)(wide)
    cropped = ImageTransform(20)(wide)
    # 40x20 -> 20x10 centred: five black rows above and below, the whole width kept.
    assert torch.all(padded[:, :5] == -1) and torch.all(padded[:, 15:] == -1)
    assert torch.all(padded[:, 5:15] == 1)
    assert torch.all(cropped == 1)


def test_inspect_data_counts_everything(clip):
    labels = {"Pleural Effusion": 1.0, "Pneumothorax": None}
    train = [record(SHORT, labels, {"view": "PA"}), record(LONG, labels, {"view": "AP"}),
             record(SHORT, {"Pleural Effusion": -1.0, "Pneumothorax": 0.0}, {"view": "PA"})]  # fmt: skip
    summary = summarize(InMemory({"train": train}, long_prompts="drop"), clip)
    split = summary["splits"]["train"]
    assert split["records"] == 2 and split["images"] == 2
    assert split["dropped"] == {"prompt longer than the text encoder's 77 tokens": 1}
    assert (
        split["prompt_tokens"]["min"] == clip.lengths([SHORT])[0]
        and split["prompt_tokens"]["over_limit"] == 1
    )
    assert split["labels"] == {
        "Pleural Effusion": {"positive": 1, "uncertain": 1},
        "Pneumothorax": {"blank": 1, "negative": 1},
    }
    assert split["meta"] == {"view": {"PA": 2}}
    assert summary["splits"]["val"]["records"] == 0


def test_inspect_data_command_prints_json(capsys):
    medsd(["inspect-data", "--config", "experiments/configs/tiny/unet.yaml"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["datamodule"] == "SyntheticShapesDataModule"
    assert [summary["splits"][s]["records"] for s in ("train", "val", "test")] == [16, 4, 4]


def test_inspect_data_finds_corrupt_and_missing_images(tmp_path, clip):
    good, truncated = tmp_path / "good.jpg", tmp_path / "truncated.jpg"
    Image.new("L", (64, 64), 90).save(good, quality=95)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    paths = [good, truncated, tmp_path / "missing.jpg"]
    dm = InMemory({"train": [Record(str(p), SHORT) for p in paths]})
    found = summarize(dm, clip, verify_images=True)["splits"]["train"]["unreadable_images"]
    assert found["count"] == 2
    assert str(truncated) in found["examples"][0] and "missing.jpg" in found["examples"][1]
