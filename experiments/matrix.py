"""A sweep matrix: base configs, axes over any config key, include / exclude rules -> named cells.

    name: strategies                      # optional, default: the file's stem (slugged)
    base: [../configs/tiny/trainer_overrides.yaml]   # config files every cell starts from
    axes:
      strategy:                           # an axis of labelled settings
        unet: {config: ../configs/tiny/unet.yaml}
        lora: {config: ../configs/tiny/lora.yaml, model.init_args.rank: 8}
      lr:                                 # an axis over one key's values
        key: model.init_args.optimizer.lr
        values: [1.0e-4, 1.0e-3]
    exclude: [{strategy: lora, lr: 1.0e-3}]   # drop every cell matching all the given pairs
    include: [{strategy: lora, lr: 1.0e-3}]   # add cells back (or cells the product lacks)
    sample: {per-prompt: 4, steps: 50, split: test}   # `medsd sample` flags for every cell
    augmentation_sample: {split: train, max-prompts: 500}   # optional second sample folder, prompted
                                          # from the training split, for the augmentation protocol
    evaluate: {real-split: test, bootstrap: 200}        # `medsd evaluate` flags
    prepare:                              # `medsd` commands run once, before any cell
      - phantoms --layout mimic-cxr --n 400 --out {sweep}/data/mimic-cxr

Config paths are relative to the matrix file. A labelled setting's `config` (a path or a list)
adds config files; every other key is a dotted `medsd fit` override. A cell's arguments are the
base configs, then its axes' settings in axis order (later ones win, as on the command line).
A cell is named by its axes and labels, `strategy-lora__lr-0.001`, which is also its folder name
(each part slugged: no matrix can name a folder outside its sweep). For the same reason the
sweep alone sets where stages write (`trainer.default_root_dir`, `checkpoint.dirpath`, `out` are
refused in a matrix), and a `prepare` command's `--out` must lie under `{sweep}`.
`{sweep}` anywhere in an argument or flag stands for the sweep's output folder, so that data a
`prepare` command makes there can be named by the cells; in `prepare` commands, `{matrix}` stands
for the matrix file's folder (for their config paths).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

TOP_LEVEL = {
    "name",
    "base",
    "axes",
    "include",
    "exclude",
    "sample",
    "augmentation_sample",
    "evaluate",
    "prepare",
}
# Settings that choose where a stage writes: the sweep sets them, so that every cell stays in its
# own folder under the sweep's.
OUTPUT_KEYS = {"trainer.default_root_dir", "checkpoint.dirpath"}


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: its label per axis and its `medsd fit` arguments."""

    labels: tuple[tuple[str, str], ...]
    fit_args: tuple[str, ...]

    @property
    def name(self) -> str:
        return "__".join(f"{slug(axis)}-{slug(label)}" for axis, label in self.labels)

    def as_dict(self) -> dict:
        return {"name": self.name, "labels": dict(self.labels), "fit_args": list(self.fit_args)}


def slug(text: str) -> str:
    """A name as one folder-name part: letters, digits, '.', '+' and '-' kept, anything else '_',
    and leading dots '_', so that no name a matrix gives can be '..', absolute or hidden."""
    name = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")
    return re.sub(r"^\.+", "_", name) or "_"


