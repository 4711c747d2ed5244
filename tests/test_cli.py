"""The command line: every command's --help works and says what it does."""

import pytest

from ddfm.cli import COMMANDS, main


def _help(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_tells_what_the_tool_does(capsys):
    out = _help(capsys, ["--help"])
    description = out.split("positional arguments")[0]
    assert "experts that never talk to" in description and "generate with them together" in description
    assert "ddfm demo" in description  # and where to start
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help(capsys, command):
    # a bare % in a help string used to crash argparse ("unsupported format character")
    out = _help(capsys, [command, "--help"])
    assert out.startswith(f"usage: ddfm {command}")
    assert COMMANDS[command][1].split()[0] in out
