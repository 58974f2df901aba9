"""What the package ships (configs, matrices, the demo base model) names no folder of the machine
it was made on."""

import json
import os
from pathlib import Path

import yaml

from experiments.pretrain_demo_base import without_machine_paths

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    *ROOT.glob("experiments/configs/**/*.yaml"),
    *ROOT.glob("experiments/matrices/*.yaml"),
    # Not the tokenizer's vocabulary, whose tokens ("/", "//</w>", ...) are text, not paths.
    *(p for p in ROOT.glob("lightning_modules/demo_base/**/*.json") if p.parent.name != "tokenizer"),
]


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def looks_absolute(text: str) -> bool:
    """`/work/main/runs/x` or `~/models/x`."""
    return (os.path.isabs(text) or text.startswith("~/")) and len(Path(text).parts) > 2


def test_no_shipped_file_holds_an_absolute_path():
    assert len(SHIPPED) > 20
    found = {}
    for path in SHIPPED:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        absolute = [s for s in strings(data) if looks_absolute(s)]
        if absolute:
            found[str(path.relative_to(ROOT))] = absolute[:3]
    assert not found


def test_the_demo_base_copy_records_paths_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "copy" / "vae").mkdir(parents=True)
    manifest = {"base_model": str(tmp_path / "runs" / "vae" / "export"), "global_step": 3}
    (tmp_path / "copy" / "medsd_export.json").write_text(json.dumps(manifest))
    config = {"_name_or_path": str(tmp_path / "runs" / "vae" / "export"), "sample_size": 32}
    (tmp_path / "copy" / "vae" / "config.json").write_text(json.dumps(config))
    without_machine_paths(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "medsd_export.json").read_text()) == {
        "base_model": "runs/vae/export",
        "global_step": 3,
    }
    assert json.loads((tmp_path / "copy" / "vae" / "config.json").read_text()) == {
        "_name_or_path": "runs/vae/export",
        "sample_size": 32,
    }