def label_of(value) -> str:
    """How a YAML value is named in cells, rules and command lines (1.0e-3 -> '0.001', True -> 'true')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


@dataclass
class Matrix:
    path: Path
    name: str
    base: list[str]
    axes: dict[str, dict[str, tuple[str, ...]]]  # axis -> label -> fit arguments
    include: list[dict[str, str]]
    exclude: list[dict[str, str]]
    sample: dict
    augmentation_sample: dict
    evaluate: dict
    prepare: list[list[str]]

    @classmethod
    def load(cls, path: str | Path) -> Matrix:
        path = Path(path)
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a matrix is a mapping, got {type(spec).__name__}")
        unknown = set(spec) - TOP_LEVEL
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL)}")
        if not spec.get("axes"):
            raise ValueError(f"{path}: a matrix needs at least one axis under 'axes'")
        folder = path.parent
        for stage in ("sample", "augmentation_sample", "evaluate"):
            if "out" in (spec.get(stage) or {}):
                raise ValueError(f"{path}: {stage}: 'out' is set by the sweep (each cell's own folder)")
        base = _as_list(spec.get("base"))
        axes = {str(axis): _axis(path, str(axis), body, folder) for axis, body in spec["axes"].items()}
        matrix = cls(
            path=path,
            name=slug(str(spec.get("name") or path.stem)),  # the default sweep folder's name
            base=[str((folder / p).resolve()) for p in base],
            axes=axes,
            include=[_rule(path, "include", rule, axes) for rule in spec.get("include") or []],
            exclude=[_rule(path, "exclude", rule, axes) for rule in spec.get("exclude") or []],
            sample=dict(spec.get("sample") or {}),
            augmentation_sample=dict(spec.get("augmentation_sample") or {}),
            evaluate=dict(spec.get("evaluate") or {}),
            prepare=[
                [arg.replace("{matrix}", str(folder.resolve())) for arg in shlex.split(command)]
                for command in spec.get("prepare") or []
            ],
        )
        for rule in matrix.include:
            if set(rule) != set(axes):
                raise ValueError(
                    f"{path}: an include rule must name a label for every axis {list(axes)}: {rule}"
                )
        return matrix

    def cells(self) -> list[Cell]:
        """The product of the axes minus the excluded cells, then the included ones not yet there."""
        names = list(self.axes)
        chosen = [
            dict(zip(names, labels, strict=True))
            for labels in itertools.product(*(self.axes[a] for a in names))
            if not any(_matches(dict(zip(names, labels, strict=True)), rule) for rule in self.exclude)
        ]
        for rule in self.include:
            combination = {axis: rule[axis] for axis in names}
            if combination not in chosen:
                chosen.append(combination)
        return [self._cell(combination) for combination in chosen]

    def _cell(self, combination: dict[str, str]) -> Cell:
        args = [arg for path in self.base for arg in ("--config", path)]
        for axis, label in combination.items():
            args += self.axes[axis][label]
        return Cell(tuple(combination.items()), tuple(args))


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _axis(path: Path, axis: str, body, folder: Path) -> dict[str, tuple[str, ...]]:
    """label -> fit arguments, from either axis form (see the module docstring)."""
    if not isinstance(body, dict) or not body:
        raise ValueError(f"{path}: axis '{axis}' must be a mapping of labels, or key + values")
    if "key" in body or "values" in body:
        if set(body) != {"key", "values"} or not isinstance(body["values"], list) or not body["values"]:
            raise ValueError(f"{path}: axis '{axis}' over one key needs exactly 'key' and a list of 'values'")
        if body["key"] in OUTPUT_KEYS:
            raise ValueError(f"{path}: axis '{axis}': {body['key']} is set by the sweep")
        return {label_of(v): (f"--{body['key']}", label_of(v)) for v in body["values"]}
    labels = {}
    for label, settings in body.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: axis '{axis}', label '{label}': settings must be a mapping")
        args: list[str] = []
        for config in _as_list(settings.get("config")):
            args += ["--config", str((folder / config).resolve())]
        for key, value in settings.items():
            if key in OUTPUT_KEYS:
                raise ValueError(f"{path}: axis '{axis}', label '{label}': {key} is set by the sweep (each "
                                 "cell writes in its own folder under the sweep's)")  # fmt: skip
            if key != "config":
                args += [f"--{key}", label_of(value)]
        labels[label_of(label)] = tuple(args)
    return labels


def _rule(path: Path, kind: str, rule, axes: dict) -> dict[str, str]:
    if not isinstance(rule, dict) or not rule:
        raise ValueError(f"{path}: each {kind} rule is a mapping axis -> label, got {rule!r}")
    rule = {str(axis): label_of(label) for axis, label in rule.items()}
    for axis, label in rule.items():
        if axis not in axes:
            raise ValueError(f"{path}: {kind} rule {rule} names unknown axis '{axis}' (axes: {list(axes)})")
        if label not in axes[axis]:
            raise ValueError(
                f"{path}: {kind} rule {rule}: '{label}' is not a label of axis '{axis}' ({list(axes[axis])})"
            )
    return rule


def _matches(combination: dict[str, str], rule: dict[str, str]) -> bool:
    return all(combination[axis] == label for axis, label in rule.items())
