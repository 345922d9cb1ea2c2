"""The default model shipped in models/: it loads, its metadata is complete, and it still gives
the scores recorded for the example studies (a regression guard for the whole pipeline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from radscan.cli import cli
from radscan.model.io import load_model
from radscan.preprocess import PREPROCESS_VERSION
from radscan.score import default_model_dir

from .conftest import REPO

RECORDED = Path(__file__).parent / "data" / "example_scores.json"


def test_shipped_model_loads_and_its_metadata_is_complete():
    model, metadata = load_model(default_model_dir())
    assert metadata["preprocess_version"] == PREPROCESS_VERSION
    assert metadata["name"] == default_model_dir().name
    assert (default_model_dir() / "README.md").is_file(), "the model card"
    assert (default_model_dir() / "train_log.jsonl").is_file()
    calibration = metadata["calibration"]
    assert calibration["method"] and calibration["n_calibration"] >= 100
    assert 0.0 < calibration["threshold"] < 1.0
    assert metadata["training"]["n_train"] >= 900
    # the recipe the README and the model card describe: the density score, 5 snapshot critics, last epoch
    assert metadata["config"]["score_kind"] == "density" and len(model.critics) == 5
    assert model.density is not None and model.density.precision.shape == (64, 112, 112)
    assert metadata["training"]["shipped"] == "last epoch"
    # radscan info shows the test split's figures (read once, as the card gives them) beside validation's
    assert {"test_auc", "test_auc_ci95", "test_sensitivity", "test_specificity"} <= metadata["metrics"].keys()
    assert sum(p.numel() for p in model.parameters()) == metadata["parameters"]
    assert metadata["weights"]["bytes"] < 100 * 2**20


def test_examples_score_as_recorded(tmp_path):
    out = tmp_path / "report.csv"
    result = CliRunner().invoke(cli, ["score", str(REPO / "examples" / "studies"), "--out", str(out), "--json",
                                      "--workers", "1"])  # no --model: the shipped default
    assert result.exit_code == 0, result.output
    with open(out, newline="") as handle:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    recorded = json.loads(RECORDED.read_text())
    assert recorded["model_sha256"] == load_model(default_model_dir())[1]["weights"]["sha256"]
    assert scores == pytest.approx(recorded["scores"], abs=1e-5)
