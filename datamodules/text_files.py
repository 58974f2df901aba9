"""Reading the datasets' text files (tables, reports, captions) with their encoding checked.

Datasets come from many hands: a report or a caption table saved as Latin-1 or cp1252 by a
spreadsheet program does not decode as UTF-8. Python's own error then counts bytes from the start
of whatever buffer was being decoded and names no file; these readers name the file, the line and
the byte offset, and the DataModules' `text_encoding` setting that reads such a file.
"""

from __future__ import annotations

import codecs
import gzip
import os

import pandas as pd

DEFAULT_TEXT_ENCODING = "utf-8"


class TextDecodingError(ValueError):
    """A text file that does not decode in the encoding it is read with."""


def check_text_encoding(encoding: str) -> str:
    """`encoding`, once Python is known to have a codec of that name."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(
            f"text_encoding {encoding!r} is not an encoding Python knows; e.g. 'utf-8', 'latin-1', 'cp1252'"
        ) from None
    return encoding


def codec_for(encoding: str) -> str:
    """The codec that reads `encoding`: UTF-8 is read as utf-8-sig, so that a byte-order mark (as
    spreadsheet programs write) does not become part of the text or of a column name."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def decode(data: bytes, path: str | os.PathLike, encoding: str) -> str:
    """The bytes `data` of the file `path` as text, or a TextDecodingError saying where they fail."""
    try:
        return data.decode(codec_for(encoding))
    except UnicodeDecodeError as error:
        raise _decoding_error(path, encoding, data, error) from None


def read_text(path: str | os.PathLike, encoding: str = DEFAULT_TEXT_ENCODING) -> str:
    """A whole text file, read once."""
    with open(path, "rb") as file:  # not pathlib: MIMIC's 228k reports are read one by one
        return decode(file.read(), path, encoding)


def read_csv(path: str | os.PathLike, encoding: str = DEFAULT_TEXT_ENCODING, **options) -> pd.DataFrame:
    """pd.read_csv(path, **options) with every value as text (dtype str, no NA parsing: a blank cell
    is "" and a caption reading "None" stays that text), its decoding checked."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding=codec_for(encoding), **options)
    except UnicodeDecodeError as error:
        # pandas decodes in blocks and its error's position counts from the block's start: the
        # file is read again, only now that it failed, to say where.
        raise _locate_in_file(path, encoding, error) from None


def _locate_in_file(path: str | os.PathLike, encoding: str, error: UnicodeDecodeError) -> TextDecodingError:
    # pandas reads .gz files decompressed (the only compression the datasets here come in).
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    try:
        data.decode(codec_for(encoding))
    except UnicodeDecodeError as located:
        return _decoding_error(path, encoding, data, located)
    return TextDecodingError(f"{path} cannot be read as {encoding}: {error}")


def _decoding_error(
    path: str | os.PathLike, encoding: str, data: bytes, error: UnicodeDecodeError
) -> TextDecodingError:
    """The error naming the line and byte offset in `data` (the contents of `path`) where `error` is."""
    # The error counts from the start of what the codec decoded, which lacks a byte-order mark it skipped.
    offset = len(data) - len(error.object) + error.start
    line = data.count(b"\n", 0, offset) + 1
    where = " (uncompressed)" if str(path).endswith(".gz") else ""
    return TextDecodingError(
        f"{path}: line {line} (byte offset {offset}{where}) is not valid {encoding}: {error.reason} at "
        f"byte(s) {data[offset : offset + error.end - error.start].hex(' ')}; if the file is in another "
        "encoding, set text_encoding to it (e.g. text_encoding: latin-1)"
    )
