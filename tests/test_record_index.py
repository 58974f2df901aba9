"""The record index (datamodules/record_index.py): records built once, read back by later starts.

Every expected value comes from a DataModule built with record_index=False, from the tokenizer
called directly, or from counting by hand; never from the index alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamodules import CSVImageTextDataModule, SyntheticShapesDataModule
from datamodules.base import SPLITS
from datamodules.mimic_cxr import MIMICCXRDataModule
from datamodules.phantoms import write_phantoms
from datamodules.rocov2 import ROCOv2DataModule
from lightning_modules.backbones import build_clip_tokenizer
from lightning_modules.prompts import CHECKED_TEXTS, PromptTokenizer

REPO = Path(__file__).resolve().parents[1]
HOUR_NS = 3600 * 10**9
INDEX_LOGGER = "datamodules.record_index"


# --- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """MIMIC-CXR and ROCOv2 phantoms, written once; tests copy what they change."""
    out = tmp_path_factory.mktemp("phantoms")
    return {
        "mimic": write_phantoms("mimic-cxr", 40, out / "mimic", image_size=16),
        "roco": write_phantoms("rocov2", 30, out / "roco", image_size=16),
    }


def copy_of(source: Path, tmp_path: Path) -> Path:
    """A copy whose files (not folders) keep their times: older than the racy window."""
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def mimic(root: Path, index: Path, **kwargs) -> MIMICCXRDataModule:
    # The reports folder named explicitly: the default location notes `reports/files` (a folder) as a
    # source, which never compares equal (see test_a_folder_source_does_not_rebuild_every_start).
    kwargs.setdefault("reports", str(root / "reports"))
    return MIMICCXRDataModule(str(root), record_index_dir=str(index), image_size=16, **kwargs)


CSV_ROWS = [  # (image, prompt, split)
    ("a.png", "a cat on a mat", "train"),
    ("b.png", "a dog in a fog", "train"),
    ("c.png", "   ", "train"),  # dropped: empty prompt
    ("d.png", "chest x-ray, left effusion", "train"),
    ("b.png", "a dog in a fog", "train"),  # dropped: repeats line 3
    ("e.png", "axial ct of the abdomen", "val"),
    ("f.png", "normal chest x-ray", "val"),
    ("g.png", "mri brain t2", "test"),
    ("h.png", "ultrasound of the liver", "test"),
    ("i.png", "a bird on a wire", "test"),
]


def write_csv_dataset(folder: Path, rows=CSV_ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image, _, _ in rows:
        (folder / image).write_bytes(b"not read by the records")
    csv = folder / "metadata.csv"
    csv.write_text("image,prompt,split\n" + "".join(f'{i},"{p}",{s}\n' for i, p, s in rows))
    age(csv)
    return csv


def age(path: Path, by_ns: int = HOUR_NS) -> int:
    """Set `path`'s modification time back by an hour (out of the racy window); the new time."""
    mtime = path.stat().st_mtime_ns - by_ns
    os.utime(path, ns=(mtime, mtime))
    return mtime


def csv_dm(csv: Path, index: Path, **kwargs) -> CSVImageTextDataModule:
    return CSVImageTextDataModule(
        str(csv), record_index_dir=str(index), empty_prompts="drop", duplicate_rows="drop", **kwargs
    )


def records_of(dm) -> dict[str, list]:
    return {split: dm.records(split) for split in SPLITS}


def dropped_of(dm) -> dict[str, dict[str, int]]:
    return {split: dict(reasons) for split, reasons in dm.dropped.items()}


def index_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == INDEX_LOGGER]


def builds(caplog) -> list[str]:
    return [m for m in index_logs(caplog) if ": built " in m]


def reads(caplog) -> list[str]:
    return [m for m in index_logs(caplog) if ": read " in m]


def build_folders(index: Path) -> list[Path]:
    return sorted(p for p in index.glob("*-*/*") if p.is_dir())


