"""Mistakes are said in one line that names what is wrong: a config value (key, value, expected
type), a local folder that does not exist yet (never treated as a hub id), an OS error (path)."""

import errno
import sys

import pytest

from experiments import cli
from experiments.config_errors import one_line

UNET = "experiments/configs/tiny/unet.yaml"
COMPACT = "experiments/configs/tiny/compact.yaml"


def test_a_wrong_config_value_is_one_line_with_key_value_and_type(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", UNET, "--model.init_args.optimizer.lr", "abc"])
    assert exit_.value.code == 2
    # The last lines: pytest's own arguments can make LightningCLI warn before.
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "medsd fit: error: model.init_args.optimizer.init_args.lr: expected float, got 'abc'",
        "(`medsd fit --help` lists the options)",
    ]


def test_one_line_keeps_every_real_alternative_and_drops_the_none_branches():
    # jsonargparse 4.53's wording for a value of `int | str | None` that fits neither real type.
    dump = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'datamodules.CSVFolderDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'datamodules.CSVFolderDataModule':
        Parser key "batch_size":
          Does not validate against any of the Union subtypes
          Errors:
            - Expected a <class 'int'>. Got value: [1]
            - Expected a <class 'str'>. Got value: [1]
            - Expected a <class 'NoneType'>
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._namespace.Namespace'>"""
    assert one_line(dump) == (
        "data.init_args.batch_size: expected int, got '[1]'; "
        "data.init_args.batch_size: expected str, got '[1]'"
    )
    assert one_line("Unrecognized arguments:\n  --no-such 7") == "Unrecognized arguments: --no-such 7"


def test_a_missing_local_vae_folder_names_the_step_that_makes_it(tmp_path):
    missing = tmp_path / "runs" / "vaetraining"
    with pytest.raises(FileNotFoundError) as error:
        cli.main(["fit", "--config", COMPACT, "--model.init_args.vae", str(missing)])
    message = str(error.value)
    assert f"VAE folder {missing} does not exist" in message and "VAETraining" in message
    assert "hf download" not in message and "hub" not in message


def test_the_command_says_an_os_error_in_one_line_naming_the_path(monkeypatch):
    def disk_full(argv=None):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/last.ckpt")

    monkeypatch.setattr(cli, "main", disk_full)
    monkeypatch.setattr(sys, "argv", ["medsd", "fit"])
    monkeypatch.delenv("MEDSD_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.console()
    assert exit_.value.code == (
        "medsd fit: error: /runs/x/checkpoints/last.ckpt: No space left on device "
        "(MEDSD_TRACEBACK=1 shows where)"
    )
    monkeypatch.setenv("MEDSD_TRACEBACK", "1")
    with pytest.raises(OSError, match="No space left"):
        cli.console()
