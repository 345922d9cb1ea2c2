"""`radscan evaluate` and `radscan calibrate` on small labelled sets of real radiographs."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from radscan.cli import cli
from radscan.ingest import load_images
from radscan.model.io import load_model
from radscan.model.runtime import score_arrays
from radscan.policy import Policy

from .conftest import CXR_DIR

SHIPPED_MODEL = Path(__file__).parents[1] / "models" / "kermany-tiny"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("labelled")
    for label, folder, count in (("normal", "test_normal", 12), ("abnormal", "test_abnormal", 10)):
        (root / label).mkdir()
        for path in sorted((CXR_DIR / "kermany_pediatric_224" / folder).iterdir())[:count]:
            shutil.copy(path, root / label / path.name)
    return root / "normal", root / "abnormal"


def _mann_whitney_auc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    """P(abnormal score > normal score) + half the ties, counted pair by pair."""
    greater = (abnormal[:, None] > normal[None, :]).sum()
    ties = (abnormal[:, None] == normal[None, :]).sum()
    return (greater + 0.5 * ties) / (len(normal) * len(abnormal))


def test_evaluate_agrees_with_an_independent_auc(labelled, tiny_model, tmp_path):
    normal, abnormal = labelled
    roc = tmp_path / "roc.png"
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal),
                                      "--model", str(tiny_model), "--roc", str(roc), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model, _ = load_model(tiny_model)
    scores = [score_arrays(model, load_images([str(f)], Policy(), 1, False)[0]).scores.numpy()
              for f in (normal, abnormal)]
    assert report["auc"] == pytest.approx(_mann_whitney_auc(*scores), abs=1e-9)
    assert (report["normal"], report["abnormal"]) == (12, 10)
    low, high = report["auc_ci95"]
    assert low <= report["auc"] <= high
    at = report["at_model_threshold"]
    assert at["threshold"] == pytest.approx(float(model.threshold))
    assert at["specificity"] == pytest.approx((scores[0] < at["threshold"]).mean())
    assert at["sensitivity"] == pytest.approx((scores[1] >= at["threshold"]).mean())
    assert Image.open(roc).size == (640, 600)
    assert (at["tp"], at["fn"]) == ((scores[1] >= at["threshold"]).sum(), (scores[1] < at["threshold"]).sum())
    # accuracy beside what flagging every image (or none) scores on this set; a weak flag said
    assert (report["majority_class"], report["majority_class_accuracy"]) == ("normal", pytest.approx(12 / 22))
    said = [warning for warning in report["warnings"] if "flags only" in warning]
    assert len(said) == (at["sensitivity"] < 0.5)


def test_a_weak_flag_is_said_and_models_of_one_name_are_told_apart_in_the_figures():
    """A trial: an adult model of AUC 0.75 flagged 6% of 319 pneumonias at its threshold, and nothing
    said so; its recalibrated copy's histogram panel had the same title as the original's."""
    from radscan.evaluate import _figure_name, _weak_flag

    def result(sensitivity: float, tp: int, fn: int, name: str = "adult", version: str = "1") -> dict:
        return {"label": f"{name} {version} (torch, sha256 0)", "model_name": name, "auc": 0.752,
                "at_model_threshold": {"sensitivity": sensitivity, "specificity": 0.95, "tp": tp, "fn": fn}}

    weak = _weak_flag(result(20 / 319, 20, 299))
    assert "flags only 20 of these 319" in weak and "6.3%" in weak and "AUC 0.752" in weak
    assert _weak_flag(result(0.5, 10, 10)) == "" and _weak_flag(result(float("nan"), 0, 0)) == ""
    first, second, other = result(0.1, 1, 9), result(0.1, 1, 9, version="2"), result(0.1, 1, 9, name="child")
    assert _figure_name(first, [first, second]) != _figure_name(second, [first, second])
    assert _figure_name(first, [first, other]) == "adult"


def test_a_set_unfit_to_measure_on_is_said_so_and_unreadable_files_exit_3(labelled, tiny_model, tmp_path):
    """A trial: the same film given as normal and abnormal measured AUC 0.5 without a word; 5 normals
    against 1 abnormal reported "AUC 1.000 (1.000-1.000)"; unreadable files exited 0 where the help
    promises 3."""
    normal, abnormal = tmp_path / "normal", tmp_path / "abnormal"
    shutil.copytree(labelled[0], normal)
    abnormal.mkdir()
    first = sorted(normal.iterdir())[0]
    Image.open(first).save(abnormal / "same_film_again.png")  # a copy in another format
    (normal / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                      str(tiny_model), "--json", "--workers", "1", "--out", str(out)])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["files_unreadable"] == 1 and report["ok"] is False
    assert [w.split(" ")[:2] for w in report["warnings"]] == [["2", "films"], ["only", "12"]], report["warnings"]
    assert "labelled both normal and abnormal" in report["warnings"][0]
    page = (out / "evaluation.html").read_text()
    assert "labelled both normal and abnormal" in page and "measure on more films" in page
    text = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                    str(tiny_model), "--workers", "1"])
    assert text.exit_code == 3 and "WARNING: 2 films are copies" in text.stdout and "could not be read" in text.stdout
    fine = CliRunner().invoke(cli, ["evaluate", "--normal", str(labelled[0]), "--abnormal", str(labelled[1]),
                                    "--model", str(tiny_model), "--json", "--workers", "1"])
    assert fine.exit_code == 0 and json.loads(fine.stdout)["warnings"] == []
    for path in sorted(labelled[1].iterdir())[:3]:  # copies within a class count twice: said
        shutil.copy(path, abnormal / path.name)
        Image.open(path).save(abnormal / f"{path.stem}_again.png")
    (normal / "broken.jpeg").unlink()
    again = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                     str(tiny_model), "--json", "--workers", "1"])
    assert any(w.startswith("3 films are copies of another film of their own class")
               for w in json.loads(again.stdout)["warnings"]), again.stdout


def test_evaluation_report_compares_two_models_on_the_same_images(labelled, tiny_model, tmp_path):
    """--out: a page a person can read, the per-image CSV, the figures; two models: a paired bootstrap."""
    normal, abnormal = labelled
    shipped = Path(__file__).parents[1] / "models" / "kermany-tiny"
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                      str(tiny_model), "--model", str(shipped), "--out", str(out), "--json",
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    first, second = report["models"]
    comparison = report["comparisons"][0]
    assert comparison["difference"] == pytest.approx(second["auc"] - first["auc"])
    assert comparison["ci95"][0] <= comparison["difference"] <= comparison["ci95"][1]
    with open(out / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (12 + 10) and {row["model"] for row in rows} == {first["model_name"],
                                                                             second["model_name"]}
    assert {row["model_sha256"] for row in rows} == {first["model_sha256"], second["model_sha256"]}
    shipped_rows = [row for row in rows if row["model"] == second["model_name"]]
    assert sum(row["flag"] == "true" and row["label"] == "abnormal" for row in shipped_rows) == \
        second["at_model_threshold"]["tp"]
    page = (out / "evaluation.html").read_text()
    assert "not a diagnosis" in page and "paired bootstrap" in page.lower() and f"{second['auc']:.3f}" in page
    assert f"calling every image normal scores {12 / 22:.3f}" in " ".join(page.split())
    weak = [w for w in report["warnings"] if "flags only" in w]  # said on the page as in --json
    assert len(weak) == sum(m["at_model_threshold"]["sensitivity"] < 0.5 for m in report["models"])
    assert all(w.split(":")[0] in page for w in weak)
    for figure in ("roc.png", "histogram.png"):
        assert Image.open(out / figure).size[0] == 640


def test_files_of_one_name_in_two_folders_are_told_apart(labelled, tiny_model, tmp_path):
    """A new user's trial: two --normal folders holding a file of the same name gave two identical
    rows in per_image.csv; each row names its folder."""
    normal, abnormal = labelled
    twin = tmp_path / "other_site"
    twin.mkdir()
    name = sorted(normal.iterdir())[0].name
    shutil.copy(sorted(normal.iterdir())[1], twin / name)  # another film under the same name
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--normal", str(twin), "--abnormal",
                                      str(abnormal), "--model", str(tiny_model), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    with open(out / "per_image.csv", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    assert len(paths) == len(set(paths)) == 12 + 1 + 10
    assert {os.path.join(str(normal), name), os.path.join(str(twin), name)} <= set(paths)


def test_calibrate_sets_the_threshold_on_site_normals(labelled, tiny_model, tmp_path):
    normal, _ = labelled
    out = tmp_path / "calibrated"
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_model), "--normals", str(normal), "--out", str(out),
                                      "--target-specificity", "0.9", "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    # 12 normals at specificity 0.9: 1.2 expected above the threshold, a quantile that is mostly noise
    assert "the threshold rests on 12 calibration normals" in result.stderr and "use at least 50" in result.stderr
    assert "the threshold rests on 12 calibration normals" in json.loads(result.stdout)["warning"]  # --json says it
    model, metadata = load_model(out)  # verifies hash and calibration consistency
    assert metadata["calibration"]["n_calibration"] == 12
    assert metadata["calibration"]["method"] == "12 normals at specificity 0.9"
    scores = score_arrays(model, load_images([str(normal)], Policy(), 1, False)[0]).scores.numpy()
    assert (scores >= float(model.threshold)).mean() <= 0.1 + 1e-9
    kept = load_model(tiny_model)[1]["metrics"]  # threshold-free figures stay, stale ones go
    specificity = 1 - (scores >= float(model.threshold)).mean()
    assert metadata["metrics"] == {**{k: v for k, v in kept.items() if "auc" in k},
                                   "calibration_specificity": pytest.approx(specificity)}
    assert load_model(tiny_model)[1]["weights"]["sha256"] != metadata["weights"]["sha256"]  # original untouched
    original = load_model(tiny_model)[1]
    assert metadata["version"] != original["version"]  # a recalibrated model is another version
    assert metadata["recalibrated_from"] == {"version": original["version"], "sha256": original["weights"]["sha256"]}
    # issue 21 item 9: the directory tells one story: its calibration scores, report and card are the new ones
    with open(out / "calibration_scores.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 12
    report = (out / "training_report.html").read_text()
    assert "Recalibrated" in report and "No quality control reference" in report  # 48 normals: no QC
    assert f"{float(metadata['calibration']['threshold']):.4f}" in report

    # never in place by accident, never over another model
    for args in ([], ["--out", str(out)]):
        refused = CliRunner().invoke(cli, ["calibrate", str(tiny_model), "--normals", str(normal), *args])
        assert refused.exit_code == 2, refused.output


@pytest.mark.parametrize("killed_in", ["_record_split", "_describe_recalibration", "swap_folders"])
def test_a_model_recalibrated_in_place_and_killed_is_still_the_earlier_model(labelled, tiny_model, tmp_path,
                                                                             monkeypatch, killed_in):
    """A new user's trial: `calibrate --in-place` killed after the new weights replaced the old ones
    and before model.json followed left a model every nightly run refused (exit 65), its earlier
    weights gone. The new model is written whole beside it and put in its place in one step."""
    import radscan.calibration

    model = tmp_path / "site"
    shutil.copytree(tiny_model, model)
    before = {path.name: path.read_bytes() for path in model.iterdir() if path.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill at that step: nothing after it runs

    monkeypatch.setattr(radscan.calibration, killed_in, killed)
    result = CliRunner().invoke(cli, ["calibrate", str(model), "--normals", str(labelled[0]), "--in-place",
                                      "--workers", "1"])
    assert result.exit_code != 0
    assert {path.name: path.read_bytes() for path in model.iterdir() if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["site"]  # nothing half-made left beside it
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["calibrate", str(model), "--normals", str(labelled[0]), "--in-place",
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert load_model(model)[1]["version"] != load_model(tiny_model)[1]["version"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["site"]
    inside = CliRunner().invoke(cli, ["calibrate", str(model), "--normals", str(labelled[0]), "--out",
                                      str(model / "sub"), "--workers", "1"])
    assert inside.exit_code == 2 and not (model / "sub").exists(), inside.output


def test_calibrate_in_place_removes_what_a_killed_run_left_and_works_on_a_mount_point(labelled, tiny_model,
                                                                                      tmp_path, monkeypatch):
    """A review: each kill -9 left a hidden copy of the whole model beside it (nine after twelve
    kills), and a model folder that is a mount point (a container's volume), which cannot be
    exchanged, was exit 73 where it used to be recalibrated."""
    import radscan.calibration

    model = tmp_path / "site"
    shutil.copytree(tiny_model, model)
    shutil.copytree(tiny_model, tmp_path / ".site.calibrating")  # what a killed run left
    args = ["calibrate", str(model), "--normals", str(labelled[0]), "--in-place", "--workers", "1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["site"]
    first = load_model(model)[1]["version"]
    monkeypatch.setattr(radscan.calibration.os.path, "ismount", lambda path: Path(path) == model)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert load_model(model)[1]["recalibrated_from"]["version"] == first  # the second one was written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["site"]
    assert not (model / ".calibrating").exists()


def test_copies_among_calibration_normals_count_once_and_too_few_distinct_ones_are_refused(labelled, tiny_model,
                                                                                            tmp_path):
    """A trial: 12 copies of one film were accepted, gave the score a spread of 0, and the model then
    flagged 58 of 62 films with z-scores of 2e7."""
    films = sorted(labelled[0].iterdir())
    copies, mixed = tmp_path / "copies", tmp_path / "mixed"
    copies.mkdir()
    shutil.copytree(labelled[0], mixed)
    for index in range(12):
        shutil.copy(films[0], copies / f"copy{index}.jpeg")
        Image.open(films[index % 3]).save(mixed / f"again{index}.png")  # the same films as PNG
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_model), "--normals", str(copies), "--out",
                                      str(tmp_path / "c1"), "--workers", "1"])
    assert result.exit_code == 66 and "only 1 distinct usable calibration normals" in result.output
    assert "11 of the 12 calibration normals are copies of another" in result.output
    assert not (tmp_path / "c1" / "model.json").exists()
    (mixed / "broken.jpeg").write_bytes(films[0].read_bytes()[:300])  # a file that cannot be read: exit 3
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_model), "--normals", str(mixed), "--out",
                                      str(tmp_path / "c2"), "--workers", "1", "--json"])
    assert result.exit_code == 3, result.output
    assert "12 of the 24 calibration normals are copies of another" in result.stderr
    assert json.loads(result.stdout)["n_calibration"] == 12 and json.loads(result.stdout)["files_unreadable"] == 1
    assert "12 of the 24 calibration normals are copies" in json.loads(result.stdout)["warning"]  # --json says it


def test_a_recalibrated_model_card_gives_the_new_threshold(labelled, tmp_path):
    """Issue 21 item 9: after `radscan calibrate`, the shipped model's card (README.md) says first that the
    model was recalibrated and gives the threshold `radscan info` gives."""
    normal, _ = labelled
    normals = tmp_path / "normals"
    shutil.copytree(normal, normals)
    first = sorted(normals.iterdir())[0]
    Image.open(first).convert("L").rotate(180).save(normals / "turned.png")  # not a film the model would score
    out = tmp_path / "site"
    shipped = Path(__file__).parents[1] / "models" / "kermany-tiny"
    result = CliRunner().invoke(cli, ["calibrate", str(shipped), "--normals", str(normals), "--out", str(out),
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "1 of 13 images failed quality control and are not used (e.g. turned.png" in result.stderr
    with open(out / "calibration_scores.csv", newline="") as handle:
        assert "turned.png" not in {row["path"] for row in csv.DictReader(handle)}
    threshold = float(load_model(out)[0].threshold)
    card = (out / "README.md").read_text()
    title, notice = card.split("\n\n")[:2]
    assert title == (shipped / "README.md").read_text().split("\n\n")[0]
    assert "Recalibrated" in notice and f"{threshold:.4f}" in notice
    metadata = json.loads((out / "model.json").read_text())  # the new weights, and one predecessor named
    assert metadata["weights"]["sha256"] in notice and "previous_version" not in metadata
    assert metadata["recalibrated_from"]["version"] in notice
    report = (out / "training_report.html").read_text()  # the validation figures evaluate measured, not "none"
    assert "12 normals of a site" in report
    measured = load_model(shipped)[1]["metrics"]["val_auc"]
    assert "No labelled validation data" not in report and f"validation AUC {measured:.3f}" in report
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert f"{threshold:.4f}"[:5] in info.output


def test_evaluate_leaves_out_what_quality_control_rejects_and_says_how_many(labelled, tiny_model, tmp_path):
    """The measure describes the films the nightly job would score: blank films among the normals (any
    grey, any size) are left out under --qc strict, counted, listed with their reason (JSON,
    per_image.csv, the page: none is lost), and measured under --qc warn."""
    normal, abnormal = labelled
    mixed = tmp_path / "normal"
    shutil.copytree(normal, mixed)
    blanks = [(0, 512, 512), (255, 300, 420), (128, 256, 256), (37, 64, 150)]
    for grey, height, width in blanks:
        Image.fromarray(np.full((height, width), grey, np.uint8)).save(mixed / f"blank_{grey}.png")
    args = ["evaluate", "--normal", str(mixed), "--abnormal", str(abnormal), "--model", str(tiny_model), "--json",
            "--workers", "1"]
    out = tmp_path / "report"
    strict = json.loads(CliRunner().invoke(cli, [*args, "--out", str(out)]).stdout)
    assert (strict["normal"], strict["abnormal"]) == (12, 10)
    set_aside = strict["rejected_by_qc"].pop("films")
    assert strict["rejected_by_qc"] == {"normal": len(blanks), "abnormal": 0, "qc": "strict"}
    names = {os.path.join(str(mixed), f"blank_{grey}.png") for grey, _, _ in blanks}  # with their folder
    assert {film["path"] for film in set_aside} == names and all(film["reason"] for film in set_aside)
    with open(out / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 + 10 + len(blanks) and {row["engine"] for row in rows} == {"torch"}
    rejected_rows = [row for row in rows if row["status"] == "rejected by quality control"]
    assert {row["path"] for row in rejected_rows} == names
    assert all(row["score"] == "" and row["reason"] and row["label"] == "normal" for row in rejected_rows)
    page = (out / "evaluation.html").read_text()
    assert all(name in page for name in names) and set_aside[0]["reason"].split(":")[0] in page
    words = CliRunner().invoke(cli, [a for a in args if a != "--json"])  # the same call, in words
    assert f"left out by quality control (--qc strict): {len(blanks)} normal, 0 abnormal" in words.stdout
    assert "(torch, sha256 " in words.stdout  # a model and its ONNX export read apart
    warned_out = tmp_path / "warned"
    warned = json.loads(CliRunner().invoke(cli, [*args, "--qc", "warn", "--out", str(warned_out)]).stdout)
    assert warned["normal"] == 12 + len(blanks) and warned["rejected_by_qc"]["normal"] == 0
    # measured, but marked: a new user's trial found them scored with nothing to tell them apart
    assert warned["failed_qc_but_measured"] == {"normal": len(blanks), "abnormal": 0}
    with open(warned_out / "per_image.csv", newline="") as handle:
        marked = {row["path"]: row for row in csv.DictReader(handle)}
    assert all(marked[name]["status"] == "scored" and marked[name]["qc"] == "fail" and marked[name]["reason"]
               for name in names)
    assert {row["qc"] for path, row in marked.items() if path not in names} <= {"pass", "warn"}
    assert f"{len(blanks)} of the films measured failed quality control" in (warned_out / "evaluation.html").read_text()
    in_words = CliRunner().invoke(cli, [a for a in args if a != "--json"] + ["--qc", "warn"]).stdout
    assert f"measured although quality control failed them (--qc warn): {len(blanks)} normal" in in_words


def test_json_is_strict_when_a_measure_is_undefined(capsys):
    """A new user's trial: an evaluation with no film flagged printed "precision": NaN, which strict
    JSON parsers refuse; an undefined measure is null, however deep."""
    from radscan.cli.common import echo_json
    from radscan.evaluate import metrics_at

    measured = metrics_at(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]), threshold=0.9)  # none flagged
    assert np.isnan(measured["precision"])
    echo_json({"models": [{"at_model_threshold": measured, "auc_ci95": (float("nan"), float("inf"))}]})
    parsed = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    model = parsed["models"][0]
    assert model["at_model_threshold"]["precision"] is None and model["auc_ci95"] == [None, None]
    assert model["at_model_threshold"]["sensitivity"] == 0.0


def test_models_that_read_films_differently_are_measured_on_the_same_films(labelled, tiny_model, tmp_path,
                                                                           monkeypatch):
    """A whole-film model and a thorax-box model read films two ways, and quality control's whole film
    of a box reading is made by another resize (radscan.preprocess.to_qc_input): a film at a limit
    could pass one reading and fail the other, pairing scores with the wrong labels. Quality control
    judges once; here the box reading's whole film is made blank for a third of the films."""
    import radscan.ingest
    from radscan.preprocess import to_qc_input

    monkeypatch.setattr(radscan.ingest, "to_qc_input",
                        lambda grey: np.zeros((128, 128), np.uint8) if grey.sum() % 3 == 0 else to_qc_input(grey))
    normal, abnormal = labelled
    shipped = Path(__file__).parents[1] / "models" / "kermany-tiny"  # a thorax-box model, read second
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                      str(tiny_model), "--model", str(shipped), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(m["normal"], m["abnormal"]) for m in report["models"]] == [(12, 10), (12, 10)]
    assert report["rejected_by_qc"]["films"] == []