def forbid_building(monkeypatch, cls) -> None:
    def refuse(self, split):
        raise AssertionError(f"{cls.__name__}.load_records called: the index was not read")

    monkeypatch.setattr(cls, "load_records", refuse)


# --- 1, 2: round trip and no rebuild ------------------------------------------------------------


def test_mimic_records_round_trip_with_none_labels_and_meta(phantoms, tmp_path, monkeypatch, caplog):
    index = tmp_path / "index"
    reference = mimic(phantoms["mimic"], index, record_index=False)
    expected = records_of(reference)
    # The phantoms exercise what the index must keep: blank (None) labels, meta, every split, drops.
    assert all(expected[split] for split in SPLITS)
    assert any(v is None for r in expected["train"] for v in r.labels.values())
    assert {1.0, 0.0} <= {v for rs in expected.values() for r in rs for v in r.labels.values()}
    assert all(set(r.meta) == {"dicom_id", "subject_id", "study_id", "view"} for r in expected["train"])
    assert sum(sum(reasons.values()) for reasons in reference.dropped.values()) > 0

    caplog.clear()  # what came before, logged if an earlier test raised medsd's level

    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        first = mimic(phantoms["mimic"], index)
        first.setup()
    assert len(builds(caplog)) == 1
    assert records_of(first) == expected
    assert dropped_of(first) == dropped_of(reference)

    caplog.clear()
    forbid_building(monkeypatch, MIMICCXRDataModule)
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        second = mimic(phantoms["mimic"], index)
        second.setup()
    assert builds(caplog) == [] and len(reads(caplog)) == 1
    got = records_of(second)
    assert got == expected  # per split, in order
    for split in SPLITS:
        assert [r.image for r in got[split]] == [r.image for r in expected[split]]
        for r, e in zip(got[split], expected[split], strict=True):
            assert list(r.labels) == list(e.labels)  # the labeler's column order
            assert all(type(v) is type(w) for v, w in zip(r.labels.values(), e.labels.values(), strict=True))
    assert dropped_of(second) == dropped_of(reference)  # replayed from the manifest


def test_csv_records_without_labels_round_trip_and_drops_replay(tmp_path, monkeypatch, caplog):
    csv = write_csv_dataset(tmp_path / "data")
    index = tmp_path / "index"
    reference = csv_dm(csv, index, record_index=False)
    expected = records_of(reference)
    # By hand: 10 rows, an empty prompt and a repeated row dropped from train.
    assert [len(expected[s]) for s in SPLITS] == [3, 2, 3]
    assert [r.prompt for r in expected["test"]] == [
        "mri brain t2",
        "ultrasound of the liver",
        "a bird on a wire",
    ]
    assert all(r.labels is None and r.meta is None for rs in expected.values() for r in rs)
    assert {s: sum(d.values()) for s, d in dropped_of(reference).items()} == {"train": 2, "val": 0, "test": 0}

    csv_dm(csv, index).setup()
    forbid_building(monkeypatch, CSVImageTextDataModule)
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        second = csv_dm(csv, index)
        second.setup()
    assert builds(caplog) == [] and len(reads(caplog)) == 1
    got = records_of(second)
    assert got == expected
    assert all(r.labels is None and r.meta is None for rs in got.values() for r in rs)
    assert dropped_of(second) == dropped_of(reference)


def test_rocov2_records_round_trip(phantoms, tmp_path):
    index = tmp_path / "index"
    reference = ROCOv2DataModule(str(phantoms["roco"]), record_index=False, image_size=16)
    expected = records_of(reference)
    assert all(expected[split] for split in SPLITS)
    assert all(r.labels is None and r.meta for rs in expected.values() for r in rs)
    ROCOv2DataModule(str(phantoms["roco"]), record_index_dir=str(index), image_size=16).setup()
    second = ROCOv2DataModule(str(phantoms["roco"]), record_index_dir=str(index), image_size=16)
    assert records_of(second) == expected
    assert dropped_of(second) == dropped_of(reference)


