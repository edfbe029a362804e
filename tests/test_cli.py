import argparse

import pytest

from agd.cli import build_parser, main


def _walk(parser: argparse.ArgumentParser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*prefix, name))


def test_every_sub_command_has_help(capsys):
    commands = list(_walk(build_parser()))
    assert ("data", "fetch") in commands and ("data", "prepare") in commands and ("catalog",) in commands
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: agd") and len(out) > 80, command


def test_bad_params_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare:\n  split: {train: 0.9, val: 0.2, test: 0.2}\n  dedupe: first\n")
    assert main(["--params", str(bad), "data", "prepare", "--raw", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "prepare.split" in err and "must be 1" in err
    assert "prepare.dedupe" in err and "Traceback" not in err