def test_evaluate_says_when_the_model_has_seen_the_films(labelled, tmp_path):
    """A site that measures the shipped model on the normals it was made with gets a warning, in the
    text, the JSON and the page, instead of a page that says the films are new to it (a trial)."""
    rows = list(csv.DictReader((SHIPPED_MODEL / "training_split.csv").open()))
    seen = tmp_path / "copy" / "of" / "train_normal"  # another copy of the training folder, found by name
    seen.mkdir(parents=True)
    for split, count in (("train", 5), ("calibration", 3)):
        for row in [row for row in rows if row["split"] == split][:count]:
            shutil.copy(CXR_DIR / "kermany_pediatric_224/train_normal" / row["path"], seen / row["path"])
    _, abnormal = labelled
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(seen), "--abnormal", str(abnormal), "--model",
                                      str(SHIPPED_MODEL), "--out", str(out), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["films_it_knows"] == {"train": 5, "calibration": 3}
    assert "have the names of films model" in result.stderr and "optimistic" in result.stderr
    # a trial: --json's warnings were [] while the WARNING was printed
    assert any(warning.startswith("5 of the films measured have the names of films model")
               for warning in json.loads(result.stdout)["warnings"])
    page = (out / "evaluation.html").read_text()
    assert "has seen some of these films" in page and "none of them among these images" not in page

    fresh = CliRunner().invoke(cli, ["evaluate", "--normal", str(labelled[0]), "--abnormal", str(abnormal), "--model",
                                     str(SHIPPED_MODEL), "--out", str(tmp_path / "fresh"), "--json", "--workers", "1"])
    assert json.loads(fresh.stdout)["films_it_knows"] == {"train": 0, "calibration": 0}
    assert "optimistic" not in fresh.stderr and not any("films measured" in warning
                                                          for warning in json.loads(fresh.stdout)["warnings"])
    page = (tmp_path / "fresh" / "evaluation.html").read_text()
    assert "has seen some" not in page and "none of them among these images, by name" in page


