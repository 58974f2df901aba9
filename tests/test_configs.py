"""Every YAML file under experiments/ is loaded and validated against the code."""

from pathlib import Path

import pytest
import yaml

from experiments import evaluate, sample
from experiments.cli import parse_with_config_args
from experiments.lightning_cli import parse_config
from experiments.matrix import Matrix
from experiments.sweep import plan, stage_args

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
YAML_FILES = sorted(EXPERIMENTS.rglob("*.yaml"))


def is_run_config(path: Path) -> bool:
    """A full run configuration names a model; other YAML files are groups it includes."""
    return "model" in (yaml.safe_load(path.read_text()) or {})


def is_matrix(path: Path) -> bool:
    """A sweep matrix (`medsd sweep`) has axes."""
    return "axes" in (yaml.safe_load(path.read_text()) or {})


STAGE_PARSERS = {"sample": sample.build_parser, "evaluate": evaluate.build_parser}
RUN_CONFIGS = [p for p in YAML_FILES if is_run_config(p)]
MATRICES = [p for p in YAML_FILES if is_matrix(p)]


def unresolved(value) -> list[str]:
    """The strings of a parsed config that still hold an OmegaConf `${...}` interpolation."""
    if isinstance(value, dict):
        return [s for item in value.values() for s in unresolved(item)]
    if isinstance(value, list):
        return [s for item in value for s in unresolved(item)]
    return [value] if isinstance(value, str) and "${" in value else []


def test_the_experiments_folder_has_configs():
    assert {p.stem for p in RUN_CONFIGS} >= {
        "textual_inversion",
        "unet",
        "lora",
        "text_encoder",
        "domain_text_encoder",
    }


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_run_config_validates(path):
    config = parse_config("--config", str(path))
    assert config.model.class_path.startswith("lightning_modules.")
    assert config.data.class_path.startswith("datamodules.")
    assert not unresolved(config.as_dict())  # every interpolation resolved (test_config_interpolation.py)


def test_every_included_file_is_used_by_a_run_config():
    # A group file that no run config names would never be validated, so it must not exist.
    included = set()
    for path in RUN_CONFIGS:
        for value in yaml.safe_load(path.read_text()).values():
            if isinstance(value, str) and value.endswith(".yaml"):
                included.add((path.parent / value).resolve())
    for matrix in MATRICES:  # files a matrix's cells are built from
        included |= {
            Path(arg)
            for cell in Matrix.load(matrix).cells()
            for arg in cell.fit_args
            if arg.endswith(".yaml")
        }
    orphans = [
        p for p in YAML_FILES if not (is_run_config(p) or is_matrix(p)) and p.resolve() not in included
    ]
    assert not orphans


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_cell_of_a_matrix_validates(path):
    cells = Matrix.load(path).cells()
    assert cells
    for cell in cells:
        config = parse_config(*cell.fit_args)
        assert config.model.class_path.startswith("lightning_modules."), cell.name
        assert not unresolved(config.as_dict()), cell.name


def test_validation_rejects_an_unknown_key(tmp_path):
    # Guards the test above: a misspelt setting must fail validation, not pass silently.
    source = EXPERIMENTS / "configs" / "tiny" / "unet.yaml"
    text = source.read_text().replace("snr_gamma:", "snr_gama:")
    assert text != source.read_text()
    bad = tmp_path / "unet.yaml"
    bad.write_text(text)
    for name in ("data.yaml", "trainer.yaml"):
        (tmp_path / name).write_text((source.parent / name).read_text())
    with pytest.raises(SystemExit):
        parse_config("--config", str(bad))


def test_dotted_overrides_and_later_files_win(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    optimizer:\n      lr: 0.5\n")
    unet = str(EXPERIMENTS / "configs" / "tiny" / "unet.yaml")
    config = parse_config("--config", unet, "--config", str(override), "--trainer.max_steps", "3")
    assert config.model.init_args.optimizer.lr == 0.5
    assert config.trainer.max_steps == 3
    assert config.model.init_args.ema_decay == 0.99  # untouched keys survive the composition


def parse_stage(matrix: Matrix, stage: str, out: Path):
    """A cell's `medsd sample` / `medsd evaluate` arguments, parsed as the command parses them."""
    folder = plan(matrix, out)[0]
    command, *args = stage_args(matrix, folder, stage)
    return parse_with_config_args(STAGE_PARSERS[command](), args)


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: p.stem)
def test_every_matrix_sample_and_evaluate_block_parses(path, tmp_path):
    matrix = Matrix.load(path)
    for stage in ("sample", "evaluate") + (("sample-augmentation",) if matrix.augmentation_sample else ()):
        parse_stage(matrix, stage, tmp_path)


@pytest.mark.parametrize("block", ["sample", "evaluate"])
def test_a_misspelt_key_in_a_matrix_block_is_named(block, tmp_path, capsys):
    matrix_file = tmp_path / "m.yaml"
    stage = {"sample": {"per-promt": 4}, "evaluate": {"boostrap": 1000}}[block]
    matrix_file.write_text(yaml.safe_dump({"axes": {"a": {"x": {}}}, block: stage}))
    with pytest.raises(SystemExit):
        parse_stage(Matrix.load(matrix_file), block, tmp_path / "sweep")
    assert f"unrecognized arguments: --{next(iter(stage))}" in capsys.readouterr().err