@pytest.mark.parametrize("dataset", ["mimic-default-reports", "rocov2"])
def test_a_folder_source_does_not_rebuild_every_start(dataset, phantoms, tmp_path, monkeypatch, caplog):
    index = tmp_path / "index"
    if dataset == "rocov2":
        cls = ROCOv2DataModule

        def make():
            return ROCOv2DataModule(str(phantoms["roco"]), record_index_dir=str(index), image_size=16)
    else:
        cls = MIMICCXRDataModule

        def make():
            return MIMICCXRDataModule(str(phantoms["mimic"]), record_index_dir=str(index), image_size=16)

    expected = records_of(make())
    forbid_building(monkeypatch, cls)
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        second = make()
        second.setup()
    assert builds(caplog) == [] and "changed" not in " ".join(index_logs(caplog))
    assert records_of(second) == expected


# --- 3: what changes rebuild ----------------------------------------------------------------------


def test_a_table_rewritten_with_its_size_and_time_rebuilds(tmp_path, caplog):
    csv = write_csv_dataset(tmp_path / "data")
    index = tmp_path / "index"
    assert csv_dm(csv, index).records("train")[0].prompt == "a cat on a mat"
    stat = csv.stat()
    text = csv.read_text()
    csv.write_text(text.replace("a cat on a mat", "a rat on a mat"))
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (csv.stat().st_size, csv.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    caplog.clear()  # what came before, logged if an earlier test raised medsd's level

    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        second = csv_dm(csv, index)
        prompts = [r.prompt for r in second.records("train")]
    assert prompts == ["a rat on a mat", "a dog in a fog", "chest x-ray, left effusion"]
    assert len(builds(caplog)) == 1 and reads(caplog) == []
    assert any(str(csv) in m and "rebuilding" in m for m in index_logs(caplog))


def test_an_unchanged_dataset_logs_a_read_not_a_build(phantoms, tmp_path, caplog):
    root = copy_of(phantoms["mimic"], tmp_path)
    mimic(root, tmp_path / "index").setup()
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        mimic(root, tmp_path / "index").setup()
    assert builds(caplog) == [] and len(reads(caplog)) == 1
    assert not any("rebuilding" in m or "building" in m for m in index_logs(caplog))


def kept_report(dm: MIMICCXRDataModule, root: Path, split: str = "train") -> Path:
    meta = dm.records(split)[0].meta
    sid = meta["subject_id"]
    return root / "reports" / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{meta['study_id']}.txt"


def test_a_report_of_another_size_rebuilds(phantoms, tmp_path, caplog):
    root = copy_of(phantoms["mimic"], tmp_path)
    index = tmp_path / "index"
    report = kept_report(mimic(root, index), root)
    assert report.is_file()
    mtime = report.stat().st_mtime_ns
    text = report.read_text()
    assert "IMPRESSION:" in text
    report.write_text(text.rstrip() + " Added sentence.\n")
    os.utime(report, ns=(mtime, mtime))  # its time alone would not tell

    caplog.clear()  # what came before, logged if an earlier test raised medsd's level

    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        second = mimic(root, index)
        second.setup()
    assert len(builds(caplog)) == 1 and reads(caplog) == []
    assert any(str(report) in m and "changed size" in m for m in index_logs(caplog))
    assert records_of(second) == records_of(mimic(root, index, record_index=False))
    assert second.records("train")[0].prompt.endswith("Added sentence.")


def test_a_report_that_appears_rebuilds(phantoms, tmp_path, caplog):
    root = copy_of(phantoms["mimic"], tmp_path)
    index = tmp_path / "index"
    report = kept_report(mimic(root, index, record_index=False), root)
    saved = report.read_bytes()
    report.unlink()
    first = mimic(root, index)
    n_first = sum(len(first.records(s)) for s in SPLITS)
    assert first.dropped["train"]["no report"] >= 1

    report.write_bytes(saved)
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        second = mimic(root, index)
        second.setup()
    assert len(builds(caplog)) == 1
    assert any(str(report) in m and "appeared" in m for m in index_logs(caplog))
    assert sum(len(second.records(s)) for s in SPLITS) > n_first
    reference = mimic(root, index, record_index=False)
    assert records_of(second) == records_of(reference)
    assert dropped_of(second) == dropped_of(reference)


# --- 4: which settings share an index -------------------------------------------------------------


def test_record_settings_choose_the_folder_batch_settings_do_not(phantoms, tmp_path, monkeypatch, caplog):
    index = tmp_path / "index"
    mimic(phantoms["mimic"], index).setup()
    assert len(list(index.iterdir())) == 1

    caplog.clear()  # what came before, logged if an earlier test raised medsd's level

    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        pa_only = mimic(phantoms["mimic"], index, views=["PA"])
        pa_only.setup()
    assert len(builds(caplog)) == 1
    assert len([p for p in index.iterdir() if p.is_dir()]) == 2
    views = {r.meta["view"] for rs in records_of(pa_only).values() for r in rs}
    assert views == {"PA"}
    assert records_of(pa_only) == records_of(
        mimic(phantoms["mimic"], index, views=["PA"], record_index=False)
    )

    caplog.clear()
    forbid_building(monkeypatch, MIMICCXRDataModule)
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        batched = MIMICCXRDataModule(
            str(phantoms["mimic"]),
            reports=str(phantoms["mimic"] / "reports"),
            record_index_dir=str(index),
            image_size=64,
            batch_size=8,
            num_workers=2,
        )
        batched.setup()
    assert builds(caplog) == [] and len(reads(caplog)) == 1
    assert len([p for p in index.iterdir() if p.is_dir()]) == 2
    assert {r.meta["view"] for rs in records_of(batched).values() for r in rs} == {"PA", "AP"}


# --- 5: what writes nothing -----------------------------------------------------------------------


def test_record_index_false_writes_nothing(phantoms, tmp_path):
    index = tmp_path / "index"
    dm = mimic(phantoms["mimic"], index, record_index=False)
    dm.prepare_data()
    dm.setup()
    assert dm.records("train")
    assert not index.exists()


def test_an_in_memory_datamodule_writes_nothing(tmp_path):
    index = tmp_path / "index"
    dm = SyntheticShapesDataModule(n_train=4, n_val=2, record_index_dir=str(index))
    dm.prepare_data()
    dm.setup()
    assert len(dm.records("train")) == 4
    assert not index.exists() or not any(index.rglob("*"))


# --- 6: several processes -------------------------------------------------------------------------

CHILD = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from datamodules import CSVImageTextDataModule
source, index, go, mode = sys.argv[1:5]
real = CSVImageTextDataModule.load_records
def slow(self, split):  # a build long enough for the other process to meet it
    time.sleep(1.0)
    return real(self, split)
CSVImageTextDataModule.load_records = slow
open(go + "." + str(os.getpid()), "w").close()  # imported: ready at the start line
while not os.path.exists(go):
    time.sleep(0.005)
dm = CSVImageTextDataModule(source, record_index_dir=index, empty_prompts="drop", duplicate_rows="drop")
getattr(dm, mode)()
print(json.dumps({s: [[r.image, r.prompt] for r in dm.records(s)] for s in ("train", "val", "test")}))
"""


def child(csv: Path, index: Path, go: Path, mode: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(csv), str(index), str(go), mode],
        cwd=os.getcwd(),  # the index's key includes the working folder
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[dict, str]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def as_lists(records: dict[str, list]) -> dict[str, list[list[str]]]:
    return {split: [[r.image, r.prompt] for r in rs] for split, rs in records.items()}


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> dict:
    """The child processes of both tests below, started together (each spends most of its time
    importing Lightning): two setting up one DataModule on a fresh index at once ("race"), and one
    setting up a DataModule whose index this process built with prepare_data ("prepared")."""
    base = tmp_path_factory.mktemp("processes")
    runs = {
        name: {"csv": write_csv_dataset(base / name), "index": base / name / "index"}
        for name in ("race", "prepared")
    }
    prepared = runs["prepared"]
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(INDEX_LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        csv_dm(prepared["csv"], prepared["index"]).prepare_data()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    prepared["parent_log"] = messages
    (base / "go-prepared").touch()  # not held back
    race = runs["race"]
    started = [child(race["csv"], race["index"], base / "go-race", "setup") for _ in range(2)]
    started.append(child(prepared["csv"], prepared["index"], base / "go-prepared", "setup"))
    deadline = time.monotonic() + 120
    while len(list(base.glob("go-race.*"))) < 2 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in started), [p.communicate() for p in started]
        time.sleep(0.02)
    (base / "go-race").touch()  # both imported and waiting: let go at once
    results = [finish(p) for p in started]
    race["results"], prepared["results"] = results[:2], results[2:]
    return runs


def test_two_processes_at_once_build_once_and_agree(processes):
    race = processes["race"]
    (a, log_a), (b, log_b) = race["results"]
    logs = log_a + log_b
    assert logs.count("none yet for these settings") == 2, logs  # both found no index
    assert len([line for line in logs.splitlines() if ": built " in line]) == 1, logs
    assert "waiting for it" in logs, logs  # one met the other's lock
    assert len(build_folders(race["index"])) == 1
    assert a == b == as_lists(records_of(csv_dm(race["csv"], race["index"], record_index=False)))


def test_prepare_data_in_one_process_then_setup_in_another_reads(processes):
    prepared = processes["prepared"]
    assert len([m for m in prepared["parent_log"] if ": built " in m]) == 1
    ((records, log),) = prepared["results"]
    assert ": built " not in log and ": read " in log, log
    assert records == as_lists(records_of(csv_dm(prepared["csv"], prepared["index"], record_index=False)))


# --- 7, 8: token lengths --------------------------------------------------------------------------


def test_prompt_lengths_are_the_tokenizers_and_are_counted_once(phantoms, tmp_path, monkeypatch):
    clip = build_clip_tokenizer()
    index = tmp_path / "index"
    calls = []
    real = PromptTokenizer.lengths

    def counting(self, prompts):
        calls.append(len(prompts))
        return real(self, prompts)

    monkeypatch.setattr(PromptTokenizer, "lengths", counting)

    first = mimic(phantoms["mimic"], index)
    first.tokenizer = PromptTokenizer(clip)
    expected = {}
    for split in SPLITS:
        prompts = [r.prompt for r in first.records(split)]
        expected[split] = [len(ids) for ids in clip(prompts, truncation=False)["input_ids"]]
        assert first.prompt_lengths(split) == expected[split]
    assert calls == [sum(len(first.records(s)) for s in SPLITS)]  # once, for every split together
    assert len(set(expected["train"])) > 1
    assert list(first._index_build.glob("tokens-*.arrow"))

    calls.clear()
    second = mimic(phantoms["mimic"], index)
    second.tokenizer = PromptTokenizer(build_clip_tokenizer())
    assert {s: second.prompt_lengths(s) for s in SPLITS} == expected
    assert calls == []


def varied_texts() -> list[str]:
    findings = ["effusion", "pneumothorax", "cardiomegaly", "edema", "atelectasis", "consolidation"]
    sides = ["left", "right", "bilateral"]
    texts = []
    for i in range(700):
        text = (
            f"{sides[i % 3]} {findings[i % 6]} of {i % 17 + 1} cm, grade {i % 4}: "
            f"{'no change since 2019-0' + str(i % 9) if i % 2 else 'new; compared with prior.'}"
        )
        if i % 5 == 0:
            text = text.upper() + "!!"
        if i % 7 == 0:
            text = "  " + text.replace(" ", "\t", 2) + "\n"
        if i % 11 == 0:
            text += " (see report #" + str(i * 37) + ")"
        texts.append(text)
    texts += [
        "épanchement pleural gauche",
        "Pleuraerguss rechts, Größe 3 cm",
        "胸水 right side",
        "naïve café-au-lait lesion",
        "hyperinflated lungs — no focal consolidation",
        "",
        "x",
        "l'épaule droite",
    ] * 3
    texts += texts[:60]  # repeated texts
    return texts


def test_lengths_by_words_equal_whole_texts_with_a_template():
    clip = build_clip_tokenizer()
    texts = varied_texts()
    assert len(texts) >= 600
    assert len({t for t in texts if t.isascii()}) >= CHECKED_TEXTS  # the by-words path
    for template in ("{prompt}", "a photo of <x>, {prompt} -- 2024"):
        tokenizer = PromptTokenizer(clip, template=template)
        expanded = [template.format(prompt=t) for t in texts]
        expected = [len(ids) for ids in clip(expanded, truncation=False)["input_ids"]]
        assert tokenizer.lengths(texts) == expected


class ContextTokenizer:
    """A stand-in tokenizer whose counts depend on context: 2 special tokens, one per word, and one
    more for every 3 words of a text. Counting word by word misses the last."""

    model_max_length = 77

    def __call__(self, texts, truncation=False, verbose=False):
        return {"input_ids": [[0] * self.count(t) for t in texts]}

    @staticmethod
    def count(text: str) -> int:
        n = len(text.split())
        return 2 + n + n // 3


def test_lengths_fall_back_to_whole_texts_when_words_disagree(caplog):
    texts = varied_texts()
    tokenizer = PromptTokenizer(ContextTokenizer())
    caplog.clear()  # what came before, logged if an earlier test raised medsd's level
    with caplog.at_level(logging.INFO, "lightning_modules.prompts"):
        got = tokenizer.lengths(texts)
    assert got == [ContextTokenizer.count(t) for t in texts]
    assert any("differs" in r.getMessage() for r in caplog.records)


# --- 9: a build that dies -------------------------------------------------------------------------


def killed(*args):
    raise RuntimeError("killed mid-build")


@pytest.mark.parametrize("dies_in", ["load_records", "sources_table"])
def test_a_build_that_dies_leaves_no_current_and_the_next_start_builds(
    dies_in, tmp_path, monkeypatch, caplog
):
    """Dying while the records are built (nothing written yet), or while the build is written (its
    scratch folder is left behind): no `current`, and the next start builds and clears the scratch."""
    import datamodules.record_index as record_index

    csv = write_csv_dataset(tmp_path / "data")
    index = tmp_path / "index"
    with monkeypatch.context() as patch:
        if dies_in == "load_records":
            patch.setattr(CSVImageTextDataModule, "load_records", killed)
        else:
            patch.setattr(record_index, "sources_table", killed)
        with pytest.raises(RuntimeError, match="killed mid-build"):
            csv_dm(csv, index).setup()
    assert not list(index.glob("*/current"))
    left = build_folders(index)
    assert len(left) == (dies_in == "sources_table")  # only the dead build's scratch `.<build>`
    assert all(p.name.startswith(".") and not (p / "sources.arrow").exists() for p in left)

    caplog.clear()  # what came before, logged if an earlier test raised medsd's level

    with caplog.at_level(logging.INFO, INDEX_LOGGER):
        dm = csv_dm(csv, index)
        dm.setup()
    assert len(builds(caplog)) == 1
    assert records_of(dm) == records_of(csv_dm(csv, index, record_index=False))
    (current,) = index.glob("*/current")
    assert [p.name for p in build_folders(index)] == [current.read_text().strip()]


def test_an_unwritable_index_folder_builds_without_it(tmp_path, caplog):
    csv = write_csv_dataset(tmp_path / "data")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the index folder would go")
    expected = records_of(csv_dm(csv, tmp_path / "index", record_index=False))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = records_of(csv_dm(csv, blocked / "index"))
    assert got == expected
    assert any("cannot be written" in r.getMessage() for r in caplog.records)
