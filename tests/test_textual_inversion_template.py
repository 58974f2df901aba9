"""A textual-inversion export records the caption template its token was trained in, and `medsd sample`
writes prompts into it unless --prompt-template says otherwise."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from experiments.cli import main as medsd
from experiments.lightning_cli import MedsdCLI
from lightning_modules.export import MANIFEST, read_export_manifest

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "textual_inversion.yaml"
PROMPTS = ["a bright circle on the left", "a bright square on the right"]
# The tiny config's placeholder <shape> (two vectors), in a caption template that does not start with it.
CAPTIONS = "a photo of {placeholder}, {prompt}"
TRAINED = "a photo of <shape>, {prompt}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory) -> Path:
    """A two-step tiny textual-inversion run with the captions written into CAPTIONS."""
    root = tmp_path_factory.mktemp("textual_inversion")
    args = ["fit", "--config", str(CONFIG), "--model.init_args.caption_template", CAPTIONS]
    args += ["--trainer.default_root_dir", str(root), "--trainer.max_steps", "2"]
    MedsdCLI(args=[*args, "--trainer.num_sanity_val_steps", "0"])
    return root


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def sample_args(source, out, prompt_file, *extra: str) -> list[str]:
    fixed = ["--prompts", str(prompt_file), "--seed", "3", "--steps", "2", "--batch-size", "2"]
    return ["sample", str(source), "--out", str(out), *fixed, *extra]


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_the_export_records_the_caption_template_and_the_token_expansion(ti_run):
    manifest = read_export_manifest(ti_run / "export")
    assert manifest["prompt_template"] == TRAINED
    assert manifest["replacements"] == {"<shape>": "<shape> <shape>_1"}


def test_sample_writes_prompts_into_the_recorded_template_unless_told_otherwise(
    ti_run, prompt_file, render_calls, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="experiments.sample")
    medsd(sample_args(ti_run, tmp_path / "recorded", prompt_file))
    assert [t for c in render_calls for t in c.texts] == [f"a photo of <shape>, {p}" for p in PROMPTS]
    medsd(sample_args(ti_run, tmp_path / "explicit", prompt_file, "--prompt-template", TRAINED))
    recorded, explicit = tmp_path / "recorded", tmp_path / "explicit"
    assert image_bytes(recorded) == image_bytes(explicit) and len(image_bytes(recorded)) == 2
    for name in ("manifest.csv", "sample_config.json"):
        assert (recorded / name).read_bytes() == (explicit / name).read_bytes()
    assert json.loads((recorded / "sample_config.json").read_text())["prompt_template"] == TRAINED

    caplog.clear()
    medsd(sample_args(ti_run, tmp_path / "bare", prompt_file, "--prompt-template", "{prompt}"))
    assert [t for c in render_calls for t in c.texts][-2:] == PROMPTS
    bare = image_bytes(tmp_path / "bare")
    assert all(bare[name] != image for name, image in image_bytes(recorded).items())
    notes = {r.levelname: r.getMessage() for r in caplog.records if r.name == "experiments.sample"}
    assert f"'{{prompt}}' replaces '{TRAINED}'" in notes["INFO"]
    assert "no prompt contains the learned token <shape>" in notes["WARNING"]


def test_an_export_that_records_no_template_samples_the_prompts_as_they_are(
    ti_run, prompt_file, render_calls, tmp_path, caplog
):
    """Exports made before the template was recorded: prompts unchanged, and a warning."""
    export = shutil.copytree(ti_run / "export", tmp_path / "export")
    manifest = read_export_manifest(export)
    del manifest["prompt_template"], manifest["replacements"]
    (export / MANIFEST).write_text(json.dumps(manifest))
    medsd(sample_args(export, tmp_path / "out", prompt_file))
    assert [t for c in render_calls for t in c.texts] == PROMPTS
    assert json.loads((tmp_path / "out" / "sample_config.json").read_text())["prompt_template"] == "{prompt}"
    assert any("no prompt contains the learned token" in r.getMessage() for r in caplog.records)
