"""`medsd sample`: every export kind samples, reruns are bit-identical, interrupted runs resume,
ranks share the work exactly, and the manifest says exactly what was made."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

import experiments.sample as sample_module
from datamodules.base import Record
from datamodules.phantoms import write_phantoms
from evaluation.sample_folder import read_manifest
from experiments.cli import main as medsd
from experiments.lightning_cli import MedsdCLI, build_datamodule
from experiments.sample import (
    Prompt,
    build_parser,
    plan,
    prompts_from_records,
    sampler_settings,
    shard,
)
from lightning_modules import load_domain_text_pipeline
from lightning_modules.backbones import TINY_SD
from lightning_modules.cost import count_flops
from lightning_modules.domain_text_pipeline import DomainTextPipeline
from lightning_modules.pipelines import base_pipeline, load_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny"
KINDS = ["unet", "lora", "textual_inversion", "domain_text_encoder"]
PROMPTS = ["a bright circle on the left", "a bright square on the right"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One two-step tiny run per export kind: name -> run folder."""
    folders = {}
    for name in KINDS:
        root = tmp_path_factory.mktemp(name)
        args = ["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.default_root_dir", str(root)]
        MedsdCLI(args=[*args, "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"])
        folders[name] = root
    return folders


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n\n   \n  {PROMPTS[1]}  \n")  # blank lines and padding dropped
    return path


def sample_args(source, out, prompt_file, *extra: str) -> list[str]:
    """The arguments every folder of these tests shares, unless a test overrides them."""
    fixed = ["--prompts", str(prompt_file), "--per-prompt", "2", "--seed", "7", "--steps", "2"]
    return ["sample", str(source), "--out", str(out), *fixed, "--batch-size", "1", *extra]


@pytest.fixture(scope="module")
def reference(runs, prompt_file, tmp_path_factory) -> Path:
    """An uninterrupted single-process folder from the LoRA run."""
    out = tmp_path_factory.mktemp("reference")
    medsd(sample_args(runs["lora"], out, prompt_file))
    return out


RENDER = sample_module.render  # the real one, taken before any test patches it


