"""MedVQA-GI (ImageCLEFmed 2024): Kvasir colonoscopy images with templated generation prompts.

The development set has no splits of its own, and each image has about ten prompts: held-out
splits are made here, by image, so that no image is seen in training through one prompt and
scored in validation through another.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from .base import SPLITS, ImageTextDataModule, Record
from .hub_files import find_hub_files, iter_image_bytes, materialise_images, read_table_columns
from .images import IMAGE_SUFFIXES, existing_names
from .tables import check_choice, drop_or_raise, drop_rows, require_columns
from .text_files import DEFAULT_TEXT_ENCODING, check_text_encoding, decode, read_csv, read_text

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ["Prompt", "Filename"]


def split_of_image(name: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split of the image file `name` ("train", "val" or "test"), from a hash of the name.

    A hash rather than a shuffle of the list: an image's split depends on its name alone, so adding
    or removing images moves no other image, and the same image gets the same split from either
    distribution of the data. The fractions are therefore met on average (within about 1% for
    2,000 images), not exactly. Raising val_fraction only moves training images into validation;
    the test images depend on test_fraction and the seed alone.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if draw < test_fraction:
        return "test"
    if draw < test_fraction + val_fraction:
        return "val"
    return "train"


class MedVQAGIDataModule(ImageTextDataModule):
    """The MedVQA-GI 2024 development set: `<root>/prompt-gt.csv` and `<root>/images/*.jpg`.

    prompt-gt.csv is ';'-delimited with the header `Prompt;Filename` (prompts contain commas); every
    row is a record and its prompt is kept exactly as written, typos included, since the challenge
    scores against that text; a row repeating an earlier one's image and prompt adds nothing and is
    dropped (counted).
    captions: the path of a `kvasir-captions.json` shaped `{img_id: {key: [caption, ...]}}` (img_id:
        the file name without .jpg), whose images are in the same images folder.
    prompt_source: which texts make the records: "prompts" (prompt-gt.csv), "captions" (the JSON
        file alone) or "both" (every prompt and every caption).
    prompts_per_image: "all", or "first" to keep one record per image (the first usable prompt,
        in file order), e.g. to compute image metrics once per image; the others are counted as
        dropped.
    val_fraction, test_fraction, split_seed: images (not rows) go to validation and test with these
        probabilities; see split_of_image.
    missing_images: "error" (naming the files) or "drop" the records whose image is not there,
        counted per image (in `dropped`, "image missing (counted per image, ...)").
    empty_prompts: "error" (naming the lines) or "drop" the records with a blank prompt.
    text_encoding: the encoding of prompt-gt.csv and the captions file ("utf-8", a byte-order mark
        allowed; "latin-1" for a copy re-saved by an older tool). A file that does not decode is an
        error naming it, its line and the byte offset.
    The other arguments are ImageTextDataModule's. Records carry no labels; meta has "image_id"
    (the file name without extension) and "source" ("prompt-gt" or "caption:<key>").
    """

    # The record index (see ImageTextDataModule) watches the tables read and the image folder's listing.
    indexed = True

    def __init__(
        self,
        root: str,
        captions: str | None = None,
        prompt_source: Literal["prompts", "captions", "both"] = "prompts",
        prompts_per_image: Literal["all", "first"] = "all",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        missing_images: Literal["error", "drop"] = "error",
        empty_prompts: Literal["error", "drop"] = "error",
        text_encoding: str = DEFAULT_TEXT_ENCODING,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        check_choice("prompt_source", prompt_source, ("prompts", "captions", "both"))
        check_choice("prompts_per_image", prompts_per_image, ("all", "first"))
        check_choice("missing_images", missing_images, ("error", "drop"))
        check_choice("empty_prompts", empty_prompts, ("error", "drop"))
        if prompt_source != "prompts" and captions is None:
            raise ValueError(
                f"prompt_source={prompt_source!r} needs captions, the path of kvasir-captions.json"
            )
        if prompt_source == "prompts" and captions is not None:
            raise ValueError(
                "captions is set but prompt_source='prompts' leaves it unused: use 'captions' or 'both'"
            )
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
            raise ValueError(
                "val_fraction and test_fraction must be >= 0 with a sum <= 1; "
                f"got {val_fraction} and {test_fraction}"
            )
        self.root = Path(root)
        self.captions = None if captions is None else Path(captions)
        self.prompt_source = prompt_source
        self.prompts_per_image = prompts_per_image
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.missing_images = missing_images
        self.empty_prompts = empty_prompts
        self.text_encoding = check_text_encoding(text_encoding)

    def load_records(self, split: str) -> list[Record]:
        return self._records_by_split[split]

    @cached_property
    def _records_by_split(self) -> dict[str, list[Record]]:
        # Read once for all splits: the split of a row depends on its image only.
        table = self._read_rows()
        table["split"] = [
            split_of_image(name, self.val_fraction, self.test_fraction, self.split_seed)
            for name in table["image"]
        ]
        empty = table["prompt"].str.strip() == ""
        table = drop_or_raise(self, table, empty, "empty_prompts", "empty prompt", table["where"])
        repeated = table.duplicated(["image", "prompt", "source"])
        table = drop_rows(self, table, repeated, "repeats an earlier row's image and prompt", table["where"])
        table = self._locate_images(table)
        missing = table["missing"] != ""
        # Counted per image, not per prompt: a missing image is one problem, whatever its prompts.
        # A row without a file name is an image of its own.
        images = table["image"].where(table["image"] != "", table["where"])
        table = drop_or_raise(
            self, table, missing, "missing_images", "image missing", table["missing"], images
        )
        if self.prompts_per_image == "first":
            table = drop_rows(
                self, table, table["image"].duplicated(), "not its image's first prompt", table["where"]
            )
        return {
            split: [_record(row) for row in table[table["split"] == split].itertuples()] for split in SPLITS
        }

    def _read_rows(self) -> pd.DataFrame:
        """All texts as rows: image (file name, the split key), prompt, source and where (for messages)."""
        frames = []
        if self.prompt_source in ("prompts", "both"):
            frames.append(self._read_prompts(self.root / "prompt-gt.csv"))
        if self.prompt_source in ("captions", "both"):
            frames.append(self._read_captions(self.captions))
        return pd.concat(frames, ignore_index=True)

    def _read_prompts(self, path: Path) -> pd.DataFrame:
        self.note_source(path, table=True)
        header = _prompt_header(path, self.text_encoding)
        table = read_csv(
            path,
            self.text_encoding,
            sep=";",
            engine="python",  # the only engine that passes over-long lines to a callable
            on_bad_lines=_rejoin_prompt if header == PROMPT_COLUMNS else "error",
        )
        table = require_columns(table, PROMPT_COLUMNS, path).fillna("")  # a line lacking fields
        return pd.DataFrame(
            {
                "image": table["Filename"].map(_image_name),
                "prompt": table["Prompt"],
                "source": "prompt-gt",
                # As an editor numbers them (the header is line 1); exact unless a quoted prompt spans lines.
                "where": [f"{path} line {i + 2}" for i in range(len(table))],
            }
        )

    def _read_captions(self, path: Path) -> pd.DataFrame:
        self.note_source(path, table=True)
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} does not exist")
        data = json.loads(read_text(path, self.text_encoding))
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must map image ids to {{key: [caption, ...]}}; it holds a {type(data).__name__}"
            )
        rows = []
        for image_id, groups in data.items():
            if not isinstance(groups, dict) or not all(isinstance(texts, list) for texts in groups.values()):
                raise ValueError(
                    f"{path}: {image_id!r} must map to {{key: [caption, ...]}}; got {groups!r:.200}"
                )
            for key, texts in groups.items():
                for i, text in enumerate(texts):
                    # Anything but text (null, a number) counts as an empty caption.
                    caption = text if isinstance(text, str) else ""
                    rows.append(
                        (
                            _image_name(image_id),
                            caption,
                            f"caption:{key}",
                            f"{path} [{image_id!r}][{key!r}][{i}]",
                        )
                    )
        return pd.DataFrame(rows, columns=["image", "prompt", "source", "where"])

    def _locate_images(self, table: pd.DataFrame) -> pd.DataFrame:
        """Adds `path` (the image file) and `missing` (what is missing, or "" when the file is there)."""
        folder = self.root / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"MedVQA-GI image folder {folder} does not exist")
        self.note_source(folder)  # its listing says which images are missing
        paths = pd.Series([str(folder / name) for name in table["image"]], index=table.index)
        missing = paths.where(table["image"] != "", "no file name at " + table["where"])
        return table.assign(
            path=paths, missing=missing.where(~table["image"].isin(existing_names(folder)), "")
        )


class MedVQAGIParquetDataModule(MedVQAGIDataModule):
    """The development set as exported to the Hugging Face hub
    (`SushantGautam/ImageCLEFmed-MEDVQA-GI-2024-Dev_mod`), as a local folder.

    root: the downloaded folder (subfolders included) or one file: parquet files, or the Arrow
        files that repository actually holds (`image_clef_captions-train-*.arrow`), with columns
        `image` ({bytes, path}: each row embeds its image), `caption` (the prompt, kept exactly)
        and optionally `type` (kept in meta as "source"). Every file is read: the export is one
        split, and held-out splits are made as for the official files.
    image_dir: where each image is written once, as `<image_dir>/<file name>`: held in memory,
        every row's copy of its image would take about 5 GB. An image is known by the file name
        of its `path` (so its split matches the official files'), or, without one, by a hash of
        its bytes (`<sha256 prefix>.jpg`), which always means reading the bytes.
    missing_images: "error" or "drop" the records whose row has no image bytes.
    The other arguments are MedVQAGIDataModule's (text_encoding has nothing to read here: the text
    of Arrow and parquet files is always UTF-8).
    """

    # Not in the record index: its sources are the parquet files themselves (gigabytes to compare).
    indexed = False

    def __init__(
        self,
        root: str,
        image_dir: str,
        prompts_per_image: Literal["all", "first"] = "all",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        missing_images: Literal["error", "drop"] = "error",
        empty_prompts: Literal["error", "drop"] = "error",
        **kwargs: Any,
    ):
        super().__init__(
            root,
            prompts_per_image=prompts_per_image,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            missing_images=missing_images,
            empty_prompts=empty_prompts,
            **kwargs,
        )
        self.image_dir = Path(image_dir)

    def _read_rows(self) -> pd.DataFrame:
        return pd.concat([self._read_file(path) for path in find_hub_files(self.root)], ignore_index=True)

    def _read_file(self, path: Path) -> pd.DataFrame:
        table = read_table_columns(path, ["image", "caption"], optional=["type"])
        names = table["image"].tolist()
        unnamed = [row for row, name in enumerate(names) if name is None]
        for row, data in iter_image_bytes(path, unnamed):
            # A row with no bytes either keeps no name: its image is reported missing.
            names[row] = "" if data is None else f"{hashlib.sha256(data).hexdigest()[:20]}.jpg"
        types = table["type"] if "type" in table else pd.Series("", index=table.index)
        return pd.DataFrame(
            {
                "image": names,
                "prompt": table["caption"].fillna(""),
                "source": types.fillna("").astype(str),
                "where": [f"{path.name} row {row}" for row in range(len(table))],
                "file": path,
                "row": range(len(table)),
            }
        )

    def _locate_images(self, table: pd.DataFrame) -> pd.DataFrame:
        paths, missing = materialise_images(table, table["image"], self.image_dir)
        return table.assign(path=paths, missing=missing)


def _prompt_header(path: Path, encoding: str) -> list[str]:
    """The column names of prompt-gt.csv, or an error that says what is wrong with them.

    A copy re-saved by a spreadsheet program is often comma-delimited, which would otherwise read
    as one column named "Prompt,Filename".
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open("rb") as file:
        line = decode(file.readline(), path, encoding).rstrip("\r\n")
    columns = [name.strip() for name in line.split(";")]
    if set(PROMPT_COLUMNS) <= set(columns):
        return columns
    for delimiter in (",", "\t", "|"):
        if set(PROMPT_COLUMNS) <= {name.strip() for name in line.split(delimiter)}:
            raise ValueError(
                f"{path} is delimited by {delimiter!r} (header {line!r}), but MedVQA-GI's prompt-gt.csv "
                "uses ';' (its prompts contain commas): save it with ';' as the delimiter"
            )
    missing = [name for name in PROMPT_COLUMNS if name not in columns]
    raise ValueError(
        f"{path} has no {', '.join(map(repr, missing))} column; columns found (read with ';' as the "
        f"delimiter): {columns}"
    )


def _rejoin_prompt(fields: list[str]) -> list[str]:
    """An unquoted ';' inside a prompt splits a line into too many fields: the file name is the
    last one, and everything before it is the prompt, rejoined exactly."""
    return [";".join(fields[:-1]), fields[-1]]


def _image_name(raw: str) -> str:
    """A file name as prompt-gt.csv writes it (with .jpg), from a Filename or a captions img_id."""
    name = str(raw).strip()
    return name if not name or Path(name).suffix.lower() in IMAGE_SUFFIXES else f"{name}.jpg"


def _record(row: Any) -> Record:
    return Record(
        image=row.path, prompt=row.prompt, meta={"image_id": Path(row.image).stem, "source": row.source}
    )
