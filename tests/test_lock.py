"""The lock files in requirements/: current with their inputs, every pin hashed, and the three
install sets consistent with each other (the same transformers everywhere, torch only where the
set owns it). Reads files only: no index, no resolver, so the result cannot change with new releases.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
LOCKS = ["uv", "torch-cpu", "cpu", "nodeps", "harness", "nodeps-harness", "full"]

_spec = importlib.util.spec_from_file_location("lock", REQ / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def pins(name: str) -> dict[str, tuple[str, int]]:
    """{package: (version, number of hashes)} of requirements/<name>.txt."""
    text = (REQ / f"{name}.txt").read_text()
    out = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            out[m[1].lower()] = (m[2], block.count("--hash=sha256:"))
    return out


def test_locks_match_inputs():
    assert lock.stale([str(REQ / f"{n}.txt") for n in LOCKS]) == []


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_has_a_hash(name):
    p = pins(name)
    assert p, name
    assert [k for k, (_, n) in p.items() if n == 0] == []


def test_torch_only_where_the_set_owns_it():
    assert "torch" not in pins("cpu") and "torch" not in pins("harness")
    assert pins("torch-cpu")["torch"][0] == "2.13.0+cpu"
    assert pins("full")["torch"][0] == "2.14.1" and pins("full")["torchvision"][0] == "0.29.1"


def test_shared_packages_pinned_alike():
    cpu, harness, full = pins("cpu"), pins("harness"), pins("full")
    assert {k: v[0] for k, v in cpu.items()} == {k: harness[k][0] for k in cpu}
    assert {k: v[0] for k, v in cpu.items()} == {k: full[k][0] for k in cpu}


def test_digest_follows_the_dependency_lists(tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "a.in").write_text("x==1\n")
    base = '[build-system]\nrequires = ["setuptools>=68"]\n[project]\nname = "p"\ndependencies = ["a>=1"]\n'
    (tmp_path / "pyproject.toml").write_text(base)
    d0 = lock.inputs_digest(tmp_path)
    (tmp_path / "pyproject.toml").write_text(base + "# a comment\n[tool.pytest.ini_options]\nx = 1\n")
    assert lock.inputs_digest(tmp_path) == d0
    (tmp_path / "pyproject.toml").write_text(base.replace("a>=1", "a>=2"))
    assert lock.inputs_digest(tmp_path) != d0
    (tmp_path / "pyproject.toml").write_text(base)
    (tmp_path / "requirements" / "a.in").write_text("x==2\n")
    assert lock.inputs_digest(tmp_path) != d0
