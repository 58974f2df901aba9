"""OmegaConf `${...}` interpolation in the shipped fit configs (`parser_mode="omegaconf"`).

A value that two keys of one file must share is written once and interpolated into the other key.
jsonargparse's omegaconf mode resolves a file's interpolations as it reads that file, so a source
must be in the same file (a group file such as `data: data.yaml` is read on its own), and a later
override of the source (`--data.init_args.image_size 256`) does not reach the copy.
"""

import re
from pathlib import Path

import pytest
import yaml

from experiments.lightning_cli import parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
PLAIN_KEY = re.compile(r"\.*[A-Za-z_][\w.]*")  # `a.b.c` or relative `..b.c`: no resolvers


def raw_strings(value, path=()):
    """(key path, string) for every string of a YAML document as written."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from raw_strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from raw_strings(item, (*path, index))
    elif isinstance(value, str):
        yield path, value


def interpolations(config: Path):
    """(key path in the composed config, string as written, path of the file's root) for each
    string with `${...}` of a run config and of the group files it includes."""
    document = yaml.safe_load(config.read_text())
    found = [((), path, text) for path, text in raw_strings(document)]
    for key, value in document.items():
        if isinstance(value, str) and value.endswith(".yaml"):
            group = yaml.safe_load((config.parent / value).read_text())
            found += [((key,), (key, *path), text) for path, text in raw_strings(group)]
    return [(path, text, root) for root, path, text in found if "${" in text]


def source_path(reference: str, key: tuple, root: tuple) -> tuple:
    """Where OmegaConf looks `${reference}` up from `key`: `a.b` from the file's root, `..b` from
    `key`'s container (one dot) and up one level for each further dot."""
    assert PLAIN_KEY.fullmatch(reference), f"not a plain key: ${{{reference}}}"
    dots = len(reference) - len(reference.lstrip("."))
    base = key[: len(key) - dots] if dots else root
    return (*base, *(int(t) if t.isdigit() else t for t in reference.lstrip(".").split(".")))


def lookup(config: dict, path: tuple):
    for part in path:
        config = config[part]
    return config


RUN_CONFIGS = [p for p in sorted(CONFIGS.rglob("*.yaml")) if "model" in (yaml.safe_load(p.read_text()) or {})]
INTERPOLATED = [p for p in RUN_CONFIGS if interpolations(p)]


def test_shipped_configs_write_shared_values_once():
    assert {str(p.relative_to(CONFIGS)) for p in INTERPOLATED} >= {
        "prompt_to_polyp/flux_lora.yaml",
        "prompt_to_polyp/kandinsky_lora.yaml",
        "demo/textual_inversion.yaml",
    }


@pytest.mark.parametrize("path", INTERPOLATED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_interpolation_equals_its_source(path):
    resolved = parse_config("--config", str(path)).as_dict()
    for key, text, root in interpolations(path):
        references = INTERPOLATION.findall(text)
        sources = [lookup(resolved, source_path(r, key, root)) for r in references]
        if INTERPOLATION.fullmatch(text):  # the whole value: its source's value and type
            expected = sources[0]
        else:  # inside a string: each source's text in its place
            pieces = INTERPOLATION.split(text)  # text, reference, text, reference, ..., text
            pieces[1::2] = map(str, sources)
            expected = "".join(pieces)
        assert lookup(resolved, key) == expected, ".".join(map(str, key))
        assert type(lookup(resolved, key)) is type(expected)


def test_the_validation_renders_at_the_training_size():
    for name in ("flux_lora", "kandinsky_lora"):
        config = parse_config("--config", str(CONFIGS / "prompt_to_polyp" / f"{name}.yaml"))
        assert config.model.init_args.validation.resolution == config.data.init_args.image_size == 512


def test_the_demo_token_is_in_every_prompt():
    config = parse_config("--config", str(CONFIGS / "demo" / "textual_inversion.yaml"))
    data, model = config.data.init_args, config.model.init_args
    assert model.placeholder_token == "<cxr>"
    assert data.template == "<cxr> chest x-ray with {findings}"
    assert data.no_finding_prompt == "<cxr> normal chest x-ray"
    assert model.validation.prompts == ["<cxr> chest x-ray with pleural effusion", "<cxr> normal chest x-ray"]


def test_an_override_of_the_source_does_not_reach_the_copy():
    # What the configs' comments say: resolved as the file is read, before any later flag or file.
    # (jsonargparse's "omegaconf+" mode would resolve after composing, and this would fail.)
    config = parse_config(
        "--config",
        str(CONFIGS / "prompt_to_polyp" / "flux_lora.yaml"),
        "--data.init_args.image_size",
        "256",
    )
    assert config.data.init_args.image_size == 256
    assert config.model.init_args.validation.resolution == 512