def test_films_it_knows_matches_the_end_of_a_path(tmp_path):
    from radscan.model.metadata import SPLIT_FILE, films_it_knows

    metadata = json.loads((SHIPPED_MODEL / "model.json").read_text())
    metadata["training"]["n_train"], metadata["calibration"]["n_calibration"] = 1, 1
    (tmp_path / "model.json").write_text(json.dumps(metadata))
    (tmp_path / SPLIT_FILE).write_text("path,study_key,split\np1/a.png,k,train\nb.png,k,calibration\n")
    found = films_it_knows(tmp_path, ["/x/train/p1/a.png", "p2/a.png", "/y/b.png", "b.png", "/z/bb.png", "a.png"])
    assert found == {"train": 1, "calibration": 2}
    assert films_it_knows(tmp_path / "nowhere", ["b.png"]) is None  # nobody can tell
    (tmp_path / "film_123.png").symlink_to(tmp_path / "p1" / "a.png")  # a link under another name: its target
    assert films_it_knows(tmp_path, [str(tmp_path / "film_123.png")]) == {"train": 1}
    # not radscan's, emptied, cut, or relabelled: the counts model.json states are not there
    for text in ("file,study_key,part\nb.png,k,calibration\n", "", "path,study_key,split\n",
                 "path,study_key,split\np1/a.png,k,train\n",
                 "path,study_key,split\np1/a.png,k,TRAINED\nb.png,k,calibration\n"):
        (tmp_path / SPLIT_FILE).write_text(text)
        assert films_it_knows(tmp_path, ["b.png"]) is None, text


