"""The command line end to end: help, exit codes, JSON summary, environment variables."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from radscan import __version__
from radscan.cli import cli
from radscan.errors import ExitCode

from .conftest import CXR_DIR, DICOM_DIR
from .support import read_rows

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, auto_envvar_prefix="RADSCAN")


def test_every_command_has_help_with_an_example():
    result = _run("--help")
    assert result.exit_code == 0 and "research and triage support" in result.output
    for name, command in cli.commands.items():
        sub = _run(name, "--help")
        assert sub.exit_code == 0, name
        assert command.help and "Example" in sub.output and "Exit codes" in sub.output


def test_version():
    result = _run("--version")
    assert result.exit_code == 0 and __version__ in result.output


@pytest.fixture()
def study_folder(tmp_path) -> Path:
    """A user's folder: DICOM without extensions, JPEGs in patient folders, a stray text file."""
    root = tmp_path / "incoming"
    (root / "study1").mkdir(parents=True)
    shutil.copy(DICOM_DIR / "fo-dicom/CR-MONO1-10-chest", root / "study1" / "IM000001")
    shutil.copy(DICOM_DIR / "pydicom/test-SR.dcm", root / "study1" / "SR000001")
    (root / "patient2").mkdir()
    for jpeg in sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:2]:
        shutil.copy(jpeg, root / "patient2" / jpeg.name)
    (root / "notes.txt").write_text("not an image\n")
    return root


def test_scan_writes_inventory_previews_and_json(study_folder, tmp_path):
    out, previews = tmp_path / "out" / "inventory.csv", tmp_path / "out" / "previews"
    result = _run("scan", str(study_folder), "--out", str(out), "--previews", str(previews), "--json")
    assert result.exit_code == ExitCode.OK, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 5 and summary["counts"] == {"ok": 3, "skipped": 2, "error": 0, "rejected": 0}
    with open(out, newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    jpegs = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:2]
    assert set(rows) == {"study1/IM000001", "study1/SR000001", "notes.txt",
                         *(f"patient2/{jpeg.name}" for jpeg in jpegs)}
    assert rows["study1/IM000001"]["kind"] == "dicom" and rows["notes.txt"]["kind"] == "other"
    jpeg_rows = [row for path, row in rows.items() if path.startswith("patient2/")]
    assert all(row["study_key"] == (study_folder.resolve() / "patient2").as_posix() for row in jpeg_rows)
    assert len(list(previews.glob("*.png"))) == 3
    for row in rows.values():
        assert (row["preview_png"] != "") == (row["status"] == "ok")
        if row["preview_png"]:
            assert (out.parent / row["preview_png"]).is_file()


def test_scan_exit_code_when_files_are_bad(study_folder, tmp_path):
    (study_folder / "study1" / "IM000002.dcm").write_bytes(b"<html>not dicom</html>" * 10)
    result = _run("scan", str(study_folder), "--out", str(tmp_path / "inv.csv"))
    assert result.exit_code == ExitCode.PARTIAL
    assert "1 error" in result.stderr


def test_missing_or_empty_input_is_no_input(tmp_path):
    result = _run("scan", str(tmp_path / "nope"), "--out", str(tmp_path / "inv.csv"))
    assert result.exit_code == ExitCode.NO_INPUT and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = _run("scan", str(tmp_path / "empty"), "--out", str(tmp_path / "inv.csv"))
    assert result.exit_code == ExitCode.NO_INPUT and "no files found" in result.output
    assert not (tmp_path / "inv.csv").exists()


def test_bad_option_is_a_usage_error(tmp_path):
    result = _run("scan", str(tmp_path), "--out", str(tmp_path / "x.csv"), "--frames", "all")
    assert result.exit_code == ExitCode.USAGE


def test_options_from_environment(study_folder, tmp_path):
    env = {"RADSCAN_SCAN_MODALITIES": "MR", "RADSCAN_SCAN_WORKERS": "1"}
    result = _run("scan", str(study_folder), "--out", str(tmp_path / "inv.csv"), "--json", env=env)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["counts"]["ok"] == 2  # the CR film is now out of scope


def test_console_script_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "radscan", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_failed_run_keeps_the_previous_inventory(study_folder, tmp_path, monkeypatch):
    out = tmp_path / "inv.csv"
    assert _run("scan", str(study_folder), "--out", str(out)).exit_code == 0
    before = out.read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr("radscan.scan.iter_ingested", lambda *a, **k: (explode() for _ in [0]))
    result = _run("scan", str(study_folder), "--out", str(out))
    assert result.exit_code == ExitCode.CRASH
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".inv.csv")] == []


