"""`medsd sample` on a flow-matching model (tiny FLUX): a preset's DDPM sampler gives way to the model's own,
with the preset's steps and guidance; a DDPM sampler asked for by name is refused before anything is written.
(tests/test_sample.py covers how the presets parse.)"""

import json
import logging
from pathlib import Path

import pytest

from experiments.cli import main as medsd
from experiments.lightning_cli import MedsdCLI
from lightning_modules.backbones import TINY_FLUX
from lightning_modules.pipelines import base_pipeline, load_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "flux_lora.yaml"
PROMPTS = ["a bright circle on the left", "a bright square on the right"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory) -> Path:
    """A two-step tiny FLUX LoRA run: its export is a diffusers-lora on medsd/tiny-flux."""
    root = tmp_path_factory.mktemp("flux_lora")
    args = ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root)]
    MedsdCLI(args=[*args, "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"])
    return root


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    """medsd/tiny-flux saved as a plain diffusers folder (no medsd manifest)."""
    folder = tmp_path_factory.mktemp("tiny_flux")
    base_pipeline(TINY_FLUX).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def sample_args(source, out, prompt_file, *extra: str) -> list[str]:
    """Two prompts, one image each, rendered in one batch of 32 x 32 px."""
    fixed = ["--prompts", str(prompt_file), "--seed", "5", "--batch-size", "2"]
    return ["sample", str(source), "--out", str(out), *fixed, "--height", "32", "--width", "32", *extra]


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_a_preset_keeps_the_flow_matching_sampler_with_its_steps_and_guidance(
    flux_run, prompt_file, render_calls, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="experiments.sample")
    medsd(sample_args(flux_run, tmp_path / "preset", prompt_file, "--preset", "roentgen"))
    # RoentGen's preset: PNDM, 75 steps, guidance 4; FLUX keeps its sampler and takes the rest.
    assert [(c.sampler, c.steps, c.guidance) for c in render_calls] == [
        ("FlowMatchEulerDiscreteScheduler", 75, 4.0)
    ]
    notes = [r for r in caplog.records if r.name == "experiments.sample"]
    assert [r.levelno for r in notes] == [logging.INFO]
    words = ("roentgen", "FlowMatchEulerDiscreteScheduler", "pndm")
    assert all(word in notes[0].getMessage() for word in words)
    recorded = json.loads((tmp_path / "preset" / "sample_config.json").read_text())
    assert (recorded["scheduler"], recorded["steps"], recorded["guidance"]) == (None, 75, 4.0)

    # The same as asking for the model's own sampler with those steps and guidance: the same
    # images and the same recorded settings, so either command resumes the other's folder.
    medsd(sample_args(flux_run, tmp_path / "plain", prompt_file, "--steps", "75", "--guidance", "4"))
    assert image_bytes(tmp_path / "plain") == image_bytes(tmp_path / "preset")
    assert len(image_bytes(tmp_path / "preset")) == 2
    settings = [(tmp_path / name / "sample_config.json").read_bytes() for name in ("plain", "preset")]
    assert settings[0] == settings[1]


def test_a_preset_still_swaps_the_sampler_of_a_ddpm_model(prompt_file, render_calls, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="experiments.sample")
    args = ["--preset", "prompt-to-polyp", "--steps", "2"]
    medsd(sample_args("medsd/tiny-sd", tmp_path, prompt_file, *args))
    # tiny-sd ships PNDM; Prompt to Polyp's DDIM replaces it, with the preset's guidance 3.5.
    assert [(c.sampler, c.steps, c.guidance) for c in render_calls] == [("DDIMScheduler", 2, 3.5)]
    assert json.loads((tmp_path / "sample_config.json").read_text())["scheduler"] == "ddim"
    assert not [r for r in caplog.records if r.name == "experiments.sample"]


@pytest.mark.parametrize("flags", [["--scheduler", "ddim"], ["--preset", "roentgen", "--scheduler", "pndm"]])
@pytest.mark.parametrize("source", ["run", "folder"])
def test_a_ddpm_sampler_asked_for_by_name_is_refused_before_anything_is_written(
    source, flags, flux_run, flux_folder, prompt_file, render_calls, tmp_path
):
    out = tmp_path / "out"
    model = flux_run if source == "run" else flux_folder
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler, is a flow-matching one"):
        medsd(sample_args(model, out, prompt_file, *flags))
    assert not out.exists() and render_calls == []


def test_load_pipeline_refuses_a_sampler_for_the_other_kind_of_schedule(flux_folder):
    with pytest.raises(ValueError, match="DDIMScheduler to step through"):
        load_pipeline(flux_folder, scheduler="ddim")
    with pytest.raises(ValueError, match="as able to run the schedule of its sampler, PNDMScheduler"):
        load_pipeline("medsd/tiny-sd", scheduler="FlowMatchEulerDiscreteScheduler")
