"""`radscan export` and scoring without torch (issue 24 part 1): the exported shipped model gives
torch's scores, z and maps on the examples and on the official test split, `radscan score`,
`scan`, `info` and `evaluate` use it, and a graph or a model.json that was altered is refused."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from radscan.cli import cli
from radscan.errors import ExitCode
from radscan.ingest import load_images
from radscan.model.engine import load_engine
from radscan.model.metadata import read_metadata
from radscan.policy import Policy, for_model

from .conftest import CXR_DIR, REPO

pytest.importorskip("onnxruntime", reason="needs radscan[onnx]: pip install -e '.[dev]'")
pytest.importorskip("onnx", reason="needs radscan[onnx]: pip install -e '.[dev]'")

SHIPPED = REPO / "models" / "kermany-tiny"
EXAMPLES = REPO / "examples" / "studies"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "kermany-tiny-onnx"
    result = CliRunner().invoke(cli, ["export", str(SHIPPED), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["engine"] == "onnxruntime"
    return out


def test_the_export_scores_and_explains_as_torch_does(exported):
    """Same scores and z within 1e-4, the same order, the same maps (to 1e-4 of the map's scale) on the
    test split's films and the examples, whichever path (score only, with maps, with every kind)."""
    films = load_images([str(CXR_DIR / "kermany_pediatric_224/test_normal"), str(CXR_DIR / "kermany_pediatric_224/"
                        "test_abnormal"), str(EXAMPLES)], for_model(Policy(), read_metadata(SHIPPED), SHIPPED),
                        workers=2, progress=False)[0]
    torch_engine, onnx_engine = load_engine(SHIPPED, "cpu")[0], load_engine(exported)[0]
    assert onnx_engine.threshold == torch_engine.threshold
    first = torch_engine.score(films, components=False).scores, onnx_engine.score(films, components=False).scores
    assert len(films) > 600 and np.abs(first[0] - first[1]).max() <= 1e-4
    assert (np.argsort(-first[0], kind="stable") == np.argsort(-first[1], kind="stable")).all()
    some = films[::40]  # 16 films or so: the full path is three networks
    for explain, components in ((True, False), (True, True)):
        a, b = torch_engine.score(some, explain, components), onnx_engine.score(some, explain, components)
        for field in ("scores", "z"):
            assert np.abs(getattr(a, field) - getattr(b, field)).max() <= 1e-4, field
        assert np.abs(a.explanation_maps - b.explanation_maps).max() <= 30 * 1e-4  # the picture's scale: 0-30 z
        assert a.explanation_maps.max() > 1  # maps with something in them were compared
        assert np.abs(a.residual_maps - b.residual_maps).max() <= 1e-4


def test_score_scan_info_and_evaluate_use_it_without_importing_torch(exported, tmp_path):
    program = f"""
import json, sys
from click.testing import CliRunner
from radscan.cli import cli
runner = CliRunner()
score = runner.invoke(cli, ["score", {str(EXAMPLES)!r}, "--out", {str(tmp_path / "onnx" / "report.csv")!r},
                            "--model", {str(exported)!r}, "--workers", "1", "--json"])
scan = runner.invoke(cli, ["scan", {str(EXAMPLES)!r}, "--out", {str(tmp_path / "inventory.csv")!r},
                           "--model", {str(exported)!r}, "--workers", "1"])
info = runner.invoke(cli, ["info", {str(exported)!r}])
evaluate = runner.invoke(cli, ["evaluate", "--normal", {str(EXAMPLES / "ped-normal-01")!r},
                               "--normal", {str(EXAMPLES / "ped-normal-02")!r},
                               "--abnormal", {str(EXAMPLES / "ped-pneumonia-01")!r},
                               "--model", {str(exported)!r}, "--workers", "1", "--json"])
print(json.dumps({{"codes": [score.exit_code, scan.exit_code, info.exit_code, evaluate.exit_code],
                  "torch": "torch" in sys.modules, "info": info.stdout, "errors": [score.output[-300:]]}}))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=600)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["codes"] == [0, 0, 0, 0], outcome
    assert outcome["torch"] is False  # the scoring path of an exported model never imports torch
    assert "ONNX Runtime" in outcome["info"]
    assert CliRunner().invoke(cli, ["score", str(EXAMPLES), "--out", str(tmp_path / "torch" / "report.csv"),
                                    "--model", str(SHIPPED), "--workers", "1"]).exit_code == 0
    rows = {side: {row["path"]: row for row in csv.DictReader(open(tmp_path / side / "report.csv", encoding="utf-8"))}
            for side in ("onnx", "torch")}
    assert rows["onnx"].keys() == rows["torch"].keys()
    for path, row in rows["onnx"].items():
        other = rows["torch"][path]
        assert abs(float(row["score"]) - float(other["score"])) <= 1e-4 and row["rank"] == other["rank"], path
        assert row["flag"] == other["flag"] and bool(row["residual_png"]) == bool(other["residual_png"])


def test_an_altered_graph_or_an_edited_model_json_is_refused(exported, tmp_path):
    import shutil

    for damage in ("graph", "threshold", "qc", "calibration", "no graphs", "specificity"):
        copy = tmp_path / damage
        shutil.copytree(exported, copy)
        if damage == "graph":
            data = bytearray((copy / "explain.onnx").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (copy / "explain.onnx").write_bytes(bytes(data))
        else:
            metadata = json.loads((copy / "model.json").read_text())
            if damage == "threshold":
                metadata["calibration"]["threshold"] = 0.99
            elif damage == "calibration":  # the values people read, held as constants in the graphs
                metadata["calibration"]["mean"][3] = 70.0
            elif damage == "specificity":  # what the drift check aims at, and people read (a trial)
                metadata["calibration"]["target_specificity"] = 0.99
            elif damage == "no graphs":
                del metadata["onnx"]
            else:
                del metadata["qc"]
            (copy / "model.json").write_text(json.dumps(metadata))
        result = CliRunner().invoke(cli, ["score", str(EXAMPLES), "--out", str(tmp_path / f"out-{damage}" / "out.csv"),
                                          "--model", str(copy), "--workers", "1"])
        assert result.exit_code == ExitCode.DATA, (damage, result.output)
        assert ("sha256" in result.stderr) if damage == "graph" else ("edited" in result.stderr), result.stderr
        assert "Traceback" not in result.output


def test_what_export_cannot_do_is_refused_in_words(exported, tiny_model, tmp_path):
    critic = CliRunner().invoke(cli, ["export", str(tiny_model), "--out", str(tmp_path / "critic")])
    assert critic.exit_code == ExitCode.USAGE and "needs a gradient" in critic.stderr
    again = CliRunner().invoke(cli, ["export", str(SHIPPED), "--out", str(exported)])
    assert again.exit_code == ExitCode.USAGE and "never overwrites" in again.stderr
    inside = CliRunner().invoke(cli, ["export", str(SHIPPED), "--out", str(SHIPPED / "onnx-inside")])
    assert inside.exit_code == ExitCode.USAGE and "inside the model" in inside.stderr
    assert not (SHIPPED / "onnx-inside").exists()
    gpu = CliRunner().invoke(cli, ["score", str(EXAMPLES), "--out", str(tmp_path / "gpu" / "report.csv"), "--model",
                                   str(exported), "--device", "cuda"])
    assert gpu.exit_code == ExitCode.USAGE and "ONNX Runtime on the CPU" in gpu.stderr
    assert not (tmp_path / "gpu").exists()  # refused before any output was made
    assert "Exported for ONNX Runtime" in (exported / "README.md").read_text()  # the card says what changed
    calibrate = CliRunner().invoke(cli, ["calibrate", str(exported), "--normals", str(EXAMPLES / "ped-normal-01"),
                                         "--out", str(tmp_path / "cal")])
    assert calibrate.exit_code == ExitCode.USAGE and "need the torch model it was exported from" in calibrate.stderr
    again = CliRunner().invoke(cli, ["export", str(exported), "--out", str(tmp_path / "again")])
    assert again.exit_code == ExitCode.USAGE and "need the torch model it was exported from" in again.stderr


def test_every_file_of_the_exported_model_is_synced_before_model_json_lists_it(tmp_path, monkeypatch):
    """The export copied the QC reference, the card and the split without a sync: after a power cut
    the folder could hold an empty qc.safetensors under a model.json that lists its sha256, and every
    run refused the model."""
    import os

    from .support import fsync_spy

    synced: list[str] = []
    before_rename: list[str] = []
    monkeypatch.setattr(os, "fsync", fsync_spy(synced, before_rename=before_rename))
    out = tmp_path / "onnx"
    result = CliRunner().invoke(cli, ["export", str(SHIPPED), "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = {path.name for path in out.iterdir() if path.is_file()}
    assert {"qc.safetensors", "README.md", "model.json"} <= files <= set(synced), (files, synced)
    graphs = {name for name in files if name.endswith(".onnx")}
    assert graphs and graphs | {"model.json"} <= set(before_rename), before_rename
    # the copies are synced before model.json, which lists their digests, is written
    assert synced.index("qc.safetensors") < len(synced) - 1 - synced[::-1].index("model.json")


@pytest.mark.parametrize("failure", ["full disk", "failed trace"])
def test_a_failed_export_leaves_nothing_and_a_rerun_completes_it(tmp_path, monkeypatch, failure):
    """A helper's review: an export that failed half way (a full disk, an error in the ONNX trace)
    left its temporary graph and some files in --out, and the rerun refused the folder as "not an
    empty folder"."""
    import os

    import torch

    from .support import fsync_spy

    if failure == "full disk":
        monkeypatch.setattr(os, "fsync", fsync_spy([], fail="explain.onnx"))
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("the trace failed")
        monkeypatch.setattr(torch.onnx, "export", broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        result = CliRunner().invoke(cli, ["export", str(SHIPPED), "--out", str(out)])
        assert result.exit_code == (ExitCode.CANT_CREATE if failure == "full disk" else ExitCode.CRASH), result.output
        if out == empty:  # left as it was given
            assert out.is_dir() and not list(out.iterdir())
        else:
            assert not out.exists()
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["export", str(SHIPPED), "--out", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output



def test_a_density_model_with_a_critic_blur_exports_and_scores_as_torch_does(tmp_path):
    """A trial: `radscan export` of a density model trained with `--critic-blur` (a documented
    option) failed inside torch's ONNX exporter (adaptive pooling after the blur's replicated edges)
    and printed hundreds of lines of its graph over the --json line. It exports, and scores as torch."""
    import shutil

    from radscan.model.config import preset
    from radscan.train import TrainConfig, train

    normals = tmp_path / "normals"
    normals.mkdir()
    for path in sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[:48]:
        shutil.copy(path, normals / path.name)
    model = tmp_path / "blurred"
    train([str(normals)], model, preset("tiny", score_kind="density", density_grid=8, critic_blur_sigma=2.0,
                         critic_snapshots=1),
          TrainConfig(epochs=1, batch_size=8), workers=1, progress=False)
    out = tmp_path / "blurred-onnx"
    done = subprocess.run([sys.executable, "-m", "radscan", "-q", "export", str(model), "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["ok"] is True  # the one line on stdout
    films = load_images([str(CXR_DIR / "kermany_pediatric_224/test_abnormal")], for_model(Policy(),
                        read_metadata(model), model), workers=2, progress=False)[0][:64]
    a, b = load_engine(model, "cpu")[0].score(films, True, False), load_engine(out)[0].score(films, True, False)
    assert np.abs(a.z - b.z).max() <= 1e-4 and np.abs(a.explanation_maps - b.explanation_maps).max() <= 30 * 1e-4
