"""Every shipped sweep matrix samples what each classifier protocol needs: the leakage checks of
`medsd evaluate` run on the sample folders its cells would make, and refuse none of them."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from evaluation.metrics.classifier_protocols import PROTOCOLS, chosen_protocols
from evaluation.sample_folder import Generated, split_source
from experiments.cli import parse_with_config_args
from experiments.evaluate import build_parser
from experiments.matrix import Matrix
from experiments.sweep import flags

MATRICES = sorted((Path(__file__).resolve().parents[1] / "experiments" / "matrices").glob("*.yaml"))


def sample_folder(options: dict) -> Generated:
    """An empty sample folder as `medsd sample` records it for these flags."""
    source = (
        {"file": options["prompts"]}
        if "prompts" in options
        else split_source(options.get("split", "test"), [])
    )
    return Generated([], [], [], [], prompt_source=source)


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: p.stem)
def test_shipped_matrices_pass_the_leakage_checks(path: Path) -> None:
    matrix = Matrix.load(path)
    args, _ = parse_with_config_args(build_parser(), ["--generated", "samples", *flags(matrix.evaluate)])
    if args.classifier == "none":
        return
    skipped: dict = {}
    context = SimpleNamespace(
        args=args,
        generated=sample_folder(matrix.sample),
        augmentation_generated=sample_folder(matrix.augmentation_sample)
        if matrix.augmentation_sample
        else None,
        skip=skipped.__setitem__,
    )
    chosen = chosen_protocols(context)  # an explicitly listed protocol that would leak raises
    assert skipped == {} and chosen == list(args.protocols or PROTOCOLS)


def test_a_matrix_sampling_only_test_prompts_cannot_run_augmentation(tmp_path: Path) -> None:
    args, _ = parse_with_config_args(
        build_parser(), ["--generated", "samples", "--protocols", "augmentation"]
    )
    context = SimpleNamespace(
        args=args,
        generated=sample_folder({"split": "test"}),
        augmentation_generated=None,
        skip=lambda name, reason: None,
    )
    with pytest.raises(SystemExit, match="must be prompted from the training split"):
        chosen_protocols(context)