def test_names_that_spreadsheets_would_run_are_written_as_text(tmp_path, cxr_dir):
    """OWASP CSV injection: folder and file names starting with = + - @ reach the CSV as text."""
    source = next((cxr_dir / "kermany_pediatric_224/train_normal").iterdir())
    (tmp_path / "in" / "=HYPERLINK(1)").mkdir(parents=True)
    for name in ("=HYPERLINK(1)/a.jpeg", "@SUM(1).jpeg", "-2+3.jpeg", "+1.jpeg", "b=1.jpeg"):
        shutil.copy(source, tmp_path / "in" / name)
    out = tmp_path / "inventory.csv"
    result = _run("scan", str(tmp_path / "in"), "--out", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    with open(out, newline="") as handle:
        paths = sorted(row["path"] for row in csv.DictReader(handle))
    assert paths == ["'+1.jpeg", "'-2+3.jpeg", "'=HYPERLINK(1)/a.jpeg", "'@SUM(1).jpeg", "b=1.jpeg"]


USAGE_CASES = ["workers 0", "empty key file", "toml number for a path", "val-normal alone", "nan timeout",
               "inf specificity", "toml batch 1.5", "toml true for a number", "empty modalities", "empty phi key",
               "key file a fifo", "key file among the inputs", "roc onto an input", "model among the normals",
               "absurd batch size", "toml 0 for a flag", "toml text for a number", "toml key outside a table",
               "misspelled variable", "toml date for a number", "toml list of lists", "model variable misnamed",
               "toml numbers for paths", "toml true among modalities", "toml secret outside a table",
               "toml secret of the wrong type"]


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_errors_exit_2_with_one_line(case, tmp_path, cxr_dir):
    """Exit 1 means a bug in radscan and nothing else: these are the user's to fix (exit 2). None
    of them may silently mean something else (nan passes every bound, "" meant "all", 1.5 -> 1)."""
    normals = str(cxr_dir / "kermany_pediatric_224/train_normal")
    abnormals = str(cxr_dir / "kermany_pediatric_224/val_abnormal")
    (tmp_path / "empty.key").touch()
    os.mkfifo(tmp_path / "fifo.key")
    for name, text in {
        "c.toml": "[score]\nmodel = 5\n",
        "batch.toml": "[score]\nbatch_size = 1.5\n",
        "bool.toml": "[score]\nworkers = true\n",
        # a trial's: an on/off option given 0 crashed (exit 1); "64" in quotes was taken; a key outside a table
        "flag.toml": "[score]\nno_html = 0\n",
        "text.toml": '[score]\nbatch_size = "64"\n',
        "top.toml": "verbose = true\n[score]\nworkers = 1\n",
        "date.toml": "[score]\nbatch_size = 1979-05-27\n",
        "nested.toml": '[score]\nmodalities = [["CR"]]\n',
        # a review's: numbers for repeatable paths crashed (exit 1), true among modalities read as "True", and a
        # refusal printed the site's PHI key
        "paths.toml": "[calibrate]\nnormals = [1, 2]\n",
        "modalities.toml": '[score]\nmodalities = [true, "CR"]\n',
        "secret.toml": 'phi_key = "site-secret-4711"\n[score]\nworkers = 1\n',
        "secret2.toml": "[score]\nphi_key = 4711471147114711\n",
    }.items():
        (tmp_path / name).write_text(text)
    score = ["score", normals, "--out", str(tmp_path / "r.csv")]
    args = {
        "nan timeout": [*score, "--read-timeout", "nan"],
        "inf specificity": ["calibrate", str(Path(__file__).parents[1] / "models/kermany-tiny"), normals,
                            "--out", str(tmp_path / "m"),
                            "--target-specificity", "inf"],
        "toml batch 1.5": ["--config", str(tmp_path / "batch.toml"), *score],
        "toml true for a number": ["--config", str(tmp_path / "bool.toml"), *score],
        "toml 0 for a flag": ["--config", str(tmp_path / "flag.toml"), *score],
        "toml text for a number": ["--config", str(tmp_path / "text.toml"), *score],
        "toml key outside a table": ["--config", str(tmp_path / "top.toml"), *score],
        "misspelled variable": score,
        "model variable misnamed": score,
        "toml date for a number": ["--config", str(tmp_path / "date.toml"), *score],
        "toml list of lists": ["--config", str(tmp_path / "nested.toml"), *score],
        "toml numbers for paths": ["--config", str(tmp_path / "paths.toml"), "calibrate",
                                   str(Path(__file__).parents[1] / "models/kermany-tiny"),
                                   "--out", str(tmp_path / "m")],
        "toml true among modalities": ["--config", str(tmp_path / "modalities.toml"), *score],
        "toml secret outside a table": ["--config", str(tmp_path / "secret.toml"), *score],
        "toml secret of the wrong type": ["--config", str(tmp_path / "secret2.toml"), *score],
        "empty modalities": [*score, "--modalities", " , "],
        "empty phi key": [*score, "--phi", "hash", "--phi-key", ""],
        "short phi key": [*score, "--phi", "hash", "--phi-key", "abc"],
        "key file a fifo": [*score, "--phi", "hash", "--phi-key-file", str(tmp_path / "fifo.key")],
        "key file among the inputs": [*score, "--phi", "hash", "--phi-key-file", f"{normals}/site.key"],
        "roc onto an input": ["evaluate", "--normal", normals, "--abnormal", abnormals, "--roc",
                              f"{abnormals}/roc.png"],
        "model among the normals": ["train", normals, "--out", f"{normals}/model"],
        "absurd batch size": [*score, "--batch-size", "99999999999999999999"],
        "workers 0": ["scan", normals, "--out", str(tmp_path / "i.csv"), "--workers", "0"],
        "empty key file": ["score", normals, "--out", str(tmp_path / "r.csv"), "--phi", "hash",
                           "--phi-key-file", str(tmp_path / "empty.key")],
        "toml number for a path": ["--config", str(tmp_path / "c.toml"), "score", normals, "--out",
                                   str(tmp_path / "r.csv")],
        "val-normal alone": ["train", normals, "--out", str(tmp_path / "m"), "--val-normal", normals],
    }[case]
    # a trial: RADSCAN_SCORE_PHII=hash was ignored and patient identifiers written in clear
    env = {"misspelled variable": {"RADSCAN_SCORE_PHII": "hash"},
           "model variable misnamed": {"RADSCAN_SCORE_MODEL": "m"}}.get(case)
    result = _run(*args, env=env)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Traceback" not in result.output and result.stderr.strip().count("\n") <= 3
    said = {"misspelled variable": "RADSCAN_SCORE_PHII names no option of radscan score (did you mean "
                                   "RADSCAN_SCORE_PHI?)",
            "toml key outside a table": "verbose = true in",
            "model variable misnamed": "(did you mean RADSCAN_MODEL?)",
            "toml date for a number": "is not a value radscan reads",
            "toml list of lists": "is not a value radscan reads",
            "toml 0 for a flag": "'no_html' in the [score] table of",
            "toml text for a number": "'batch_size' in the [score] table of",
            "toml numbers for paths": "holds an item that is not text in quotes",
            "toml true among modalities": "holds an item that is not text in quotes"}
    assert said.get(case, "") in " ".join(result.stderr.split())
    assert "4711" not in result.output  # a secret is named, never shown


def test_help_is_shown_whatever_the_environment_holds():
    """A review: a misspelt RADSCAN_SCORE_ variable left in the environment blocked `score --help`; the
    command itself is still refused."""
    env = {"RADSCAN_SCORE_PHII": "hash"}
    for asked in (["score", "--help"], ["score", "-h"]):
        shown = _run(*asked, env=env)
        assert shown.exit_code == ExitCode.OK and "score [OPTIONS] PATHS" in shown.output
    assert _run("score", ".", env=env).exit_code == ExitCode.USAGE


def test_a_usage_error_ends_with_a_timestamped_line():
    """A review: a usage error (an unknown option, a bad setting) ended with Click's bare "Error:" line,
    which a log parser does not read as radscan's; usage and hint lines come first."""
    failed = subprocess.run([sys.executable, "-m", "radscan", "score", ".", "--nonsense"], capture_output=True,
                            text=True)
    assert failed.returncode == ExitCode.USAGE
    lines = failed.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and "--help" in lines[1]
    assert lines[-1][:4].isdigit() and lines[-1][10] == "T" and " radscan ERROR: No such option" in lines[-1]


def test_json_on_failure_and_timestamped_start_and_end_lines(tmp_path, cxr_dir):
    """Under cron: --json prints an object even when the run fails (a wrapper kept an empty
    last-run.json), and -v logs carry timestamps and a start and an end line with the run id."""
    source = next((cxr_dir / "kermany_pediatric_224/train_normal").iterdir())
    (tmp_path / "in").mkdir()
    shutil.copy(source, tmp_path / "in" / source.name)
    command = [sys.executable, "-m", "radscan", "-v", "score", str(tmp_path / "in"), "--no-residuals", "--json",
               "--workers", "1"]
    failed = subprocess.run([*command, "--out", str(tmp_path / "a.csv"), "--model", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert failed.returncode == ExitCode.DATA
    assert json.loads(failed.stdout) == {"ok": False, "exit_code": 65, "error": json.loads(failed.stdout)["error"]}
    assert "no model at" in json.loads(failed.stdout)["error"]
    # every line of a failed run's log is timestamped, its last (the error) too (a trial's log parser)
    assert failed.stderr.strip() and all(line[:4].isdigit() and line[10] == "T" and " radscan " in line
                                         for line in failed.stderr.splitlines()), failed.stderr
    assert failed.stderr.splitlines()[-1].split(" ", 1)[1].startswith("radscan ERROR: no model at")
    done = subprocess.run([*command, "--out", str(tmp_path / "out" / "b.csv")], capture_output=True, text=True)
    summary = json.loads(done.stdout)
    assert done.returncode == 0 and summary["ok"] and summary["exit_code"] == 0 and summary["model_sha256"]
    lines = done.stderr.splitlines()
    assert any(f"run {summary['run_id']} started" in line for line in lines)
    assert any(f"run {summary['run_id']} finished" in line for line in lines)
    assert all(line[:4].isdigit() and line[10] == "T" for line in lines if "radscan INFO" in line)


def test_json_asked_for_by_variable_or_settings_file_also_speaks_on_failure(tmp_path):
    """RADSCAN_SCORE_JSON (the option's name, as the README's rule says) and `json = true` in the
    TOML work like --json, failures included; every command's summary starts with ok and exit_code."""
    (tmp_path / "s.toml").write_text("[score]\njson = true\n")
    base = [sys.executable, "-m", "radscan"]
    missing = ["score", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.csv")]
    for extra, env in (([], {"RADSCAN_SCORE_JSON": "1"}), (["--config", str(tmp_path / "s.toml")], {})):
        failed = subprocess.run([*base, *extra, *missing], capture_output=True, text=True, env={**os.environ, **env})
        assert failed.returncode == ExitCode.NO_INPUT
        assert json.loads(failed.stdout)["exit_code"] == ExitCode.NO_INPUT, failed.stdout
    unreadable = subprocess.run([*base, *missing], capture_output=True, text=True,
                                env={**os.environ, "RADSCAN_SCORE_JSON": "maybe"})  # the variable itself is wrong
    assert unreadable.returncode == ExitCode.USAGE and json.loads(unreadable.stdout)["exit_code"] == ExitCode.USAGE
    # a bad value is blamed on where it came from, not on an option nobody typed (issue 21)
    assert "RADSCAN_SCORE_JSON" in unreadable.stderr and "'--json'" not in unreadable.stderr
    (tmp_path / "bad.toml").write_text('[score]\nworkers = "some"\n')
    blamed = subprocess.run([*base, "--config", str(tmp_path / "bad.toml"), *missing], capture_output=True, text=True)
    assert blamed.returncode == ExitCode.USAGE
    assert f"'workers' in the [score] table of {tmp_path / 'bad.toml'}" in blamed.stderr, blamed.stderr
    (tmp_path / "bad.toml").write_text('[score]\nqc = "bogus"\n')  # the key as written, not its parameter (qc_mode)
    blamed = subprocess.run([*base, "--config", str(tmp_path / "bad.toml"), *missing], capture_output=True, text=True)
    assert blamed.returncode == ExitCode.USAGE and "'qc' in the [score] table" in blamed.stderr, blamed.stderr
    typed = subprocess.run([*base, *missing, "--workers", "some"], capture_output=True, text=True)
    assert typed.returncode == ExitCode.USAGE and "'--workers'" in typed.stderr
    shipped = str(Path(__file__).parents[1] / "models" / "kermany-tiny")
    info = json.loads(subprocess.run([*base, "info", "--json", shipped], capture_output=True, text=True).stdout)
    assert info["ok"] is True and info["exit_code"] == 0 and info["weights"]["sha256"]


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("weights"),
    lambda m: m["config"].update(widths=[8, 16, 32, 64, 256]),
    lambda m: m["config"].update(image_size=-128),
    lambda m: m["calibration"].update(threshold="high"),
    lambda m: m.update(qc="yes"),
    lambda m: m["population"].update(age_years=[5]),
], ids=["no weights", "widths", "negative size", "threshold type", "qc block", "ages"])
def test_malformed_model_metadata_is_exit_65_with_one_line(edit, tmp_path):
    """model.json edited by hand: every command that reads it refuses with one line (issue 11 item 1)."""
    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "kermany-tiny", model)
    metadata = json.loads((model / "model.json").read_text())
    edit(metadata)
    (model / "model.json").write_text(json.dumps(metadata))
    result = _run("info", str(model))
    assert result.exit_code == ExitCode.DATA, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_info_shows_a_model_whose_descriptive_fields_are_missing(tmp_path):
    """Fields that change no score (the parameter count) are only shown: missing, they print "?"."""
    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "kermany-tiny", model)
    metadata = json.loads((model / "model.json").read_text())
    del metadata["parameters"]
    (model / "model.json").write_text(json.dumps(metadata))
    result = _run("info", str(model))
    assert result.exit_code == ExitCode.OK, result.output
    assert "parameters      ?" in result.output