class CountingRender:
    """Stands in for `render`: counts the images asked for, and can fail after `fail_after` calls."""

    def __init__(self, fail_after: int | None = None):
        self.images, self.calls, self.fail_after = 0, 0, fail_after

    def __call__(self, pipe, prompts, seeds, *args):
        if self.calls == self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.images += len(prompts)
        return RENDER(pipe, prompts, seeds, *args)


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_load_pipeline_reads_each_export_kind(runs):
    unet = load_pipeline(runs["unet"] / "export")
    assert isinstance(unet, StableDiffusionPipeline)
    assert not torch.equal(unet.unet.conv_in.weight, base_pipeline(TINY_SD).unet.conv_in.weight)
    lora = load_pipeline(runs["lora"])  # a run folder stands for its export
    assert lora.get_active_adapters() == ["lora_0"]
    ti = load_pipeline(runs["textual_inversion"], scheduler="dpm++")
    assert ti.tokenizer.convert_tokens_to_ids("<shape>_1") == len(ti.tokenizer) - 1
    assert isinstance(ti.scheduler, DPMSolverMultistepScheduler)
    assert ti.scheduler.config.beta_schedule == "scaled_linear"  # the model's noise schedule kept
    domain = load_pipeline(runs["domain_text_encoder"], lora=[runs["lora"] / "export"])
    assert isinstance(domain, DomainTextPipeline)
    reference = load_domain_text_pipeline(runs["domain_text_encoder"] / "export")
    assert torch.equal(domain.projection.weight, reference.projection.weight)
    assert domain.pipeline.unet.active_adapters() == ["lora_0"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_export_kind_samples_through_the_command(kind, runs, prompt_file, tmp_path):
    template = ["--prompt-template", "<shape> {prompt}"] if kind == "textual_inversion" else []
    medsd(
        sample_args(runs[kind], tmp_path, prompt_file, "--per-prompt", "1", "--scheduler", "ddim", *template)
    )
    manifest = read_manifest(tmp_path)
    assert list(manifest["prompt"]) == PROMPTS
    for path in manifest["path"]:
        with Image.open(tmp_path / path) as image:
            assert (image.size, image.mode) == ((32, 32), "RGB")


def test_rerun_with_the_same_arguments_is_bit_identical(reference, runs, prompt_file, tmp_path):
    medsd(sample_args(runs["lora"], tmp_path, prompt_file))
    assert image_bytes(tmp_path) == image_bytes(reference) and len(image_bytes(reference)) == 4
    assert (tmp_path / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()


def test_manifest_lists_prompts_seeds_and_paths_exactly(reference):
    manifest = read_manifest(reference)
    assert manifest.to_dict("records") == [
        {
            "prompt_index": i,
            "k": k,
            "prompt": PROMPTS[i],
            "seed": 7 + 2 * i + k,
            "path": f"images/00000{i}_0{k}.png",
            "labels": [],
        }
        for i in range(2)
        for k in range(2)
    ]


def test_an_interrupted_run_resumes_with_only_the_missing_images(
    reference, runs, prompt_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(sample_module, "render", CountingRender(fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        medsd(sample_args(runs["lora"], tmp_path, prompt_file))
    finished = {name: (tmp_path / "images" / name).stat().st_mtime_ns for name in image_bytes(tmp_path)}
    assert sorted(finished) == ["000000_00.png", "000000_01.png"]
    assert not (tmp_path / "manifest.csv").exists()  # no row can name a missing image
    assert [p.name for p in (tmp_path / "images").iterdir() if p.name.startswith(".")] == []

    resumed = CountingRender()
    monkeypatch.setattr(sample_module, "render", resumed)
    medsd(sample_args(runs["lora"], tmp_path, prompt_file))
    assert resumed.images == 2
    assert all((tmp_path / "images" / n).stat().st_mtime_ns == t for n, t in finished.items())
    assert image_bytes(tmp_path) == image_bytes(reference)
    assert (tmp_path / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()

    idle = CountingRender()
    monkeypatch.setattr(sample_module, "render", idle)
    medsd(sample_args(runs["lora"], tmp_path, prompt_file))  # complete: nothing to render
    assert idle.calls == 0


def test_a_deleted_image_is_rendered_again_and_its_stale_manifest_dropped(
    reference, runs, prompt_file, tmp_path, monkeypatch
):
    out = shutil.copytree(reference, tmp_path / "out")
    (out / "images" / "000001_00.png").unlink()
    monkeypatch.setattr(sample_module, "render", CountingRender(fail_after=0))
    with pytest.raises(KeyboardInterrupt):
        medsd(sample_args(runs["lora"], out, prompt_file))
    assert not (out / "manifest.csv").exists()
    again = CountingRender()
    monkeypatch.setattr(sample_module, "render", again)
    medsd(sample_args(runs["lora"], out, prompt_file))
    assert again.images == 1 and image_bytes(out) == image_bytes(reference)
    assert (out / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_cover_every_item_exactly_once(world_size):
    items = plan(n_prompts=5, per_prompt=3, seed=0)
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    assert sorted((i.prompt_index, i.k) for s in shards for i in s) == [(i.prompt_index, i.k) for i in items]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert len({i.seed for i in items}) == len(items)


def test_ranks_write_their_share_and_the_last_one_writes_the_manifest(
    reference, runs, prompt_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them
    medsd(sample_args(runs["lora"], tmp_path, prompt_file))
    assert sorted(image_bytes(tmp_path)) == ["000000_01.png", "000001_01.png"]
    assert not (tmp_path / "manifest.csv").exists()
    medsd(sample_args(runs["lora"], tmp_path, prompt_file, "--rank", "0"))
    assert image_bytes(tmp_path) == image_bytes(reference)
    assert (tmp_path / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()


@pytest.mark.parametrize("change", [["--steps", "3"], ["--scheduler", "ddim"], ["--seed", "8"], "prompts"])
def test_resuming_with_other_settings_is_refused(change, reference, runs, prompt_file, tmp_path):
    before = image_bytes(reference)
    if change == "prompts":
        edited = tmp_path / "prompts.txt"
        edited.write_text(PROMPTS[0] + "\n")
        args = sample_args(runs["lora"], reference, edited)
    else:
        args = sample_args(runs["lora"], reference, prompt_file, *change)
    with pytest.raises(SystemExit, match="other settings"):
        medsd(args)
    assert image_bytes(reference) == before


def test_dataset_prompts_are_deduplicated_and_keep_their_labels():
    a, b = {"Edema": 1.0, "Cardiomegaly": None}, {"Edema": 0.0, "Cardiomegaly": None}
    records = [Record("x", "effusion", a), Record("y", "clear", b), Record("z", "effusion", b)]
    records.append(Record("w", "effusion", dict(a)))  # an equal label set is kept once
    assert prompts_from_records(records) == [Prompt("effusion", (a, b)), Prompt("clear", (b,))]


def test_prompts_from_a_dataset_split_carry_its_labels(runs, tmp_path):
    root = write_phantoms("mimic-cxr", 12, tmp_path / "data", seed=3, image_size=32)
    config = ["--config", str(CONFIGS / "phantoms" / "mimic_cxr.yaml"), "--data.init_args.root", str(root)]
    out = tmp_path / "out"
    medsd(["sample", str(runs["unet"]), "--out", str(out), *config, "--split", "train", "--steps", "1"])
    records = build_datamodule(config).records("train")
    manifest = read_manifest(out)
    labels = dict(zip(manifest["prompt"], manifest["labels"], strict=True))
    assert list(labels) == list(dict.fromkeys(r.prompt for r in records))  # each prompt once
    assert all(r.labels and r.labels in labels[r.prompt] for r in records)


def test_presets_give_the_papers_samplers_and_flags_override_them():
    parse = build_parser().parse_args
    assert sampler_settings(parse(["m", "--out", "o", "--preset", "roentgen"])) == {
        "scheduler": "pndm",
        "steps": 75,
        "guidance": 4.0,
    }
    polyp = sampler_settings(parse(["m", "--out", "o", "--preset", "prompt-to-polyp", "--steps", "10"]))
    assert polyp == {"scheduler": "ddim", "steps": 10, "guidance": 3.5}


def test_sampling_cost_is_recorded_per_rank(reference, runs):
    cost = json.loads((reference / "cost" / "rank0.json").read_text())
    # Four images in batches of one: the first is counted for FLOPs (and left out of the timing).
    assert (cost["images"], cost["timed_images"]) == (4, 3)
    assert cost["images_per_second"] == pytest.approx(3 / cost["wall_seconds"])
    pipe = load_pipeline(runs["lora"])
    by_hand = count_flops(lambda: RENDER(pipe, [PROMPTS[1]], [0], 2, 7.5))
    assert cost["flops_per_image"] == by_hand and cost["peak_gpu_memory_bytes"] is None
