"""The `medsd` command: `medsd fit|validate|test` through LightningCLI (experiments/lightning_cli.py),
plus medsd's own commands (COMMANDS).

This module imports nothing heavy: `medsd --help` and a mistyped command answer at once, and each
command imports what it needs (Lightning, diffusers, ...) only when it runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from .parent_death import die_with_parent

# LightningCLI's subcommands (`predict` is left out: generating images is `medsd sample`'s job).
LIGHTNING_COMMANDS = {
    "fit": "train a strategy on a dataset (a run config: --config FILE; see --help)",
    "validate": "validation loss of a run config, or of a checkpoint with --ckpt_path",
    "test": "test-split loss of a run config, or of a checkpoint with --ckpt_path",
}

# medsd's own commands: name -> (the module whose main(argv) runs it, what it does).
COMMANDS = {
    "prepare": ("experiments.prepare", "compute a run's resized images, VAE latents, text embeddings once"),
    "inspect-data": ("experiments.inspect_data", "what a DataModule config yields, as JSON"),
    "phantoms": ("experiments.phantoms", "write procedural phantom data in an official dataset layout"),
    "sample": ("experiments.sample", "render prompts with a trained model into an image folder"),
    "evaluate": ("experiments.evaluate", "score a `medsd sample` folder against real images"),
    "export": ("experiments.export_checkpoint", "write a run's export from one of its checkpoints"),
    "sweep": ("experiments.sweep", "every cell of a matrix through fit, sample and evaluate"),
    "rate": ("experiments.rate", "a blinded expert rating of real and generated images, and its report"),
}

# The project's packages, whose INFO messages (exports written, metrics skipped and why, sampler
# and template choices) a user of the command should see.
PACKAGES = ("lightning_modules", "datamodules", "experiments", "evaluation")


# The top-level keys of a `medsd fit` config: what a command may pass on to its config parser.
CONFIG_GROUPS = ("--config", "--data", "--model", "--trainer", "--seed_everything")


def command_parser(prog: str, description: str):
    """The parser of one of medsd's own commands (jsonargparse): typed options, strict (a misspelt
    flag is an error naming it), `--settings FILE` giving any of them from a YAML file (by their
    names with underscores: `per_prompt: 4`; flags after it override it) and `--print_config`,
    which prints the parsed options as such a file. `--config` stays what it is in every command:
    a `medsd fit` run config."""
    from jsonargparse import ActionConfigFile, ArgumentParser  # here: `medsd --help` stays instant

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--settings",
        action=ActionConfigFile,
        help="a YAML file of this command's options (see --print_config)",
    )
    return parser


def parse_with_config_args(parser, argv: list[str]):
    """(args, config_args): `parser`'s own arguments, and the `medsd fit` config arguments
    (`--config FILE`, `--data.init_args.root DIR`, ...) a command passes on to build a run's data
    or model, where jsonargparse checks every key. Every other argument goes to `parser`, which
    refuses what it does not know by name, so a misspelt option (`--boostrap 1000`) never passes
    silently."""
    own_flags = {flag for action in parser._actions for flag in action.option_strings}
    own, passed_on, i = [], [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag not in own_flags and flag.split(".")[0] in CONFIG_GROUPS:
            takes_next = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            passed_on += argv[i : i + 1 + takes_next]
            i += 1 + takes_next
        else:
            own.append(argv[i])
            i += 1
    return parser.parse_args(own), passed_on


def usage() -> str:
    lines = ["usage: medsd COMMAND [ARGS]   (medsd COMMAND --help for its options)", ""]
    for title, commands in (
        ("training (LightningCLI):", LIGHTNING_COMMANDS),
        ("medsd's commands:", {k: v[1] for k, v in COMMANDS.items()}),
    ):
        lines.append(title)
        lines += [f"  {name:14s}{what}" for name, what in commands.items()]
    return "\n".join(lines)


def show_project_logs() -> None:
    """medsd's own INFO messages on stderr; other libraries keep their default (warnings)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for package in PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """`medsd fit|validate|test` (LightningCLI) and medsd's own commands (COMMANDS)."""
    die_with_parent()  # first: a sweep's stage must not outlive the sweep (parent_death.py)
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        if not args:
            raise SystemExit(2)
        return
    command = args[0]
    if command not in COMMANDS and command not in LIGHTNING_COMMANDS:
        print(usage(), file=sys.stderr)
        raise SystemExit(f"medsd: unknown command {command!r}")
    show_project_logs()
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).main(args[1:])
    else:
        from .lightning_cli import MedsdCLI
        from .run_lock import released_on_return

        with released_on_return():  # the run folder's lock, which `fit` takes as it starts
            MedsdCLI(args=argv)  # None: LightningCLI reads sys.argv itself


def os_error_line(error: OSError) -> str:
    """An OS error as one line naming its path(s): `runs/x/checkpoints: No space left on device`."""
    if error.filename is None or error.strerror is None:
        return str(error)  # medsd's own OSErrors (CheckpointWriteError) say it all already
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    return f"{paths}: {error.strerror}"


def console() -> None:
    """The `medsd` command: `main`, with an OS error (a full disk, a missing or unreadable file)
    said in one line rather than as a traceback; MEDSD_TRACEBACK=1 shows the traceback."""
    try:
        main()
    except OSError as error:
        if os.environ.get("MEDSD_TRACEBACK"):
            raise
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        message = f"medsd {command}: error: {os_error_line(error)} (MEDSD_TRACEBACK=1 shows where)"
        raise SystemExit(message) from None


if __name__ == "__main__":
    console()