@pytest.mark.parametrize("closed", [1, 2], ids=["stdout", "stderr"])
def test_a_closed_stdout_does_not_blame_the_files(tmp_path, cxr_dir, closed):
    """Started with stdout closed (`>&-`), every file used to fail as "the decoder crashed on this
    file" (exit 3): the decoding workers could not start. Now the stream is pointed at /dev/null."""
    (tmp_path / "in").mkdir()
    for path in sorted((cxr_dir / "kermany_pediatric_224/test_normal").iterdir())[:3]:
        shutil.copy(path, tmp_path / "in" / path.name)
    out = tmp_path / "out" / "inventory.csv"
    command = [sys.executable, "-m", "radscan", "scan", str(tmp_path / "in"), "--out", str(out), "--workers", "2",
               "--json", "--qc", "off"]
    done = subprocess.run(command, preexec_fn=lambda: os.close(closed), stdout=subprocess.PIPE if closed == 2 else None,
                          stderr=subprocess.PIPE if closed == 1 else None, text=True)
    assert done.returncode == 0, (done.stdout, done.stderr)
    with open(out, newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["ok"] * 3


@pytest.mark.parametrize("command", ["scan", "train", "evaluate"])
def test_an_output_under_a_file_is_exit_73_with_one_line(command, tmp_path, cxr_dir):
    """Unwritable outputs exit 73 with one line, never 1 with a traceback (issue 11 item 2)."""
    images, abnormal = (str(cxr_dir / "kermany_pediatric_fullres" / kind) for kind in ("normal", "abnormal"))
    (tmp_path / "afile").write_text("not a folder")
    args = {"scan": ["scan", images, "--out", str(tmp_path / "afile" / "inventory.csv")],
            "train": ["train", images, "--out", str(tmp_path / "afile" / "model"), "--epochs", "1",
                      "--critic-snapshots", "1"],
            "evaluate": ["evaluate", "--normal", images, "--abnormal", abnormal, "--roc",
                         str(tmp_path / "afile" / "roc.png")]}[command]
    result = _run(*args)
    assert result.exit_code == ExitCode.CANT_CREATE, result.output
    assert "afile is a file, not a folder" in result.output or "Not a directory" in result.output
    assert "Traceback" not in result.output


def test_the_nightly_wrapper_keeps_monitoring_files_and_speaks_on_failure(tmp_path, cxr_dir):
    """examples/nightly: last-run.json always holds one JSON object, last_success marks completed
    runs, and a failed run prints a line on stderr (cron mails it)."""
    (tmp_path / "in").mkdir()
    shutil.copy(next((cxr_dir / "kermany_pediatric_224/test_normal").iterdir()), tmp_path / "in" / "a.jpeg")
    (tmp_path / "radscan.toml").write_text("[score]\nworkers = 1\n")  # not /etc/radscan.toml
    env = {**os.environ, "RADSCAN_INPUT": str(tmp_path / "in"), "RADSCAN_OUTPUT": str(tmp_path / "out"),
           "RADSCAN_VENV": sys.prefix, "RADSCAN_CONFIG": str(tmp_path / "radscan.toml")}
    script = str(REPO / "examples" / "nightly" / "radscan-nightly.sh")
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "last-run.json").read_text())["ok"] is True
    assert (tmp_path / "out" / "last_success").is_file() and done.stderr == ""
    failed = subprocess.run(["bash", script], env={**env, "RADSCAN_MODEL": str(tmp_path / "nope")},
                            capture_output=True, text=True)
    assert failed.returncode == ExitCode.DATA
    assert json.loads((tmp_path / "out" / "last-run.json").read_text()) == {
        "ok": False, "exit_code": 65, "error": json.loads((tmp_path / "out" / "last-run.json").read_text())["error"]}
    assert "radscan nightly run failed (exit 65)" in failed.stderr
    killed_venv = tmp_path / "venv"  # a radscan killed with SIGKILL prints nothing of its own
    (killed_venv / "bin").mkdir(parents=True)
    (killed_venv / "bin" / "radscan").write_text("#!/bin/sh\nkill -9 $$\n")
    (killed_venv / "bin" / "radscan").chmod(0o755)
    (killed_venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (killed_venv / "bin" / "python").chmod(0o755)
    killed = subprocess.run(["bash", script], env={**env, "RADSCAN_VENV": str(killed_venv)}, capture_output=True,
                            text=True)
    assert killed.returncode == 137
    assert json.loads((tmp_path / "out" / "last-run.json").read_text())["exit_code"] == 137
    assert not list((tmp_path / "out").glob(".last-run.json*"))  # each run's own temporary file, renamed
    # monitoring sees a night that could not write its own metrics (killed; refused its settings)
    metrics = tmp_path / "out" / "radscan.prom"
    assert "radscan_last_exit_code 137" in metrics.read_text()
    (tmp_path / "radscan.toml").write_text("[score]\nworkers = 1\nbatch_size = 0\n")
    refused = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert refused.returncode == ExitCode.USAGE and "radscan_last_exit_code 2" in metrics.read_text()
    assert "radscan_files" in metrics.read_text()  # the last finished run's counts are kept
    assert not list((tmp_path / "out").glob(".run-started*"))
    # and the page read by the radiologists says its list is older than that failed attempt
    from radscan.htmlreport import _run_status_block

    status = _run_status_block(tmp_path / "out" / "worklist.html")[3]
    assert status["last_attempt"]["ok"] is False and status["last_attempt"]["exit_code"] == 2
    assert status["last_success"]["run_id"] == status["listed"]["run_id"]
    # a night refused by the lock (another run's) leaves that run's files alone
    before = (tmp_path / "out" / "last-run.json").read_bytes(), (tmp_path / "out" / "last_attempt").read_bytes()
    (tmp_path / "radscan.toml").write_text("[score]\nworkers = 1\n")
    from radscan.state import hold_lock

    with hold_lock(tmp_path / "out" / "worklist.lock"):
        locked = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert locked.returncode == 0 and locked.stderr == ""
    after = (tmp_path / "out" / "last-run.json").read_bytes(), (tmp_path / "out" / "last_attempt").read_bytes()
    assert after == before


def test_a_pacs_outage_is_not_a_good_night(tmp_path, dicom_dir):
    """Issue 21 item 5: with the PACS port closed the run exits 3, yet last-run.json said "ok": true,
    the wrapper touched last_success, logged "see status=error rows" (there were none) and cron
    mailed nothing. Now the summary names the unsent results apart from unreadable files, the log
    has WARNING lines with the reason, last_success stays, and stderr carries a line for cron."""
    pytest.importorskip("pynetdicom")
    from .conftest import free_port

    (tmp_path / "in").mkdir()
    shutil.copy(dicom_dir / "nih-cxr14-udacity/test1_no_finding.dcm", tmp_path / "in" / "a.dcm")
    out = tmp_path / "out"
    (tmp_path / "radscan.toml").write_text(
        f'[score]\nworkers = 1\ndicom_out = "{tmp_path / "dicom"}"\nsend = "127.0.0.1:{free_port()}"\n')
    env = {**os.environ, "RADSCAN_INPUT": str(tmp_path / "in"), "RADSCAN_OUTPUT": str(out),
           "RADSCAN_VENV": sys.prefix, "RADSCAN_CONFIG": str(tmp_path / "radscan.toml")}
    done = subprocess.run(["bash", str(REPO / "examples" / "nightly" / "radscan-nightly.sh")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == ExitCode.PARTIAL, done.stderr
    summary = json.loads((out / "last-run.json").read_text())
    assert summary["ok"] is False and summary["exit_code"] == 3 and summary["counts"]["error"] == 0
    assert summary["dicom"]["not_sent"] == 2 and summary["dicom"]["send_failure"]
    assert len(summary["problems"]) == 1 and "not sent to" in summary["problems"][0]
    assert "could not be read" not in summary["problems"][0]
    assert not (out / "last_success").exists() and (out / "last_attempt").is_file()
    assert "results not delivered or films missing (exit 3)" in done.stderr and "not sent to" in done.stderr
    log = next((out / "logs").glob("*.log")).read_text()
    assert "WARNING" in log and "status=error" not in log
    metrics = (out / "radscan.prom").read_text()  # the wrapper's metrics agree: no success, results pending
    assert "radscan_last_exit_code 3" in metrics and 'radscan_dicom_results_pending{kind="not_sent"} 2' in metrics
    assert "radscan_last_success_timestamp_seconds 0" in metrics  # none yet: an alert on its age fires


def test_the_nightly_wrapper_refuses_a_settings_file_that_is_not_there(tmp_path):
    """A typo in RADSCAN_CONFIG used to run on the defaults (--phi keep: raw identifiers) with exit 0."""
    env = {**os.environ, "RADSCAN_CONFIG": str(tmp_path / "radscan.tmol"), "RADSCAN_OUTPUT": str(tmp_path / "o"),
           "RADSCAN_VENV": sys.prefix}
    done = subprocess.run(["bash", str(REPO / "examples" / "nightly" / "radscan-nightly.sh")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is not a file" in done.stderr
    # and monitoring sees the night that did not start (a second trial: it stayed green)
    assert json.loads((tmp_path / "o" / "last-run.json").read_text())["exit_code"] == 2
    assert "radscan_last_exit_code 2" in (tmp_path / "o" / "radscan.prom").read_text()
    assert (tmp_path / "o" / "last_attempt").is_file() and not (tmp_path / "o" / "last_success").exists()
    assert "is not a file" in next((tmp_path / "o" / "logs").glob("*.log")).read_text()
    assert not list((tmp_path / "o").glob(".*"))  # no temporary file left


def test_without_posix_locks_score_refuses_with_a_reason(tmp_path, monkeypatch, cxr_dir):
    """On a system without fcntl (Windows) radscan still imports; score says why it cannot run."""
    from radscan import state

    monkeypatch.setattr(state, "fcntl", None)
    result = _run("score", str(cxr_dir / "kermany_pediatric_fullres/normal"), "--out", str(tmp_path / "r.csv"))
    assert result.exit_code == ExitCode.USAGE and "POSIX flock" in result.output


def test_info_without_a_folder_describes_the_model_score_uses(tmp_path, monkeypatch):
    monkeypatch.delenv("RADSCAN_MODEL", raising=False)
    shipped = _run("info", "--json")
    assert shipped.exit_code == 0 and json.loads(shipped.output)["name"] == "kermany-tiny"
    monkeypatch.setenv("RADSCAN_MODEL", str(tmp_path / "missing"))
    assert _run("info").exit_code == ExitCode.DATA  # the model it would use is checked, not another


@pytest.mark.parametrize("command", [["scan", "--out", "{out}/inventory.csv"],
                                     ["score", "--out", "{out}/report.csv", "--no-residuals"],
                                     ["train", "--out", "{out}/model"]])
def test_an_input_that_cannot_be_read_is_exit_66_with_the_reason(study_folder, tmp_path, monkeypatch, command):
    """Issue 22 item 11: an unreadable input folder was Click's usage error (exit 2). Run as root
    this test stands in for the permissions: listing the folder and access() are refused."""
    real_scandir, real_access = os.scandir, os.access
    refused = str(study_folder)

    def scandir(path="."):
        if os.fspath(path) == refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: os.fspath(path) != refused and real_access(path, mode,
                                                                                                          **kw))
    args = [part.format(out=tmp_path / "out") for part in command]
    result = _run(args[0], refused, *args[1:])
    assert result.exit_code == ExitCode.NO_INPUT, result.output
    assert f"cannot read input path: {refused} (Permission denied)" in result.output


def test_the_metrics_file_tells_monitoring_every_night(tmp_path, cxr_dir):
    """Issue 21 item 7: a node_exporter textfile after every run: exit code, last attempt and last
    success, files by status, flagged share. A failed run keeps the last success it had."""
    import re

    (tmp_path / "in").mkdir()
    for jpeg in sorted((cxr_dir / "kermany_pediatric_224/test_normal").iterdir())[:2]:
        shutil.copy(jpeg, tmp_path / "in" / jpeg.name)
    metrics = tmp_path / "textfile" / "radscan.prom"
    args = ["score", str(tmp_path / "in"), "--out", str(tmp_path / "out" / "report.csv"), "--no-residuals",
            "--workers", "1", "--metrics", str(metrics)]
    assert _run(*args).exit_code == ExitCode.OK

    def read() -> dict[str, float]:
        text = metrics.read_text()
        sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[a-z_ ]+"(,[a-z_]+="[a-z_ ]+")*\})? -?[0-9][0-9.e+-]*$')
        assert all(line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line)
                   for line in text.splitlines()), text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if not line.startswith("#")}

    good = read()
    assert good["radscan_last_exit_code"] == 0 and good['radscan_files{status="ok"}'] == 2
    assert 0 <= good["radscan_flagged_share"] <= 1 and good["radscan_last_success_timestamp_seconds"] > 0
    assert good['radscan_files_read{reason="new"}'] == 2 and good['radscan_files_read{reason="unchanged"}'] == 0
    shutil.rmtree(tmp_path / "in")
    (tmp_path / "in").mkdir()  # an empty share tonight: exit 66
    assert _run(*args).exit_code == ExitCode.NO_INPUT
    bad = read()
    assert bad["radscan_last_exit_code"] == 66
    assert bad["radscan_last_success_timestamp_seconds"] == good["radscan_last_success_timestamp_seconds"]
    assert bad["radscan_last_attempt_timestamp_seconds"] >= good["radscan_last_attempt_timestamp_seconds"]
    assert bad['radscan_files{status="ok"}'] == 2  # the last finished run's counts stay for monitoring
    # a metrics file that cannot be written is refused before anything is scored (a helper's trial: the
    # run scored and wrote its page, then failed with exit 73 at its very end)
    shutil.copy(sorted((cxr_dir / "kermany_pediatric_224/test_normal").iterdir())[0], tmp_path / "in")
    (tmp_path / "afile").write_text("")
    refused = _run(*args[:-1], str(tmp_path / "afile" / "radscan.prom"))
    assert refused.exit_code == ExitCode.CANT_CREATE and "nothing was scored" in refused.output
    assert read()["radscan_last_exit_code"] == 66 and len(read_rows(tmp_path / "out" / "report.csv")) == 2
    # nor may it be one of the run's own outputs, which it would replace (a second trial: the state store)
    for own in ("report.csv", "report.html", "report.lock", "report.state.sqlite"):
        clash = _run(*args[:-1], str(tmp_path / "out" / own))
        assert clash.exit_code == ExitCode.USAGE and "one of the run's own outputs" in clash.output, own
    assert len(read_rows(tmp_path / "out" / "report.csv")) == 2


def test_scan_groups_studies_as_score_does(tmp_path):
    """--study-key on scan: the inventory's study keys are the ones score would use."""
    for index, jpeg in enumerate(sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:4]):
        (tmp_path / "in" / f"p{index % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(jpeg, tmp_path / "in" / f"p{index % 2}" / jpeg.name)
    keys = {}
    for mode in ("folder", "file"):
        out = tmp_path / f"{mode}.csv"
        result = CliRunner().invoke(cli, ["scan", str(tmp_path / "in"), "--out", str(out), "--study-key", mode,
                                          "--qc", "off", "--workers", "1"])
        assert result.exit_code == 0, result.output
        with open(out, newline="") as handle:
            keys[mode] = {row["path"]: row["study_key"] for row in csv.DictReader(handle)}
    assert len(set(keys["folder"].values())) == 2 and len(set(keys["file"].values())) == 4
    assert all(keys["file"][path].endswith(path) for path in keys["file"])


def test_the_exit_codes_are_told_alike_in_help_readme_and_guide():
    """One list of exit codes (radscan.errors.EXIT_CODE_MEANINGS): `--help` prints it, the README's
    table is it word for word, and the scoring guide details each of its codes and no other."""
    import re

    from radscan.errors import EXIT_CODE_MEANINGS, exit_code_rows

    readme = (REPO / "README.md").read_text()
    table = [line for line in readme.split("## Exit codes", 1)[1].splitlines() if re.match(r"\| \d", line)]
    assert table == exit_code_rows()
    guide = (REPO / "docs/scoring.md").read_text().split("## Exit codes", 1)[1]
    detailed = [line.split("|")[1].strip() for line in guide.splitlines() if re.match(r"\| \d", line)]
    assert detailed == [" / ".join(str(int(code)) for code in codes) for codes in EXIT_CODE_MEANINGS]
    shown = CliRunner().invoke(cli, ["--help"]).output
    assert all(str(int(code)) in shown for codes in EXIT_CODE_MEANINGS for code in codes)


def test_an_output_path_cannot_forge_a_line_of_the_summary_or_an_error(tmp_path):
    """A review: `--out $'n\\nradscan INFO: all fine/report.csv'` printed the forged line on stderr after
    the run's summary, and the same in an error. Paths are written out on one line."""
    from .conftest import CXR_DIR

    forged = "radscan INFO: all fine"
    film = sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[0]
    out = tmp_path / f"n\n{forged}" / "report.csv"
    done = subprocess.run([sys.executable, "-m", "radscan", "score", str(film), "--out", str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.is_file(), done.stderr
    failed = subprocess.run([sys.executable, "-m", "radscan", "score", str(tmp_path / f"gone\n{forged}"), "--out",
                             str(tmp_path / "o" / "report.csv")], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 66, failed.stderr
    for stderr in (done.stderr, failed.stderr):
        assert not any(line.startswith(forged) for line in stderr.splitlines()), stderr
