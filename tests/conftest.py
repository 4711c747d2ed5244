"""Shared fixtures: real data from the offline sources, small and cached per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # 2 cores here: keep torch from oversubscribing when tests start subprocesses
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
