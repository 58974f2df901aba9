"""A misspelt flag on any medsd command exits non-zero naming it: none is passed on silently."""

import pytest
import yaml

from experiments.cli import main as medsd

COMMANDS = {
    "evaluate": ["--generated", "g", "--real-folder", "r"],
    "sample": ["src", "--out", "o", "--prompts", "p.txt"],
    "prepare": ["--out", "o", "--config", "c.yaml"],
    "inspect-data": ["--config", "c.yaml"],
    "export": ["run"],
    "phantoms": ["--layout", "mimic-cxr", "--n", "2", "--out", "o"],
    "sweep": ["m.yaml"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_misspelt_flag_is_refused_by_name(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        medsd([command, *COMMANDS[command], "--boostrap", "1000"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --boostrap" in capsys.readouterr().err


def test_config_arguments_are_passed_on_and_a_stray_value_is_not(capsys):
    from experiments.cli import parse_with_config_args
    from experiments.evaluate import build_parser

    parser = build_parser()
    passed_on = ["--config", "c.yaml", "--data.init_args.root", "d", "--trainer=x"]
    args, config_args = parse_with_config_args(parser, ["--generated", "g", *passed_on])
    assert args.generated == "g" and config_args == passed_on
    with pytest.raises(SystemExit):
        parse_with_config_args(parser, ["--generated", "g", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


# A setting every command has, with a value that is not its default.
SETTING = {
    "evaluate": ("bootstrap", 7),
    "sample": ("per_prompt", 3),
    "prepare": ("splits", ["val"]),
    "inspect-data": ("max_tokens", 64),
    "export": ("checkpoint", "last"),
    "phantoms": ("seed", 5),
    "sweep": ("retry_failed", True),
}


def printed_settings(command: str, capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as exit_:
        medsd([command, *COMMANDS[command], *extra, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_settings_file_gives_a_command_its_options_and_print_config_shows_them(command, capsys, tmp_path):
    key, value = SETTING[command]
    assert set(SETTING) == set(COMMANDS)
    assert printed_settings(command, capsys)[key] != value  # the default
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump({key: value}))
    assert printed_settings(command, capsys, "--settings", str(tmp_path / "settings.yaml"))[key] == value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_misspelt_key_in_a_settings_file_is_refused_by_name(command, capsys, tmp_path):
    (tmp_path / "settings.yaml").write_text("boostrap: 1000\n")
    with pytest.raises(SystemExit) as exit_:
        medsd([command, *COMMANDS[command], "--settings", str(tmp_path / "settings.yaml")])
    assert exit_.value.code == 2
    assert "boostrap" in capsys.readouterr().err
