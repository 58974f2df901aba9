"""Checks of the image files a DataModule's records name: no image trained on and scored in another
split, and none outside the dataset's folder where that is asked for."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .tables import some_items

if TYPE_CHECKING:  # base calls these checks
    from .base import Record


def check_no_image_in_two_splits(records_by_split: Mapping[str, Sequence[Record]]) -> None:
    """A ValueError naming a few of the image files that records of more than one split use, and how
    many there are: a model scored on images it was trained on measures memory, not generalisation.

    A file is known by its device and inode, so another spelling of its path (relative, through
    `..` or a symlink) or a hard link is the same image; a path that cannot be read is compared as
    written, made absolute. Records whose image is already in memory have no file and are skipped.
    Images repeated within one split (several prompts per image) are not this check's concern.
    """
    first: dict[object, tuple[str, str]] = {}  # file -> (split, path) of the first record using it
    shared: dict[object, dict[str, str]] = {}  # file -> {split: path} where several splits use it
    for split, records in records_by_split.items():
        for record in records:
            if not isinstance(record.image, str | os.PathLike):
                continue
            path = os.fspath(record.image)
            key = _file_key(path)
            first_split, first_path = first.setdefault(key, (split, path))
            if first_split != split:
                shared.setdefault(key, {first_split: first_path}).setdefault(split, path)
    if shared:
        raise ValueError(
            f"{len(shared)} image(s) are in more than one split: "
            f"{some_items(_describe(uses) for uses in shared.values())}; each image must be in one split "
            "only, or the held-out scores are measured on training images"
        )


def _file_key(path: str) -> object:
    try:
        stat = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return stat.st_dev, stat.st_ino


def _describe(uses: dict[str, str]) -> str:
    """ "a.png in train and test", or "a.png in train = ../x/a.png in test" for two spellings of it."""
    if len(set(uses.values())) == 1:
        return f"{next(iter(uses.values()))} in {' and '.join(uses)}"
    return " = ".join(f"{path} in {split}" for split, path in uses.items())


def outside_root(paths: Iterable[str], root: str | os.PathLike) -> list[str]:
    """The `paths` that resolve (made absolute, `..` and symlinks followed) outside the folder `root`."""
    top = os.path.realpath(root)
    # Resolving costs a stat per part of a path, and images share few folders: one resolution each.
    folders: dict[str, str] = {}
    outside = []
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        resolved = os.path.join(folders[folder], name)
        if os.path.islink(resolved):
            resolved = os.path.realpath(resolved)
        if os.path.commonpath([top, resolved]) != top:
            outside.append(path)
    return outside
