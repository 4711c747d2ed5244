"""The command line: every command's --help works and says what it does."""

import os
import subprocess
import sys

import pytest
from helpers.data import make_data

from ddfm.cli import COMMANDS, main
from ddfm.embed import EmbedConfig, embed
from ddfm.init import InitConfig, init


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


NOISE = ("faiss", "AVX", "deprecated", "Warning", "warn(")


def _ddfm(*args: str) -> str:
    """``python -m ddfm ARGS`` in a fresh process (library messages come at first import); its stderr."""
    run = subprocess.run([sys.executable, "-m", "ddfm", *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.mark.slow
def test_partition_in_its_own_process_writes_only_its_own_lines_to_stderr(tmp_path):
    """faiss's AVX512/AVX2 loading messages used to reach stderr on every run (one process: partition)."""
    data = make_data(tmp_path, n_fashion=12, n_digits=0, n_text=4)
    embed(EmbedConfig(data=[str(data)], encoder="pixels@8", out=str(tmp_path / "embed")))
    err = _ddfm("partition", str(data), "--features", str(tmp_path / "embed"), "-k", "2", "--algorithm",
                "two-stage", "--fine-clusters", "4", "--out", str(tmp_path / "part"))
    for noise in NOISE:
        assert noise not in err, err


@pytest.mark.slow
def test_no_library_chatter_on_stderr(tmp_path):
    """faiss's AVX512/AVX2 loading messages and transformers' cache deprecation warning
    used to reach stderr on every run; only ddfm's own lines may (embed, partition, generate)."""
    data = make_data(tmp_path, n_fashion=12, n_digits=0, n_text=4)
    model = init(InitConfig(preset="tiny-llava", data=str(data), out=str(tmp_path / "init")))
    err = _ddfm("embed", str(data), "--encoder", "pixels@8", "--out", str(tmp_path / "embed"))
    err += _ddfm("partition", str(data), "--features", str(tmp_path / "embed"), "-k", "2", "--algorithm",
                 "two-stage", "--fine-clusters", "4", "--out", str(tmp_path / "part"))
    err += _ddfm("generate", "--experts", str(model), "--prompt", "What is this?", "--max-new-tokens", "3")
    for noise in NOISE:
        assert noise not in err, err
