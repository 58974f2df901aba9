"""Text files that are not UTF-8: every DataModule names the file, the line and the byte offset, and
reads them with text_encoding; a UTF-8 byte-order mark is still accepted.

The offsets are counted by hand in the comments: they are the position of the first byte that is
not UTF-8 (Latin-1's é is 0xe9, ü 0xfc, æ 0xe6).
"""

import gzip
import json
import re

import pytest

from datamodules import CSVImageTextDataModule, MedVQAGIDataModule, MIMICCXRDataModule, ROCOv2DataModule
from datamodules.text_files import TextDecodingError, read_csv
from tests.test_datamodules import write_png
from tests.test_medvqa_gi import CECUM, POLYP, write_medvqa
from tests.test_mimic_cxr import METADATA_COLUMNS, root  # noqa: F401 (root is a fixture)
from tests.test_rocov2 import write_roco

TRAIN_1, TRAIN_2 = "ROCOv2_2023_train_000001", "ROCOv2_2023_train_000002"


def assert_names(error: pytest.ExceptionInfo, path, line: int, offset: int) -> None:
    message = str(error.value)
    assert isinstance(error.value, TextDecodingError)
    assert message.startswith(f"{path}: line {line} (byte offset {offset}")
    assert "is not valid utf-8" in message and "text_encoding" in message


# --- CSV folder ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, name, data, line, offset, prompts",
    [
        # "image,prompt\n" is 13 bytes, "a.png,one\n" 10, then "b.png,caf" 9: é is byte 32, on line 3.
        (
            ["a.png", "b.png"],
            "metadata.csv",
            b"image,prompt\na.png,one\nb.png,caf\xe9 au lait\n",
            3,
            32,
            ["one", "café au lait"],
        ),
        # A caption file: "left effusion\n" is 14 bytes, then "Dr. M" 5: ü is byte 19, on line 2.
        (["scan.png"], "scan.txt", b"left effusion\nDr. M\xfcller\n", 2, 19, ["left effusion\nDr. Müller"]),
    ],
)
def test_csv_folder_text_in_latin_1_is_named_by_line_or_read_with_the_setting(
    tmp_path, images, name, data, line, offset, prompts
):
    for image in images:
        write_png(tmp_path / image)
    (tmp_path / name).write_bytes(data)
    with pytest.raises(TextDecodingError) as caught:
        CSVImageTextDataModule(str(tmp_path)).setup()
    assert_names(caught, tmp_path / name, line, offset)
    dm = CSVImageTextDataModule(str(tmp_path), text_encoding="latin-1")
    assert [r.prompt for r in dm.records("train")] == prompts


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "data.csv").write_bytes(b"\xef\xbb\xbfimage,prompt\na.png,caf\xc3\xa9\n")  # UTF-8 é
    assert [r.prompt for r in CSVImageTextDataModule(str(tmp_path / "data.csv")).records("train")] == ["café"]


def test_an_unknown_encoding_is_refused_when_the_datamodule_is_made():
    with pytest.raises(ValueError, match="text_encoding 'latin-9000' is not an encoding Python knows"):
        CSVImageTextDataModule("anywhere", text_encoding="latin-9000")


def test_the_line_of_a_gzipped_csv_is_counted_in_its_uncompressed_text(tmp_path):
    path = tmp_path / "table.csv.gz"
    # "a,b\n" is 4 bytes, "1,2\n" 4, then "3," 2: é is byte 10 of the text, on line 3.
    path.write_bytes(gzip.compress(b"a,b\n1,2\n3,\xe9\n"))
    with pytest.raises(TextDecodingError) as caught:
        read_csv(path)
    assert str(caught.value).startswith(f"{path}: line 3 (byte offset 10 (uncompressed))")
    assert read_csv(path, "latin-1")["b"].tolist() == ["2", "é"]


# --- ROCOv2 -------------------------------------------------------------------------------------


def test_rocov2_captions_in_latin_1_are_named_by_line_or_read_with_the_setting(tmp_path):
    roco = write_roco(tmp_path)
    path = roco / "train_captions.csv"
    # "ID,Caption\n" is 11 bytes, line 2 24 + 1 + 8 + 1 = 34 (45 in all), then the ID, "," and "R"
    # 26: ö is byte 71, on line 3.
    path.write_bytes(f"ID,Caption\n{TRAIN_1},Head CT.\n{TRAIN_2},R\xf6ntgen thorax.\n".encode("latin-1"))
    with pytest.raises(TextDecodingError) as caught:
        ROCOv2DataModule(str(roco)).records("train")
    assert_names(caught, path, line=3, offset=71)
    train = ROCOv2DataModule(str(roco), text_encoding="latin-1").records("train")
    assert [r.prompt for r in train] == ["Head CT.", "Röntgen thorax."]


