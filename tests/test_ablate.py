"""`ddfm ablate`: the rows of the paper's ablation tables, and --quick end to end (slow)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ddfm.ablate import ABLATIONS, AblateConfig, ablate, variants
from ddfm.demo import resolve_preset


def test_variants_change_one_setting_of_the_baseline():
    preset = resolve_preset("image")
    rows = variants(preset, list(ABLATIONS))
    assert len(rows) == sum(len(v) for v in ABLATIONS.values())
    base = {"encoder": preset["encoder"], "k": preset["k"], "algorithm": preset["algorithm"], "routing": "top-1"}
    field = {"K": "k", "encoder": "encoder", "clustering": "algorithm", "routing": "routing"}
    for group, setting in rows:  # a row moves only its group's setting ...
        assert {k for k in base if setting[k] != base[k]} <= {field[group]}, (group, setting)
    for group, entries in ABLATIONS.items():  # ... to each of the group's values, the baseline's among them once
        values = [s[field[group]] for g, s in rows if g == group]
        assert values == [e[field[group]] for e in entries] and len(set(values)) == len(values), group
        assert values.count(base[field[group]]) == 1, group
    assert ("K", {**base, "k": 4}) in rows
    assert ("encoder", {**base, "encoder": "tower"}) in rows
    with pytest.raises(ValueError, match="groups"):
        AblateConfig(groups=["nope"])


@pytest.mark.slow
def test_ablate_quick_end_to_end(tmp_path):
    report = ablate(AblateConfig(out=str(tmp_path / "run"), quick=True))
    text = report.read_text()
    for label in ("K=4", "| encoder | tower |", "| encoder | pixels |", "two-stage", "| routing | posterior |"):
        assert label in text, label
    data = json.loads((tmp_path / "run" / "ablate" / "ablate.json").read_text())
    assert len(data["rows"]) == sum(len(v) for v in ABLATIONS.values())
    # K=4 trained four compute-matched experts at a quarter of the dense batch
    k4 = tmp_path / "run" / "ablate" / "pixels-k4-balanced"
    dense = json.loads((tmp_path / "run" / "dense" / "ddfm.json").read_text())["compute"]
    for j in range(4):
        c = json.loads((k4 / f"expert-{j}" / "ddfm.json").read_text())["compute"]
        assert c["steps"] == dense["steps"] and 4 * c["batch_size"] == dense["batch_size"]
    with Image.open(tmp_path / "run" / "ablate" / "ablate.png") as im:
        im.verify()
