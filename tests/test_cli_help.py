"""Every command-line argument says what it is: `main.py COMMAND --help` leaves nothing unexplained.

    python -m pytest tests/test_cli_help.py -q
"""
import argparse

import pytest

from semiseg import cli, config


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action, action.choices


def test_every_argument_of_every_command_has_help():
    parser = cli.build_parser()
    action, commands = _subparsers(parser)
    missing = [f"main.py {a.dest}" for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    listed = {choice.dest for choice in action._choices_actions}
    missing += [f"main.py {name} (no help in the command list)" for name in commands if name not in listed]
    for name, sub in commands.items():
        missing += [f"main.py {name} {a.option_strings[0] if a.option_strings else a.dest}"
                    for a in sub._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"arguments without help: {missing}"
    assert set(commands) == {"train", "evaluate", "predict", "describe", "preprocess", "check-data"}


def test_train_help_names_the_default_method_and_the_presets_methods(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.build_parser().parse_args(["train", "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "else supervised" in text
    mira = sorted(n for n, p in config.PRESETS.items() if p.get("method") == "mira_u")
    assert mira and f"{', '.join(mira)}: mira_u" in text
    assert "--dry-run" in text and "--out RUN_DIR" in text


def test_preprocess_cache_root_keeps_out_as_an_alias():
    parser = cli.build_parser()
    for flag in ("--cache-root", "--out"):
        assert parser.parse_args(["preprocess", flag, "/tmp/cache"]).cache_root == "/tmp/cache"


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.build_parser().parse_args(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("semiseg ")