def test_a_recalibrated_model_knows_the_normals_that_set_its_threshold(labelled, tiny_model, tmp_path):
    """A calibrated copy kept its source's list: evaluate on the normals that set its threshold said
    it had seen none of them (a trial)."""
    normal, abnormal = labelled
    out = tmp_path / "calibrated"
    assert CliRunner().invoke(cli, ["calibrate", str(tiny_model), "--normals", str(normal), "--out", str(out),
                                    "--workers", "1"]).exit_code == 0
    splits = {row["split"] for row in csv.DictReader((out / "training_split.csv").open())}
    assert splits == {"train", "earlier calibration", "calibration"}
    result = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                      str(out), "--json", "--workers", "1"])
    assert json.loads(result.stdout)["films_it_knows"] == {"train": 0, "calibration": 12}
    (out / "training_split.csv").unlink()
    report = tmp_path / "report"
    unknown = CliRunner().invoke(cli, ["evaluate", "--normal", str(normal), "--abnormal", str(abnormal), "--model",
                                       str(out), "--json", "--workers", "1", "--out", str(report)])
    assert json.loads(unknown.stdout)["films_it_knows"] is None and "cannot be told" in unknown.stderr
    page = (report / "evaluation.html").read_text()
    assert "does not say which films it was made with" in page and "none of them among these images" not in page
