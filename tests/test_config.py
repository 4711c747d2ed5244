"""The dataclass ⇄ argparse mirror that every stage's CLI is built on."""

import argparse
from dataclasses import dataclass

import pytest

from ddfm.cli import COMMANDS, main
from ddfm.config import add_arguments, arg, from_namespace


@dataclass
class Example:
    data: list[str] = arg("input files", positional=True)
    out: str = arg("output directory", default="out")
    k: int = arg("number of clusters", default=2)
    plot: bool = arg("write a PNG", default=False)
    mode: str = arg("routing mode", default="centroid", choices=("centroid", "uniform"))
    tau: float | None = arg("temperature", default=None)

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k: must be at least 2, got {self.k}")


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, Example)
    return from_namespace(Example, p.parse_args(argv))


def test_fields_map_to_options_and_back():
    cfg = parse(["a.jsonl", "b.jsonl", "--k", "4", "--plot", "--mode", "uniform", "--tau", "2.5"])
    assert cfg == Example(data=["a.jsonl", "b.jsonl"], out="out", k=4, plot=True, mode="uniform", tau=2.5)


def test_defaults_and_negated_bool():
    cfg = parse(["a.jsonl", "--no-plot"])
    assert cfg.k == 2 and cfg.plot is False and cfg.tau is None


def test_choices_are_enforced(capsys):
    with pytest.raises(SystemExit):
        parse(["a.jsonl", "--mode", "bogus"])
    assert "invalid choice" in capsys.readouterr().err


def test_validation_error_is_a_one_line_cli_error(tmp_path, capsys, monkeypatch):
    # a real stage's config through the real CLI: the error names the field
    code = main(["prepare", "no-such-source", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ddfm prepare: error:") and "no-such-source" in err


def test_every_command_resolves_to_a_config_and_function():
    import importlib

    for name, (spec, _) in COMMANDS.items():
        module_name, config_name, fn_name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            pytest.fail(f"command {name!r}: module {module_name} missing: {err}")
        assert hasattr(module, config_name), f"{name}: {module_name}.{config_name} missing"
        assert callable(getattr(module, fn_name)), f"{name}: {module_name}.{fn_name} missing"


def test_atomic_writes_replace_whole_files_with_the_usual_mode(tmp_path):
    import os
    import stat

    from ddfm.io import atomic_path, read_json, write_json

    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    except RuntimeError:
        pass
    assert read_json(target) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
