"""Phantom datasets: exact official layouts, text consistent with the pixels, determinism, and
findings a small classifier can learn (so they are really visible, on the side the text says)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from datamodules.phantoms import LAYOUTS, write_phantoms
from datamodules.phantoms.chest import SIZES, ChestFindings, draw_chest, sample_findings
from datamodules.phantoms.mimic import LABELS, METADATA_COLUMNS

pytestmark = pytest.mark.slow

SECTION = re.compile(r"\n ([A-Z ()/,-]+):\s")  # the official MIMIC-CXR section splitter's pattern


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    return write_phantoms("mimic-cxr", 200, tmp_path_factory.mktemp("p") / "mimic", seed=0)


@pytest.fixture(scope="module")
def gi(tmp_path_factory) -> Path:
    return write_phantoms("medvqa-gi", 60, tmp_path_factory.mktemp("p") / "gi", seed=0)


@pytest.fixture(scope="module")
def roco(tmp_path_factory) -> Path:
    return write_phantoms("rocov2", 60, tmp_path_factory.mktemp("p") / "roco", seed=0)


def truth_of(out: Path) -> pd.DataFrame:
    """The truth file, blanks as "" (booleans still read as booleans)."""
    return pd.read_csv(out / "phantom_truth.csv", keep_default_na=False)


def flat(text: str) -> str:
    """Report text with line breaks and runs of spaces folded, lower-cased, for phrase checks."""
    return " ".join(text.split()).lower()


def test_mimic_files_ids_and_metadata(mimic):
    meta = pd.read_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns) == list(METADATA_COLUMNS) and len(meta) == 200
    assert meta.dicom_id.str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all() and meta.dicom_id.is_unique
    assert meta.subject_id.astype(str).str.fullmatch(r"1\d{7}").all()
    assert meta.study_id.astype(str).str.fullmatch(r"5\d{7}").all()
    assert (
        meta.StudyDate.astype(str).str.fullmatch(r"21\d{6}").all() and meta.StudyTime.between(0, 235960).all()
    )
    assert set(meta.ViewPosition.dropna()) == {"PA", "AP", "LATERAL"} and meta.ViewPosition.isna().any()
    per_study = meta.groupby("study_id").size()
    assert (per_study == 2).mean() > 0.5 and (per_study == 1).any()
    assert (meta.groupby("subject_id").study_id.nunique() > 1).any()
    for row in meta.itertuples():
        patient = f"p{row.subject_id}"
        path = mimic / "files" / patient[:3] / patient / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (row.Columns, row.Rows)
    assert len(list((mimic / "files").rglob("*.jpg"))) == len(meta)
    for study in meta.drop_duplicates("study_id").itertuples():
        patient = f"p{study.subject_id}"
        assert (mimic / "reports" / "files" / patient[:3] / patient / f"s{study.study_id}.txt").is_file()


def test_mimic_splits_and_label_files(mimic):
    meta = pd.read_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = pd.read_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split.dicom_id) == set(meta.dicom_id) and set(split.split) == {"train", "validate", "test"}
    assert (split.groupby("subject_id").split.nunique() == 1).all()  # by patient
    per_subject = split.drop_duplicates("subject_id").split.value_counts(normalize=True)
    assert 0.7 < per_subject["train"] < 0.9
    for name in ("chexpert", "negbio"):
        labels = pd.read_csv(mimic / f"mimic-cxr-2.0.0-{name}.csv.gz")
        assert list(labels.columns) == ["subject_id", "study_id", *LABELS]
        assert labels.study_id.is_unique and set(labels.study_id) == set(meta.study_id)
        values = labels[list(LABELS)].to_numpy().ravel()
        assert set(values[~np.isnan(values)]) == {1.0, 0.0, -1.0} and np.isnan(values).any()  # blanks too


def test_mimic_reports_and_labels_match_what_is_drawn(mimic):
    truth = truth_of(mimic).drop_duplicates("study_id")
    labels = pd.read_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz").set_index("study_id")
    negbio = pd.read_csv(mimic / "mimic-cxr-2.0.0-negbio.csv.gz").set_index("study_id")
    pd.testing.assert_frame_equal(labels, negbio)
    for row in truth.itertuples():
        text, lab = flat((mimic / row.report).read_text()), labels.loc[row.study_id]
        certain = {s: getattr(row, f"effusion_{s}") and not row.effusion_uncertain for s in ("left", "right")}
        for side in ("left", "right"):
            said = f"{side} pleural effusion" in text or "bilateral pleural effusions" in text
            assert said == bool(certain[side]), (side, text)
            hedged = re.search(rf"possible small {side} effusion|small {side} effusion cannot", text)
            assert bool(hedged) == (row.effusion_uncertain and bool(getattr(row, f"effusion_{side}")))
            if certain[side]:
                assert re.search(rf"{getattr(row, f'effusion_{side}')} ({side}|bilateral) pleural", text)
        any_effusion = bool(row.effusion_left or row.effusion_right)
        assert ("no pleural effusion" in text) == (not any_effusion)
        expected = -1.0 if row.effusion_uncertain else 1.0 if any_effusion else 0.0
        assert lab["Pleural Effusion"] == expected
        assert ("no pneumothorax" in text) == (not row.pneumothorax)
        assert (f"{row.pneumothorax} apical pneumothorax" in text) == bool(row.pneumothorax)
        assert lab["Pneumothorax"] == (1.0 if row.pneumothorax else 0.0)
        assert ("cardiomegaly" in text) == (row.cardiomegaly)
        assert ("heart size is normal" in text) == (not row.cardiomegaly)
        assert lab["Cardiomegaly"] == (1.0 if row.cardiomegaly else 0.0)
        nodule = f"nodule in the {row.nodule} {row.nodule_lobe} lobe"
        assert (nodule in text) == bool(row.nodule) and ("nodule" in text) == bool(row.nodule)
        assert lab["Lung Lesion"] == 1.0 if row.nodule else np.isnan(lab["Lung Lesion"])
        for device in ("endotracheal tube", "enteric tube", "right PICC line", "pacemaker"):
            assert (device.lower() in text) == (device in row.devices.split(";"))
        assert lab["Support Devices"] == 1.0 if row.devices else np.isnan(lab["Support Devices"])
        normal = not (any_effusion or row.pneumothorax or row.cardiomegaly or row.nodule)
        assert lab["No Finding"] == 1.0 if normal else np.isnan(lab["No Finding"])


def test_mimic_report_sections_and_long_impressions(mimic):
    from lightning_modules.backbones import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(max_length=10_000)
    truth = truth_of(mimic).drop_duplicates("study_id")
    assert set(truth.report_style) == {"impression", "conclusion", "none"}
    for row in truth.itertuples():
        text = (mimic / row.report).read_text()
        assert all(line.startswith(" ") for line in text.splitlines())
        parts = SECTION.split(text)  # [preamble, name, body, name, body, ...]
        sections = dict(zip(parts[1::2], parts[2::2], strict=True))
        if row.report_style == "none":
            assert not sections
            continue
        summary = sections.pop(row.report_style.upper())
        assert list(sections) == ["EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON", "FINDINGS"]
        tokens = len(tokenizer(flat(summary)).input_ids)
        assert (tokens > 77) == (row.long_impression), (tokens, summary)
    assert 0.07 < (truth.long_impression).mean() < 0.25


def test_left_means_the_patients_left_on_the_images_right():
    def diff(**findings) -> np.ndarray:
        drawn = np.asarray(draw_chest(ChestFindings(**findings), "PA", 128, seed=3), dtype=np.float32)
        return drawn - np.asarray(draw_chest(ChestFindings(), "PA", 128, seed=3), dtype=np.float32)

    for finding in (
        {"effusion_left": "moderate"},
        {"nodule": "left", "nodule_mm": 25},
        {"pneumothorax": "left"},
    ):
        change = np.abs(diff(**finding))
        assert change[:, 64:].sum() > 5 * change[:, :64].sum(), finding
    heart = diff(cardiomegaly=True)  # a bigger heart covers more of the (image-right) left lung
    assert heart[:, 64:].sum() > heart[:, :64].sum() > 0


def test_findings_are_validated():
    with pytest.raises(ValueError):
        ChestFindings(effusion_left="huge")
    with pytest.raises(ValueError):
        ChestFindings(effusion_left="moderate", effusion_uncertain=True)
    with pytest.raises(ValueError):
        draw_chest(ChestFindings(), view="oblique")
    with pytest.raises(ValueError):
        write_phantoms("chexpert", 3, "unused")


def test_medvqa_gi_layout_and_prompts(gi):
    assert (gi / "prompt-gt.csv").read_text().splitlines()[0] == "Prompt;Filename"
    prompts = pd.read_csv(gi / "prompt-gt.csv", sep=";")
    truth = truth_of(gi).set_index("path")
    assert truth.image_id.str.fullmatch(r"[a-z0-9]{25}").all()
    assert prompts.Filename.str.fullmatch(r"[a-z0-9]{25}\.jpg").all()
    assert set(prompts.Filename) == {p.name for p in (gi / "images").iterdir()} == set(truth.index.str[7:])
    assert prompts.groupby("Filename").size().between(5, 10).all()
    assert (prompts.Prompt == "Generate an an image containing a polyp.").any()  # the original's quirk
    for name, group in prompts.groupby("Filename"):
        row, said = truth.loc[f"images/{name}"], " | ".join(group.Prompt).lower()
        # Each image gets a random subset of the true prompts: check that each one said is true.
        assert ("no polyps" in said or "without polyps" in said) <= (row.n_polyps == 0)
        assert ("containing a polyp" in said or "with a polyp" in said) <= (row.n_polyps > 0)
        for count in re.findall(r"with (\d) polyp", said):
            assert int(count) == row.n_polyps
        assert set(re.findall(r"polyp of size (\S+?)\.", said)) <= set(row.polyp_sizes.split(";"))
        assert set(re.findall(r"located in the (\S+) of", said)) <= set(row.polyp_locations.split(";"))
        tool = re.search(r"containing an instrument|with an instrument|and an instrument", said)
        assert not (tool and "no instruments" in said) and (bool(tool) <= (row.instrument))
        with Image.open(gi / "images" / name) as img:
            assert img.mode == "RGB" and img.size == (row.width, row.height)
    assert truth[["width", "height"]].drop_duplicates().shape[0] > 1 and (truth.width != truth.height).all()
    captions = json.loads((gi / "kvasir-captions.json").read_text())
    assert set(captions) == set(truth.image_id)
    for row in truth.itertuples():
        text = " ".join(captions[row.image_id]["captions"]).lower()
        assert ("no polyps" in text) == (row.n_polyps == 0) and ("instrument is visible" in text) == (
            row.instrument
        )
        assert all(size in text for size in row.polyp_sizes.split(";"))


def test_rocov2_layout_and_captions(roco):
    truth = truth_of(roco).set_index("ID")
    mapping = pd.read_csv(roco / "cui_mapping.csv")
    assert list(mapping.columns) == ["CUI", "Canonical name"]
    names = dict(zip(mapping.CUI, mapping["Canonical name"], strict=True))
    assert names["C0040405"] == "X-Ray Computed Tomography" and names["C1306645"] == "Plain x-ray"
    modalities = {"C0040405", "C1306645", "C0024485", "C0041618"}
    license_info = pd.read_csv(roco / "license_information.csv")
    assert list(license_info.columns) == ["ID", "PMCID", "Attribution", "Link"]
    assert set(license_info.ID) == set(truth.index)
    for split, count in zip(("train", "valid", "test"), (48, 6, 6), strict=True):
        ids = sorted(p.stem for p in (roco / split).iterdir())
        assert ids == [f"ROCOv2_2023_{split}_{i:06d}" for i in range(1, count + 1)]
        captions = pd.read_csv(roco / f"{split}_captions.csv")
        assert list(captions.columns) == ["ID", "Caption"] and list(captions.ID) == ids
        for kind in ("concepts", "concepts_manual"):
            concepts = pd.read_csv(roco / f"{split}_{kind}.csv")
            assert list(concepts.columns) == ["ID", "CUIs"] and list(concepts.ID) == ids
            cuis = concepts.CUIs.str.split(";")
            assert all(set(c) <= set(names) for c in cuis)
            if kind == "concepts_manual":
                assert all(c[0] in modalities for c in cuis)
        for row in captions.itertuples():
            scan, text = truth.loc[row.ID], row.Caption.lower()
            assert bool(re.search(r"lesion|effusion|cyst", text)) == (scan.finding), text
            if scan.side:
                assert scan.side in text and ({"left", "right"} - {scan.side}).pop() not in text


def test_same_seed_same_bytes(tmp_path):
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    for layout in LAYOUTS:
        first = files(write_phantoms(layout, 8, tmp_path / f"{layout}-a", seed=7, image_size=48))
        assert first == files(write_phantoms(layout, 8, tmp_path / f"{layout}-b", seed=7, image_size=48))
        other = files(write_phantoms(layout, 8, tmp_path / f"{layout}-c", seed=8, image_size=48))
        assert other["phantom_truth.csv"] != first["phantom_truth.csv"]


def test_output_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        write_phantoms("rocov2", 2, tmp_path / "taken")

    def crash(out, n, seed, size):
        (out / "half.csv").write_text("partial")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(LAYOUTS, "rocov2", (crash, 32))
    with pytest.raises(RuntimeError):
        write_phantoms("rocov2", 2, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def accuracy(images: np.ndarray, labels: np.ndarray, anywhere: bool) -> float:
    """Test accuracy of a tiny CNN trained on the first 200 images, tested on the rest.
    anywhere: pool over the whole image (a polyp can be anywhere), else keep where things are."""
    torch.manual_seed(0)
    x = torch.tensor(images, dtype=torch.float32)
    x = (x - x[:200].mean()) / x[:200].std()
    y = torch.tensor(labels, dtype=torch.float32)

    def conv(channels: int) -> list[nn.Module]:
        return [nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    head = (
        [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 1)]
        if anywhere
        else [nn.Flatten(), nn.LazyLinear(1)]
    )
    net = nn.Sequential(*conv(x.shape[1]), *conv(16), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), *head)
    net(x[:1])  # materialises the lazy layer before the optimizer sees the parameters
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        for batch in torch.randperm(200).split(20):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x[batch]).squeeze(1), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return ((net(x[200:]).squeeze(1) > 0) == y[200:].bool()).float().mean().item()


def test_a_small_cnn_learns_effusions_and_their_side(tmp_path):
    out = write_phantoms("mimic-cxr", 520, tmp_path / "cxr", seed=1, image_size=128)
    truth = truth_of(out)
    frontal = truth[truth.view != "LATERAL"].iloc[:300]

    def load(path: str) -> np.ndarray:  # the square middle of the image, at 64 px
        with Image.open(out / path) as img:
            w, h = img.size
            img = img.crop((0, (h - w) // 2, w, (h - w) // 2 + w)).resize((64, 64), Image.BILINEAR)
            return np.asarray(img, dtype=np.float32)[None] / 255

    images = np.stack([load(p) for p in frontal.path])
    present = ((frontal.effusion_left != "") | (frontal.effusion_right != "")).to_numpy()
    assert 0.25 < present.mean() < 0.55
    assert accuracy(images, present, anywhere=False) >= 0.9

    rng, images, left = np.random.default_rng(2), [], []
    for i in range(300):  # one effusion each, on a random side, among other random findings
        side, size = rng.choice(["left", "right"]), SIZES[rng.integers(3)]
        sizes = {
            "effusion_left": size if side == "left" else None,
            "effusion_right": size if side == "right" else None,
        }
        findings = replace(sample_findings(rng), effusion_uncertain=False, **sizes)
        view = str(rng.choice(["PA", "AP"]))
        images.append(np.asarray(draw_chest(findings, view, 64, seed=i), dtype=np.float32)[None] / 255)
        left.append(side == "left")
    assert accuracy(np.stack(images), np.array(left), anywhere=False) >= 0.9


def test_a_small_cnn_learns_polyps(tmp_path):
    out = write_phantoms("medvqa-gi", 300, tmp_path / "gi", seed=1, image_size=128)
    truth = truth_of(out)

    def load(path: str) -> np.ndarray:
        with Image.open(out / path) as img:
            return np.asarray(img.resize((64, 64), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255

    has_polyp = (truth.n_polyps > 0).to_numpy()
    assert 0.5 < has_polyp.mean() < 0.85
    assert accuracy(np.stack([load(p) for p in truth.path]), has_polyp, anywhere=True) >= 0.9