# --- MIMIC-CXR ----------------------------------------------------------------------------------


def test_mimic_report_in_latin_1_is_named_by_line_or_read_with_the_setting(root):  # noqa: F811
    path = root / "reports" / "files" / "p10" / "p10000032" / "s50000001.txt"
    # " FINAL REPORT\n" is 14 bytes, then " IMPRESSION: Small left effusion, see Dr. M" 43: ü is byte 57.
    path.write_bytes(b" FINAL REPORT\n IMPRESSION: Small left effusion, see Dr. M\xfcller.\n")
    with pytest.raises(TextDecodingError) as caught:
        MIMICCXRDataModule(str(root)).records("train")
    assert_names(caught, path, line=2, offset=57)
    train = MIMICCXRDataModule(str(root), text_encoding="latin-1").records("train")
    assert train[0].prompt == "Small left effusion, see Dr. Müller."


def test_mimic_metadata_csv_in_latin_1_is_named_by_line(root):  # noqa: F811
    path = root / "mimic-cxr-2.0.0-metadata.csv"
    text = path.read_bytes()
    lines = text.split(b"\n")
    # Line 3's fourth field, after its dicom_id (44 bytes), subject and study (8 + 8) and 3 commas.
    offset = sum(len(line) + 1 for line in lines[:2]) + 44 + 8 + 8 + 3
    assert lines[2][63:67] == b"CHES"
    lines[2] = lines[2][:63] + b"\xc9" + lines[2][64:]  # "ÉHEST" in Latin-1
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(TextDecodingError) as caught:
        MIMICCXRDataModule(str(root)).records("train")
    assert_names(caught, path, line=3, offset=offset)
    assert len(MIMICCXRDataModule(str(root), text_encoding="latin-1").records("train")) == 3


def test_mimic_csv_with_a_byte_order_mark_is_read(root):  # noqa: F811
    path = root / "mimic-cxr-2.0.0-metadata.csv"
    assert path.read_bytes().startswith(b",".join(c.encode() for c in METADATA_COLUMNS[:2]))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(MIMICCXRDataModule(str(root)).records("train")) == 3


# --- MedVQA-GI ----------------------------------------------------------------------------------


def test_medvqa_prompts_in_latin_1_are_named_by_line_or_read_with_the_setting(tmp_path):
    gi = write_medvqa(tmp_path)
    # "Prompt;Filename\n" is 16 bytes, line 2 37 + 1 + 29 + 1 = 68, then "Generate an image of the c"
    # 26: æ is byte 110, on line 3.
    text = (
        f"Prompt;Filename\nGenerate an image containing a polyp.;{POLYP}\n"
        f"Generate an image of the cæcum.;{CECUM}\n"
    )
    (gi / "prompt-gt.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(TextDecodingError) as caught:
        MedVQAGIDataModule(str(gi)).setup()
    assert_names(caught, gi / "prompt-gt.csv", line=3, offset=110)
    dm = MedVQAGIDataModule(str(gi), val_fraction=0, test_fraction=0, text_encoding="latin-1")
    assert [r.prompt for r in dm.records("train")][1] == "Generate an image of the cæcum."


def test_medvqa_header_and_captions_in_latin_1_are_named(tmp_path):
    gi = write_medvqa(tmp_path)
    (gi / "prompt-gt.csv").write_bytes(b"Pr\xf6mpt;Filename\n")  # ö is byte 2, on line 1
    with pytest.raises(TextDecodingError) as caught:
        MedVQAGIDataModule(str(gi)).setup()
    assert_names(caught, gi / "prompt-gt.csv", line=1, offset=2)

    captions = tmp_path / "kvasir-captions.json"
    captions.write_bytes(json.dumps({"x": {"original": ["caf\u00e9"]}}, ensure_ascii=False).encode("latin-1"))
    # '{"x": {"original": ["caf' is 24 bytes: é is byte 24, on line 1.
    with pytest.raises(TextDecodingError, match=re.escape(f"{captions}: line 1 (byte offset 24)")):
        MedVQAGIDataModule(str(gi), captions=str(captions), prompt_source="captions").setup()
