"""medsd's LightningCLI: `medsd fit|validate|test`, and run configs parsed or built the same way.

Config files compose (`--config a.yaml --config b.yaml`, later wins), any key can be overridden
with a dotted flag (`--model.init_args.optimizer.lr 5e-5`), and `--print_config` shows the result.
A run folder (`--trainer.default_root_dir`, default `runs/<strategy>`) receives `config.yaml`,
the TensorBoard logs, `checkpoints/` (last and best by validation loss) and `export/`.
Imported only by the commands that need Lightning (experiments/cli.py dispatches).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from contextlib import contextmanager

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import ImageTextDataModule
from experiments.config_errors import MedsdArgumentParser, original_error
from experiments.run_lock import RunLock, is_global_rank_zero
from lightning_modules import DiffusionModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.cost import CostAccounting
from lightning_modules.guards import NonFiniteGuard
from lightning_modules.randomness import StepSeeds
from lightning_modules.run_checkpoints import RunCheckpoint


class MedsdCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            # Any LightningModule: the diffusion strategies and the ones that train no diffusion
            # model (a from-scratch VAE, lightning_modules.VAETraining).
            L.LightningModule,
            ImageTextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # strategies define their own optimiser
            parser_class=MedsdArgumentParser,  # a wrong value said in one line (config_errors.py)
            # prog: also when run in-process (tests, notebooks); omegaconf: `${...}` interpolation in
            # configs (a value written once, e.g. the image size of the data and the validation).
            parser_kwargs={"prog": "medsd", "parser_mode": "omegaconf"},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` is left out: generating images is `medsd sample`'s job.
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                # One fixed name: a new best replaces the old in one rename (run_checkpoints.py).
                "checkpoint.filename": "best",
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(CostAccounting, "cost")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        parser.add_lightning_class_args(StepSeeds, "step_seeds")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.trainer.default_root_dir:
            # Deterministic, so that every DDP rank (a re-run of this command) agrees on it.
            strategy = config.model.class_path.rsplit(".", 1)[-1].lower()
            config.trainer.default_root_dir = f"runs/{strategy}"
        if self.subcommand == "fit" and is_global_rank_zero():
            # Before the Trainer is built: its SaveConfigCallback writes config.yaml into the folder.
            # Held until the fit returns (experiments/cli.py) or the process ends (run_lock.py).
            RunLock(config.trainer.default_root_dir).acquire()

    def before_fit(self) -> None:
        self.trainer.checkpoint_callback.refuse_fresh_start_over_checkpoints(
            self.trainer, self.config_init[self.subcommand].ckpt_path
        )

    def instantiate_classes(self) -> None:
        with unwrapped_instantiation_errors():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            # TensorBoard events straight in the run folder, not in lightning_logs/version_N.
            trainer_config["logger"] = TensorBoardLogger(
                save_dir=trainer_config["default_root_dir"], name="", version=""
            )
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())  # checkpoints written whole (checkpoint_io.py)
        trainer_config["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


@contextmanager
def unwrapped_instantiation_errors():
    """An error raised while building the model or the data reaches the user as itself, not as
    the jsonargparse union dump it arrives in."""
    try:
        yield
    except ValueError as error:
        original = original_error(error)
        if original is error:
            raise
        raise original from original.__cause__


@contextmanager
def _in_process():
    """Silence LightningCLI's warning about explicit args next to sys.argv: here they are meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)
        yield


class _RunConfigCLI(MedsdCLI):
    """A MedsdCLI without subcommands that also reads a run's saved `config.yaml`, whose
    `ckpt_path` and `weights_only` are arguments of `Trainer.fit` (they name no data or model
    and are ignored here)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        skip = {"self", "model", "train_dataloaders", "val_dataloaders", "datamodule"}
        for name in inspect.signature(L.Trainer.fit).parameters.keys() - skip:
            parser.add_argument(f"--{name}", default=None, help="ignored here")


class _ParseOnlyCLI(_RunConfigCLI):
    def instantiate_classes(self) -> None:
        """Nothing is built: no weights are loaded, no data is read."""


def parse_config(*args: str):
    """Compose and validate a `fit` configuration against the code, without building anything.

    `parse_config("--config", "a.yaml", "--model.init_args.optimizer.lr", "1e-4")` returns the
    resolved namespace; unknown keys, wrong types or a missing class raise `SystemExit` with
    jsonargparse's message, exactly as `medsd fit` would before it starts.
    """
    with _in_process():
        return _ParseOnlyCLI(args=list(args), run=False).config


class _BuildCLI(_RunConfigCLI):
    def instantiate_classes(self) -> None:
        """The model and the data only: no Trainer, no run folder."""
        with unwrapped_instantiation_errors():
            self.config_init = self.parser.instantiate_classes(self.config)
        self.model = self._get(self.config_init, "model")
        self.datamodule = self._get(self.config_init, "data")


def build_from_config(args: list[str]) -> tuple[DiffusionModule, ImageTextDataModule]:
    """The model and DataModule that `medsd fit <args>` would train."""
    with _in_process():
        cli = _BuildCLI(args=list(args), run=False)
    return cli.model, cli.datamodule


def build_datamodule(args: list[str]) -> ImageTextDataModule:
    """Only the DataModule of a run config: no weights are loaded."""
    data = parse_config(*args).data
    module, _, name = data.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**data.init_args.as_dict())
