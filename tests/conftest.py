"""Shared fixtures: real data from the offline sources, small and cached per session.

The helpers the test files share are the modules of ``tests/helpers/`` (pytest puts
``tests/`` on ``sys.path``: ``pythonpath`` in pyproject); their asserts are rewritten
like the tests' own, so a failing check in a helper shows its values.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.register_assert_rewrite("helpers")


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # 2 cores here: keep torch from oversubscribing when tests start subprocesses
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def family_data(tmp_path_factory) -> dict:
    """The real records the VLM family checkpoints are built on (:func:`helpers.checkpoints.family_data`),
    one directory for the session, so each family's checkpoint is built once (:func:`helpers.checkpoints.built`)."""
    from helpers import checkpoints  # lazy: torch and transformers, only for the family tests

    return checkpoints.family_data(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def python_docs() -> tuple[list, list]:
    """(train, test) records of the Python docs passages as ``ddfm prepare python-docs`` cuts them
    (``max_words=60``, seed 0), parsed once: read only."""
    from ddfm.prepare import build_source  # lazy: only the tests of real text passages need it

    return build_source("python-docs", seed=0, max_words=60)
