"""Training, model files and their safety checks, on real normal radiographs."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from radscan.cli import cli
from radscan.errors import ExitCode, ModelError, NoInputError, SettingError
from radscan.ingest import load_images
from radscan.model.config import preset
from radscan.model.io import WEIGHTS_FILE, load_model
from radscan.model.runtime import score_arrays
from radscan.model.simsid import to_model_tensor
from radscan.policy import Policy
from radscan.train import TrainConfig, find_thorax_box, train
from radscan.trainer import Trainer

from .conftest import CXR_DIR, DICOM_DIR
from .support import fsync_spy

TINY = preset("tiny", critic_snapshots=2, density_grid=8)  # the density is fitted, the critic scores
FAST = TrainConfig(epochs=2, batch_size=8, seed=3, aspect=0.2, gamma=0.3, contrast=0.3, blur=1.0, noise=0.02)


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> Path:
    """48 real normal radiographs in a folder, 12 of them for calibration (a user's normals folder)."""
    folder = tmp_path_factory.mktemp("normals")
    for path in sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[:48]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def trained(normals, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    train([str(normals)], out, TINY, FAST, workers=1, progress=False)
    return out


@pytest.mark.slow
def test_a_few_steps_on_real_images_lower_the_loss(normals):
    images = load_images([str(normals)], Policy(), workers=1, progress=False)[0]
    batch = to_model_tensor(images[:16])
    trainer = Trainer(TINY, TrainConfig(seed=0), torch.device("cpu"))
    losses = [trainer.step(batch, generator_step=True)["student"] for _ in range(12)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_trained_model_loads_back_with_identical_scores(trained, normals):
    model, metadata = load_model(trained)
    assert metadata["training"]["n_images"] == 48 and metadata["calibration"]["n_calibration"] == 7
    assert metadata["name"] == "tiny"  # the folder's name
    split = (trained / "training_split.csv").read_text().splitlines()
    assert len(split) == 49 and sum(line.endswith(",calibration") for line in split) == 7
    assert metadata["calibration"]["method"].startswith("calibration normals at specificity 0.95")
    assert metadata["config"]["critic_snapshots"] == 2 and len(model.snapshot_critics) == 1
    assert (trained / "train_log.jsonl").read_text().count("\n") == 2
    assert not (trained / "checkpoint.pt").exists()
    images = load_images([str(normals)], Policy(), workers=1, progress=False)[0]
    first = score_arrays(model, images)
    again = score_arrays(load_model(trained)[0], images)
    assert torch.equal(first.scores, again.scores)
    assert torch.equal(first.residual_maps, again.residual_maps)
    for live, loaded in zip(model.critics, load_model(trained)[0].critics, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(live.state_dict().values(), loaded.state_dict().values(),
                                                     strict=True))
    # the threshold flags about 5% of normals: at most 1 of the 7 calibration normals scores above it
    assert 0.0 < float(model.threshold) < 1.0


def test_explanation_maps_show_what_calibration_normals_do_not(trained, normals):
    model = load_model(trained)[0]
    held_out = [str(normals / line.split(",")[0]) for line in (trained / "training_split.csv").read_text().splitlines()
                if line.endswith(",calibration")]
    maps = score_arrays(model, load_images(held_out, Policy(), workers=1, progress=False)[0], explain=True)
    # each pixel is shown only above the 95th percentile of these normals' maps: here 7 normals,
    # so at most one of them shows any given pixel
    assert maps.explanation_maps.shape == (7, 128, 128)
    assert ((maps.explanation_maps > 0).sum(dim=0) <= 1).all()
    assert model.explanation_normal.max() > 0 and model.normal_mean.abs().max() > 0


def test_same_seed_same_data_same_model(trained, normals, tmp_path):
    again = tmp_path / "again"
    train([str(normals)], again, TINY, FAST, workers=1, progress=False)
    assert (again / WEIGHTS_FILE).read_bytes() == (trained / WEIGHTS_FILE).read_bytes()


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_model(normals, tmp_path, monkeypatch):
    config = TrainConfig(epochs=3, batch_size=8, seed=5, gamma=0.3, blur=1.0)
    train([str(normals)], tmp_path / "straight", TINY, config, workers=1, progress=False)

    import radscan.train as train_module

    real = train_module.evaluate_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during epoch 2, after the epoch-1 checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train([str(normals)], tmp_path / "resumed", TINY, config, workers=1, progress=False)
    monkeypatch.setattr(train_module, "evaluate_epoch", real)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    with pytest.raises(Exception, match="--resume"):
        train([str(normals)], tmp_path / "resumed", TINY, config, workers=1, progress=False)
    checkpoint = (tmp_path / "resumed" / "checkpoint.pt").read_bytes()
    for damaged in (checkpoint[: len(checkpoint) // 2], b"not a checkpoint"):  # one line, exit 65, no traceback
        (tmp_path / "resumed" / "checkpoint.pt").write_bytes(damaged)
        with pytest.raises(ModelError, match="cannot be read"):
            train([str(normals)], tmp_path / "resumed", TINY, config, workers=1, progress=False, resume=True)
    (tmp_path / "resumed" / "checkpoint.pt").write_bytes(checkpoint)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    state["epoch"] = 99  # an edited checkpoint must not finish (and ship) a model at once
    torch.save(state, tmp_path / "resumed" / "checkpoint.pt")
    with pytest.raises(ModelError, match="outside"):
        train([str(normals)], tmp_path / "resumed", TINY, config, workers=1, progress=False, resume=True)
    (tmp_path / "resumed" / "checkpoint.pt").write_bytes(checkpoint)
    with pytest.raises(SettingError, match="model critic_snapshots 2 -> 3"):  # named, exit 2
        train([str(normals)], tmp_path / "resumed", preset("tiny", critic_snapshots=3), config, workers=1,
              progress=False, resume=True)
    train([str(normals)], tmp_path / "resumed", TINY, config, workers=1, progress=False, resume=True)
    straight = (tmp_path / "straight" / WEIGHTS_FILE).read_bytes()
    assert (tmp_path / "resumed" / WEIGHTS_FILE).read_bytes() == straight


def test_a_run_resumed_with_other_settings_or_normals_is_refused(normals, tmp_path):
    """A new user's trial: resumed with another --seed (or --calibration-fraction, or normals added
    and removed) the films were split again, 21 films trained on becoming calibration normals (a
    threshold set on films the model knows), and model.json named settings its first epoch never
    used. --epochs and --max-minutes may change; the budget is what stops a run early."""
    config = TrainConfig(epochs=3, batch_size=8, seed=5, max_minutes=1e-4)  # stops after epoch 1
    with pytest.raises(SettingError, match="fewer than the 2 critic snapshots"):
        train([str(normals)], tmp_path / "m", TINY, config, workers=1, progress=False)
    with pytest.raises(SettingError, match="seed 5 -> 7"):
        train([str(normals)], tmp_path / "m", TINY, replace(config, seed=7), workers=1, progress=False, resume=True)
    with pytest.raises(SettingError, match="calibration_fraction"):
        train([str(normals)], tmp_path / "m", TINY, replace(config, calibration_fraction=0.4), workers=1,
              progress=False, resume=True)
    for other in (replace(TINY, critic_blur_sigma=2.0), replace(TINY, score_kind="residual")):  # a review
        with pytest.raises(SettingError, match="model (critic_blur_sigma|score_kind)"):
            train([str(normals)], tmp_path / "m", other, config, workers=1, progress=False, resume=True)
    fewer = tmp_path / "fewer"
    shutil.copytree(normals, fewer)
    sorted(fewer.iterdir())[0].unlink()
    with pytest.raises(SettingError, match="normals differ"):
        train([str(fewer)], tmp_path / "m", TINY, config, workers=1, progress=False, resume=True)
    # the same run goes on (one more epoch within the budget), to a model
    train([str(normals)], tmp_path / "m", TINY, replace(config, epochs=4), workers=1, progress=False, resume=True)
    assert load_model(tmp_path / "m")[1]["training"]["epochs_run"] == 2


def test_a_run_its_time_budget_stopped_resumes_to_the_uninterrupted_model(normals, tmp_path, caplog):
    """A trial: a budget crossed within epoch 1 stopped it after one batch, the checkpoint counted the
    epoch whole, and `--resume` (as the message advised) gave another model than an uninterrupted run,
    whose model.json said 3 epochs and no budget stop. The budget now ends a run between epochs only:
    resumed, it is the uninterrupted model; stopped, its record says so."""
    config = replace(FAST, epochs=3)
    train([str(normals)], tmp_path / "straight", TINY, config, workers=1, progress=False)
    with pytest.raises(SettingError, match="fewer than the 2 critic snapshots"):  # one epoch, then the budget
        train([str(normals)], tmp_path / "m", TINY, replace(config, max_minutes=1e-4), workers=1, progress=False)
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1]
    result = train([str(normals)], tmp_path / "m", TINY, replace(config, max_minutes=1e-4), workers=1,
                   progress=False, resume=True)  # one more epoch, then the budget: a model of 2 of 3 epochs
    assert result.epochs_run == 2 and result.stopped_by_budget
    assert load_model(tmp_path / "m")[1]["training"]["stopped_by_budget"] is True
    # a model was made and its checkpoint removed: the advice is a new run, not --resume (a review's trial)
    said = [record.getMessage() for record in caplog.records if "epochs (model.json: stopped_by_budget)" in
            record.getMessage()]
    assert said and "train again into another --out" in said[-1] and "--resume" not in said[-1]
    again = tmp_path / "again"
    with pytest.raises(SettingError, match="fewer than the 2 critic snapshots"):
        train([str(normals)], again, TINY, replace(config, max_minutes=1e-4), workers=1, progress=False)
    result = train([str(normals)], again, TINY, config, workers=1, progress=False, resume=True)
    assert result.epochs_run == 3 and not result.stopped_by_budget
    assert (again / WEIGHTS_FILE).read_bytes() == (tmp_path / "straight" / WEIGHTS_FILE).read_bytes()


def test_a_run_killed_while_writing_its_report_is_finished_by_resume(normals, tmp_path, monkeypatch):
    """A new user's trial: killed after model.json was written and while the training report was,
    the folder had no report, and `--resume` said "already holds a trained model" (exit 2). Until
    its report is written the run is unfinished (its checkpoint stays), and --resume finishes it."""
    import radscan.train as train_module

    real = train_module._write_report

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        train([str(normals)], tmp_path / "m", TINY, FAST, workers=1, progress=False)
    monkeypatch.setattr(train_module, "_write_report", real)
    assert (tmp_path / "m" / "checkpoint.pt").exists()
    train([str(normals)], tmp_path / "m", TINY, FAST, workers=1, progress=False, resume=True)
    assert (tmp_path / "m" / "training_report.html").is_file() and not (tmp_path / "m" / "checkpoint.pt").exists()
    load_model(tmp_path / "m")


def test_a_full_disk_while_training_is_exit_73_and_the_log_keeps_one_line_per_epoch(normals, tmp_path,
                                                                                    monkeypatch):
    """A new user's trial: a disk that filled while the checkpoint was written was exit 1 "a bug"
    (torch reports it as a RuntimeError), and the rerun's log held epoch 1 twice."""
    import radscan.trainer

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    out = tmp_path / "m"
    monkeypatch.setattr(radscan.trainer.torch, "save", full)
    result = CliRunner().invoke(cli, ["train", str(normals), "--out", str(out), "--epochs", "2",
                                      "--critic-snapshots", "2", "--workers", "1", "--batch-size", "8"])
    assert result.exit_code == ExitCode.CANT_CREATE and "a full disk?" in result.output, result.output
    monkeypatch.undo()
    log_lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log_lines] == [1]  # logged, never checkpointed
    result = CliRunner().invoke(cli, ["train", str(normals), "--out", str(out), "--epochs", "2",
                                      "--critic-snapshots", "2", "--workers", "1", "--batch-size", "8", "--resume"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("how", ["learning rate 1e6", "resumed from NaN weights", "resumed from infinite weights"])
def test_training_that_diverges_stops_with_a_clear_error_and_no_model(normals, tmp_path, how):
    """Non-finite losses or calibration stop the run (exit 65) before a model is written; before,
    a NaN model was saved with exit 0 and then refused as 'edited' (issue 22, item 3)."""
    out = tmp_path / "model"
    config = TrainConfig(epochs=2, batch_size=8, seed=3)
    if how == "learning rate 1e6":
        config = TrainConfig(epochs=2, batch_size=8, seed=3, lr=1e6)
    else:
        trainer = Trainer(TINY, config, torch.device("cpu"))
        state = trainer.state(1)
        bad = float("nan") if "NaN" in how else float("inf")
        state["model"] = {k: v.float().fill_(bad) if v.is_floating_point() else v for k, v in state["model"].items()}
        out.mkdir()
        torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ModelError, match="diverged|not finite"):
        train([str(normals)], out, TINY, config, workers=1, progress=False, resume=how != "learning rate 1e6")
    assert not (out / "model.json").exists() and not (out / WEIGHTS_FILE).exists()


def test_snapshot_critics_are_the_discriminators_of_the_last_epochs():
    trainer = Trainer(preset("tiny", critic_snapshots=3), TrainConfig(batch_size=2, seed=1), torch.device("cpu"))
    batch = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []
    for _ in range(3):  # three "epochs" of one step each
        trainer.take_snapshot()
        trainer.step(batch, generator_step=True)
        seen.append({k: v.clone() for k, v in trainer.model.discriminator.state_dict().items()})
    for critic, expected in zip(trainer.model.critics, reversed(seen), strict=True):
        assert all(torch.equal(v, expected[k]) for k, v in critic.state_dict().items())
    assert not any(p.requires_grad for p in trainer.model.snapshot_critics.parameters())


def test_train_defaults_are_the_shipped_recipe():
    """`radscan train NORMALS --out DIR` must make what the shipped model's card says was made."""
    from radscan.cli import train as train_command
    from radscan.recipe import MODEL_SETTINGS, PRESET

    card = json.loads((Path(__file__).resolve().parents[1] / "models/kermany-tiny/model.json").read_text())
    recipe, config = card["training"]["train_config"], card["config"]
    defaults = {p.name: p.default for p in train_command.params}
    assert defaults["preset"] == PRESET == "tiny"
    for option, key in (("epochs", "epochs"), ("lr", "lr"), ("cosine_epochs", "cosine_t_max"), ("aspect", "aspect"),
                        ("gamma", "gamma"), ("contrast", "contrast"), ("blur", "blur"), ("noise", "noise"),
                        ("batch_size", "batch_size"), ("seed", "seed"), ("r1", "r1"),
                        ("calibration_fraction", "calibration_fraction")):
        assert defaults[option] == recipe[key] == getattr(TrainConfig(), key), option
    for option, key in (("score_kind", "score_kind"), ("critic_snapshots", "critic_snapshots"),
                        ("density_grid", "density_grid"), ("field", "field"), ("follow", "follow")):
        assert defaults[option] == MODEL_SETTINGS[key] == config[key], option
    assert defaults["synthetic"] == TrainConfig().synthetic == 0  # the shipped run predates the option: off
    assert preset(PRESET, **MODEL_SETTINGS).widths == tuple(config["widths"])


def test_acquisition_variation_keeps_shape_and_range_and_can_be_off():
    from radscan.augment import vary_acquisition

    images = to_model_tensor(np.random.default_rng(0).integers(0, 256, (6, 128, 128), dtype=np.uint8))
    off = vary_acquisition(images, torch.Generator().manual_seed(0), TrainConfig(gamma=0, contrast=0, blur=0, noise=0))
    assert off is images
    varied = vary_acquisition(images, torch.Generator().manual_seed(0), FAST)
    assert varied.shape == images.shape and varied.min() >= -1 and varied.max() <= 1
    assert not torch.equal(varied, images)
    again = vary_acquisition(images, torch.Generator().manual_seed(0), FAST)
    assert torch.equal(varied, again)  # seeded: a resumed run sees the same augmentation


def test_synthetic_anomalies_are_local_and_count_as_fake():
    from radscan.augment import local_anomalies

    images = load_images([str(CXR_DIR / "kermany_pediatric_224/train_normal")], Policy(), workers=1,
                         progress=False)[0][:8]
    batch = to_model_tensor(images)
    defects = local_anomalies(batch, torch.Generator().manual_seed(0))
    assert defects.shape == batch.shape and defects.min() >= -1 and defects.max() <= 1
    changed = ((defects - batch).abs() > 1e-3).float().mean(dim=(1, 2, 3))
    assert bool((changed > 0.01).all()) and bool((changed < 0.6).all())  # one region of every film, not all of it
    assert torch.equal(defects, local_anomalies(batch, torch.Generator().manual_seed(0)))
    losses = []
    for weight in (0.0, 1.0):
        trainer = Trainer(TINY, TrainConfig(batch_size=8, seed=1, synthetic=weight), torch.device("cpu"))
        losses.append(trainer.step(batch, generator_step=False, anomalies=defects)["d"])
    assert losses[1] > losses[0]  # the defects enter the discriminator's loss as a third, fake term


def test_training_report_is_written_and_redrawn(trained, tmp_path):
    """train writes the report beside the model; radscan report redraws it elsewhere from the files."""
    page = (trained / "training_report.html").read_text()
    for figure in ("training_curves.png", "training_fidelity.png", "calibration_histogram.png",
                   "training_samples.png"):
        assert (trained / figure).is_file() and figure in page
    assert "calibration normals: with fewer than 100" in page  # 12 held out: the warning a reader needs
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= e["calibration_mse"] < 1 and e["calibration_kl"] >= 0 for e in log)
    result = CliRunner().invoke(cli, ["report", str(trained), "--out", str(tmp_path / "again"), "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "training_report.html").is_file()
    assert CliRunner().invoke(cli, ["report", str(tmp_path)]).exit_code == ExitCode.DATA


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(model_dir, target)
    return target


def test_tampered_weights_are_refused(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x01  # one bit in one weight
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(copy)
    result = CliRunner().invoke(cli, ["info", str(copy)])
    assert result.exit_code == ExitCode.DATA and "Traceback" not in result.output


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle payload executed",))


def test_pickle_files_are_refused_without_being_loaded(trained, tmp_path, capsys):
    copy = _copy(trained, tmp_path)
    (copy / WEIGHTS_FILE).write_bytes(pickle.dumps({"model": _Exploit()}))
    metadata = json.loads((copy / "model.json").read_text())
    metadata["weights"]["sha256"] = __import__("hashlib").sha256((copy / WEIGHTS_FILE).read_bytes()).hexdigest()
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="pickle"):
        load_model(copy)
    assert "pickle payload executed" not in capsys.readouterr().out


def test_edited_threshold_or_preprocessing_is_refused(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    metadata = json.loads((copy / "model.json").read_text())
    metadata["calibration"]["threshold"] = 0.01
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="threshold"):
        load_model(copy)
    metadata = json.loads((trained / "model.json").read_text())
    metadata["preprocess_version"] = "rs-pre-0"
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="preprocessing"):
        load_model(copy)


@pytest.mark.parametrize(("block", "key", "value"), [("calibration", "target_specificity", 0.99),
                                                     ("calibration", "n_calibration", 500),
                                                     ("metrics", "val_auc", 0.999), ("training", "n_train", 10_000)])
def test_an_edited_account_of_training_or_calibration_is_refused(trained, tmp_path, block, key, value):
    """A trial: a model.json edited to say specificity 0.99 (which moved the drift check), 500
    calibration normals or a validation AUC of 0.999 was shown by radscan info and used, exit 0."""
    copy = _copy(trained, tmp_path)
    metadata = json.loads((copy / "model.json").read_text())
    metadata[block] = {**(metadata[block] or {}), key: value}
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="account of its training, calibration and metrics .* was edited"):
        load_model(copy)
    metadata = json.loads((trained / "model.json").read_text())  # a label a site may change
    metadata["name"], metadata["version"] = "site-model", "7"
    (copy / "model.json").write_text(json.dumps(metadata, indent=4))
    assert load_model(copy)[1]["name"] == "site-model"


@pytest.mark.parametrize(("key", "value"), [("score_kind", "seed"), ("memory_topk", 2),
                                            ("residual_blur_sigma", 1.0), ("critic_snapshots", 1)])
def test_edited_model_settings_are_refused(trained, tmp_path, key, value):
    copy = _copy(trained, tmp_path)
    metadata = json.loads((copy / "model.json").read_text())
    metadata["config"][key] = value
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="edited"):
        load_model(copy)


def test_train_never_overwrites_a_model_and_calibration_needs_normals(trained, normals, tmp_path):
    before = (trained / WEIGHTS_FILE).read_bytes()
    with pytest.raises(Exception, match="already holds a trained model"):
        train([str(normals)], trained, TINY, FAST, workers=1, progress=False)
    assert (trained / WEIGHTS_FILE).read_bytes() == before
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(normals.iterdir())[:2]:
        shutil.copy(path, few / path.name)
    result = CliRunner().invoke(cli, ["calibrate", str(trained), "--normals", str(few), "--out",
                                      str(tmp_path / "recalibrated"), "--workers", "1"])
    assert result.exit_code == ExitCode.NO_INPUT and "at least 5" in result.output
    assert load_model(trained)[0] is not None  # the model itself is untouched
    # the model's own training films are not a site's normals: said, in the log and on the card
    result = CliRunner().invoke(cli, ["calibrate", str(trained), "--normals", str(normals), "--out",
                                      str(tmp_path / "on-its-own"), "--workers", "1"])
    assert result.exit_code == ExitCode.OK, result.output
    assert "have the names of films it was trained on" in result.output
    card = tmp_path / "on-its-own" / "README.md"
    assert not card.is_file() or "have the names of films it was trained on" in card.read_text()
    # too few normals for the calibration split: refused before the first epoch, not after the last
    for path in sorted(normals.iterdir())[2:21]:
        shutil.copy(path, few / path.name)
    refused = CliRunner().invoke(cli, ["train", str(few), "--out", str(tmp_path / "early"), "--batch-size", "8"])
    assert refused.exit_code == ExitCode.NO_INPUT and "calibration normals after the split" in refused.output
    assert not (tmp_path / "early" / "train_log.jsonl").exists() and not (tmp_path / "early" / WEIGHTS_FILE).exists()
    six = tmp_path / "six"  # a trial: told of the batch, then, once that was mended, of the calibration normals
    six.mkdir()
    for path in sorted(normals.iterdir())[:6]:
        shutil.copy(path, six / path.name)
    refused = CliRunner().invoke(cli, ["train", str(six), "--out", str(tmp_path / "six-model")])
    assert refused.exit_code == ExitCode.NO_INPUT
    assert "5 training images after the calibration split" in refused.output
    assert "1 calibration normals after the split" in refused.output


def test_weights_file_named_elsewhere_is_refused(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    metadata = json.loads((copy / "model.json").read_text())
    metadata["weights"]["file"] = str(tmp_path / "elsewhere.safetensors")
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="edited"):
        load_model(copy)


def test_missing_model_is_a_model_error(tmp_path):
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "nothing")])
    assert result.exit_code == ExitCode.DATA and "not found" in result.output


def test_an_unfinished_training_run_is_named_as_such(tmp_path):
    """A trial: score and info on a folder still training said "not a radscan model"."""
    training, films = tmp_path / "training", tmp_path / "films"
    training.mkdir()
    films.mkdir()
    (training / "checkpoint.pt").write_bytes(b"")
    for command in (["info", str(training)], ["score", str(films), "--out", str(tmp_path / "r.csv"),
                                              "--model", str(training)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == ExitCode.DATA and "an unfinished training run" in result.output, result.output
        assert "--resume" in result.output


def test_cli_train_with_validation_and_info(normals, tmp_path):
    (tmp_path / "val_a").mkdir()
    for f in sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:8]:
        shutil.copy(f, tmp_path / "val_a" / f.name)
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, [
        "-q", "train", str(normals), "--out", str(out), "--preset", "tiny", "--epochs", "2", "--batch-size", "8",
        "--val-abnormal", str(tmp_path / "val_a"), "--json", "--workers", "1", "--critic-snapshots", "2",
        "--score", "critic", "--gamma", "0.2",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0.0 <= summary["val_auc"] <= 1.0 and summary["epochs_run"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"val_auc_critic", "val_auc_critic_live", "val_auc_seed", "val_auc_residual"} <= set(log[-1])
    info = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert info.exit_code == 0
    metadata = json.loads(info.stdout)
    assert metadata["config"]["critic_snapshots"] == 2 and metadata["config"]["score_kind"] == "critic"
    assert metadata["training"]["validation"]["normal"] == ["the calibration normals"]
    assert metadata["training"]["train_config"]["gamma"] == 0.2
    text = CliRunner().invoke(cli, ["info", str(out)]).output
    assert "critic: the discriminator's verdict on the film itself" in text
    # the threshold comes from the calibration normals, never from labelled validation data
    assert metadata["calibration"]["method"] == "calibration normals at specificity 0.95"
    too_few = CliRunner().invoke(cli, ["-q", "train", str(normals), "--out", str(tmp_path / "m2"), "--preset",
                                       "tiny", "--epochs", "1", "--critic-snapshots", "2", "--workers", "1"])
    assert too_few.exit_code != 0 and "snapshots" in too_few.output


def test_init_from_starts_from_a_models_weights(trained, normals, tmp_path):
    frozen = TrainConfig(epochs=1, batch_size=8, seed=3, lr=0.0, cosine_eta_min=0.0)  # weights cannot move
    continued = tmp_path / "continued"
    train([str(normals)], continued, TINY, frozen, workers=1, progress=False, init_from=trained)
    start, end = load_model(trained)[0], load_model(continued)[0]
    for name, weight in start.named_parameters():
        if not name.startswith("snapshot_critics."):
            assert torch.equal(weight, dict(end.named_parameters())[name]), name
    # the new run's snapshot is the starting model's critic, which did not move during the epoch
    for name, weight in start.discriminator.named_parameters():
        assert torch.equal(weight, dict(end.snapshot_critics[0].named_parameters())[name]), name
    assert json.loads((continued / "model.json").read_text())["training"]["init_from"] == str(trained)
    with pytest.raises(Exception, match="architecture"):
        train([str(normals)], tmp_path / "other", preset("small"), frozen, workers=1, progress=False,
              init_from=trained)


def test_init_from_a_box_model_on_normals_whose_box_moved(normals, tmp_path):
    """A new user's trial: --init-from a thorax-box model, on its normals and 40 more, was refused as
    "another architecture" because the box found on the new normals had moved; and the message did
    not say which setting differed."""
    box = preset("tiny", critic_snapshots=2, density_grid=8, field="thorax-box")
    train([str(normals)], tmp_path / "first", box, FAST, workers=1, progress=False)
    more = tmp_path / "more"
    more.mkdir()
    for path in sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[200:240]:
        shutil.copy(path, more / path.name)
    train([str(normals), str(more)], tmp_path / "second", box, FAST, workers=1, progress=False,
          init_from=tmp_path / "first")
    first, second = (load_model(tmp_path / name)[0] for name in ("first", "second"))
    assert first.cfg.crop != second.cfg.crop  # the box moved, and was taken from the new normals
    with pytest.raises(SettingError, match="critic_snapshots 2, asked 3"):
        train([str(normals)], tmp_path / "third", replace(box, critic_snapshots=3), FAST, workers=1,
              progress=False, init_from=tmp_path / "first")


def test_validation_abnormals_that_are_the_normals_are_said(normals, tmp_path):
    """A new user's trial: the normals' folder given as --val-abnormal gave a validation AUC of 0.18,
    kept in model.json without a word (and --keep best would choose the shipped epoch by it)."""
    train([str(normals)], tmp_path / "m", TINY, FAST, workers=1, progress=False, val_abnormal=[str(normals)])
    validation = load_model(tmp_path / "m")[1]["training"]["validation"]
    assert validation["warning"].startswith("48 of the 48 validation abnormal films are copies of the normals")
    abnormal = str(CXR_DIR / "kermany_pediatric_224/val_abnormal")
    train([str(normals)], tmp_path / "n", TINY, FAST, workers=1, progress=False, val_abnormal=[abnormal])
    assert "warning" not in load_model(tmp_path / "n")[1]["training"]["validation"]
    few = tmp_path / "few"  # a trial: one film filed among the normals and the abnormal films is no wrong folder
    few.mkdir()
    for path in [*sorted(Path(abnormal).iterdir())[:20], sorted(normals.iterdir())[0]]:
        shutil.copy(path, few / path.name)
    train([str(normals)], tmp_path / "p", TINY, FAST, workers=1, progress=False, val_abnormal=[str(few)])
    warning = load_model(tmp_path / "p")[1]["training"]["validation"]["warning"]
    assert warning.startswith("1 of the 21 validation abnormal films are also among the normals trained or "
                              "calibrated on (an abnormal film filed among the normals") and "nothing" not in warning
    # a review: the training normals given as --val-normal, said in --json too
    result = CliRunner().invoke(cli, ["train", str(normals), "--out", str(tmp_path / "o"), "--epochs", "2",
                                      "--critic-snapshots", "2", "--batch-size", "8", "--workers", "1", "--json",
                                      "--val-abnormal", abnormal, "--val-normal", str(normals)])
    assert result.exit_code == 0, result.output
    said = json.loads(result.stdout)["validation_warning"]
    split = (tmp_path / "o" / "training_split.csv").read_text().splitlines()
    trained = sum(row["split"] == "train" for row in csv.DictReader(split))
    assert said.startswith(f"{trained} of the 48 validation normal films are copies of films trained on"), said
    assert load_model(tmp_path / "o")[1]["training"]["validation"]["warning"] == said


def test_copies_among_the_normals_are_warned_and_counted_once_for_the_qc_reference(normals, tmp_path, caplog):
    """A trial: 40 normals and 20 copies of them under other names made a model whose QC reference
    was "of 60 training normals", with no word of the copies (calibrate and evaluate warn). Copies
    are a WARNING, and a reference needs MIN_REFERENCE distinct films."""
    folder = tmp_path / "normals"
    folder.mkdir()
    films = sorted(normals.iterdir())[:40]
    for index, path in enumerate([*films, *films[:12]]):
        shutil.copy(path, folder / f"{index:03d}{path.suffix}")
    with caplog.at_level(logging.WARNING, logger="radscan"):
        train([str(folder)], tmp_path / "m", TINY, FAST, workers=1, progress=False)
    said = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(line.startswith("12 of 52 normals are copies of another") for line in said), said
    assert any(line.startswith("only 40 distinct usable normal images in 52 files") for line in said), said
    assert "qc" not in load_model(tmp_path / "m")[1]


def test_train_into_a_folder_of_other_files_is_refused(normals, tmp_path):
    """A new user's trial: `radscan train --out` an evaluation's folder mixed the model's files in
    among its outputs. A folder holding other files and no training run is refused (exit 2); an
    empty one, or one a run began in, is not."""
    other = tmp_path / "evaluation"
    other.mkdir()
    (other / "evaluation.html").write_text("<html></html>")
    result = CliRunner().invoke(cli, ["train", str(normals), "--out", str(other), "--epochs", "2",
                                      "--critic-snapshots", "2", "--workers", "1"])
    assert result.exit_code == ExitCode.USAGE and "holds other files" in result.output, result.output
    assert sorted(path.name for path in other.iterdir()) == ["evaluation.html"]
    (tmp_path / "empty").mkdir()
    train([str(normals)], tmp_path / "empty", TINY, FAST, workers=1, progress=False)
    assert (tmp_path / "empty" / "model.json").is_file()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_trains(normals, tmp_path):
    """Issue 22, item 11: two `radscan train` runs (one with --resume) wrote into one --out at once."""
    from radscan.errors import LockHeldError
    from radscan.state import hold_lock
    from radscan.train import TRAIN_LOCK

    out = tmp_path / "model"
    with hold_lock(out / TRAIN_LOCK):  # what a running `radscan train` holds
        for resume in (False, True):
            with pytest.raises(LockHeldError, match="another radscan run"):
                train([str(normals)], out, TINY, FAST, workers=1, progress=False, resume=resume)
    assert not (out / "model.json").exists()


def test_a_thorax_field_model_is_found_trained_sealed_and_blind_outside_it(normals, tmp_path):
    """`--field thorax`: the field comes from the training normals' mean film, travels sealed with
    the weights, and nothing outside it changes a score or a map."""
    out = tmp_path / "thorax"
    result = CliRunner().invoke(cli, [
        "-q", "train", str(normals), "--out", str(out), "--preset", "tiny", "--epochs", "2", "--batch-size", "8",
        "--workers", "1", "--critic-snapshots", "2", "--field", "thorax", "--json"])
    assert result.exit_code == 0, result.output
    model, metadata = load_model(out)
    assert metadata["config"]["field"] == "thorax"
    field = model.field_mask.bool()
    assert 0.15 < field.float().mean() < 0.6 and field[64, 20:108].any()
    assert "field           thorax" in CliRunner().invoke(cli, ["info", str(out)]).output
    images = load_images([str(normals)], Policy(), workers=1, progress=False)[0][:8]
    framed = images.copy()
    framed[:, ~field.numpy()] = 255  # white collimation, arms, markers: anything outside the field
    before, after = score_arrays(model, images, explain=True), score_arrays(model, framed, explain=True)
    assert torch.equal(before.scores, after.scores)
    assert torch.equal(before.explanation_maps, after.explanation_maps)
    assert (after.explanation_maps[:, ~field] == 0).all()


@pytest.mark.parametrize("field", ["thorax", "thorax-box"])
def test_a_thorax_field_is_refused_for_normals_that_show_no_chest(tmp_path, field):
    folder = tmp_path / "not-chests"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(48):  # films of noise: their mean shows no lung fields
        Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(folder / f"{index}.png")
    result = CliRunner().invoke(cli, ["-q", "train", str(folder), "--out", str(tmp_path / "m"), "--preset", "tiny",
                                      "--epochs", "2", "--batch-size", "8", "--workers", "1", "--critic-snapshots",
                                      "2", "--field", field])
    assert result.exit_code == ExitCode.USAGE and "lung fields" in result.output and "--field film" in result.output
    assert not (tmp_path / "m").exists()  # a refused run leaves nothing behind, not even its inventory


def test_a_refused_run_leaves_no_inventory_in_a_folder_it_did_not_make(normals, tmp_path):
    out = tmp_path / "kept"
    out.mkdir()  # made by the user, empty (one with other files is refused: test_train_into_a_folder_of_other_files)
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(normals.iterdir())[:12]:
        shutil.copy(path, few / path.name)
    result = CliRunner().invoke(cli, ["-q", "train", str(few), "--out", str(out), "--preset", "tiny", "--epochs", "2",
                                      "--batch-size", "8", "--workers", "1", "--critic-snapshots", "2"])
    assert result.exit_code != 0 and "calibration normals" in result.output
    assert list(out.iterdir()) == []


def test_a_thorax_box_model_reads_every_film_cut_to_its_box_and_counts_only_the_lungs(normals, trained, tmp_path):
    """`--field thorax-box`: the box comes from the normals' mean film, is sealed with the weights,
    and every command that reads films for the model cuts them to it at their own resolution; the
    density averages the lung fields only and its map has no mass outside them."""
    from radscan.model.metadata import read_metadata
    from radscan.policy import for_model
    from radscan.preprocess import to_model_input

    out = tmp_path / "box"
    result = CliRunner().invoke(cli, [
        "-q", "train", str(normals), "--out", str(out), "--preset", "tiny", "--epochs", "2", "--batch-size", "8",
        "--workers", "1", "--critic-snapshots", "2", "--field", "thorax-box", "--fixed-box", "--score", "density",
        "--json"])
    assert result.exit_code == 0, result.output
    model, metadata = load_model(out)
    left, top, right, bottom = metadata["config"]["crop"]
    assert 0.02 < left < 0.3 and 0.7 < right < 0.98 and 0.02 < top < 0.35 and 0.7 < bottom <= 1.0
    lungs = model.lung_mask.bool()
    assert 0.2 < lungs.float().mean() < 0.8  # the lungs fill much more of the box than of the film (16-19%)
    assert "box             " in CliRunner().invoke(cli, ["info", str(out)]).output

    reading = for_model(Policy(), read_metadata(out), out)
    assert reading.crop == (left, top, right, bottom)
    films = load_images([str(normals)], reading, workers=1, progress=False)[0][:6]
    by_hand = np.stack([to_model_input(np.asarray(Image.open(path).convert("L")), reading.crop)
                        for path in sorted(normals.iterdir())[:6]])
    assert np.array_equal(films, by_hand)

    # only the lungs count: the regions they do not cover add nothing to the score, and the map is
    # drawn on the lung fields alone (the networks see the whole box: what lies there still shapes
    # the features of the lung regions)
    weights = torch.nn.functional.adaptive_avg_pool2d(model.lung_mask[None, None], 8)[0, 0]
    assert (weights == 0).any() and (weights > 0).any()
    before = score_arrays(model, films, explain=True)
    with torch.inference_mode():
        regions = model.density_regions(to_model_tensor(films))
    torch.testing.assert_close(model.density_score(regions), before.raw_scores)
    elsewhere = regions.clone()
    elsewhere[:, weights == 0] += 1000.0
    torch.testing.assert_close(model.density_score(elsewhere), model.density_score(regions))
    assert not torch.allclose(model.density_score(regions), regions.flatten(1).mean(1))
    assert (before.explanation_maps[:, ~lungs] == 0).all() and (before.explanation_maps[:, lungs] > 0).any()

    # scoring from the command line cuts the films the same way
    report = tmp_path / "report.csv"
    scored = CliRunner().invoke(cli, ["-q", "score", str(normals), "--model", str(out), "--out", str(report),
                                      "--workers", "1", "--qc", "off"])
    assert scored.exit_code in (0, 1), scored.output
    import csv

    rows = {row["path"]: float(row["score_raw"]) for row in csv.DictReader(report.open()) if row["score_raw"]}
    names = [path.name for path in sorted(normals.iterdir())[:6]]
    np.testing.assert_allclose([rows[name] for name in names], before.raw_scores.numpy(), rtol=1e-5)

    # scan shows what the model sees, and refuses a model whose box was edited, as score does
    previews = tmp_path / "previews"
    scanned = CliRunner().invoke(cli, ["-q", "scan", str(normals), "--out", str(tmp_path / "inv.csv"), "--model",
                                       str(out), "--previews", str(previews), "--workers", "1"])
    assert scanned.exit_code == 0, scanned.output
    preview = {row["path"]: row["preview_png"] for row in csv.DictReader((tmp_path / "inv.csv").open())}
    assert np.array_equal(np.asarray(Image.open(tmp_path / preview[names[0]])), films[0])
    for crop in ("0.1,0.1,0.9,0.9", [0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [left, top, right, bottom + 0.01]):
        edited = tmp_path / "edited"
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(out, edited)
        metadata_file = edited / "model.json"
        changed_metadata = json.loads(metadata_file.read_text())
        changed_metadata["config"]["crop"] = crop
        metadata_file.write_text(json.dumps(changed_metadata))
        for command in (["score", str(normals), "--out", str(tmp_path / "e" / "r.csv")],
                        ["scan", str(normals), "--out", str(tmp_path / "e" / "inv.csv")]):
            refused = CliRunner().invoke(cli, ["-q", *command, "--model", str(edited), "--workers", "1"])
            assert refused.exit_code == ExitCode.DATA, (crop, command, refused.output)  # not a traceback (exit 1)
    assert not (tmp_path / "e" / "r.csv").exists()

    # evaluate reads the films once per way of reading: a box model beside a whole-film one, compared
    abnormal = tmp_path / "pneumonia"
    abnormal.mkdir()
    for path in sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:12]:
        shutil.copy(path, abnormal / path.name)
    evaluated = CliRunner().invoke(cli, ["-q", "evaluate", "--normal", str(normals), "--abnormal", str(abnormal),
                                         "--model", str(out), "--model", str(trained), "--workers", "1", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    summary = json.loads(evaluated.stdout)
    assert [model["normal"] for model in summary["models"]] == [48, 48] and len(summary["comparisons"]) == 1
    from sklearn.metrics import roc_auc_score

    box_scores = score_arrays(model, np.concatenate([
        load_images([str(normals)], reading, workers=1, progress=False)[0],
        load_images([str(abnormal)], reading, workers=1, progress=False)[0]])).scores.numpy()
    assert abs(summary["auc"] - roc_auc_score(np.r_[np.zeros(48), np.ones(12)], box_scores)) < 1e-9


def test_keep_best_saves_the_epoch_with_the_highest_validation_auc(normals, tmp_path):
    abnormal = tmp_path / "pneumonia"
    abnormal.mkdir()
    for path in sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:16]:
        shutil.copy(path, abnormal / path.name)
    with pytest.raises(Exception, match="needs --val-abnormal"):
        train([str(normals)], tmp_path / "refused", TINY, TrainConfig(epochs=3, batch_size=8, keep="best"),
              workers=1, progress=False)
    out = tmp_path / "best"
    train([str(normals)], out, TINY, TrainConfig(epochs=3, batch_size=8, seed=3, keep="best"),
          val_abnormal=[str(abnormal)], workers=1, progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    aucs = [entry["val_auc_critic"] for entry in log]
    best = int(np.argmax(aucs)) + 1  # the first of equal ones
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["training"]["shipped"].startswith(f"epoch {best}:")
    assert metadata["training"]["epochs_run"] == 3
    assert abs(metadata["metrics"]["val_auc"] - aucs[best - 1]) < 1e-6
    assert f"The model is that of epoch {best}:" in (out / "training_report.html").read_text()
    assert f"kept epoch {best}:" in CliRunner().invoke(cli, ["info", str(out)]).output


def test_keep_synthetic_saves_the_epoch_that_best_finds_synthetic_defects_without_labels(normals, tmp_path):
    keep, measure, better = "synthetic", "synthetic_auc_density", np.argmax
    with pytest.raises(SettingError, match="needs the density score kind"):
        train([str(normals)], tmp_path / "refused", TINY, TrainConfig(epochs=3, batch_size=8, keep=keep),
              workers=1, progress=False)
    out = tmp_path / keep
    train([str(normals)], out, replace(TINY, score_kind="density"),
          TrainConfig(epochs=3, batch_size=8, seed=3, keep=keep), workers=1, progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(abs(entry["density_gap"] - entry["calibration_density_mean"] / entry["train_density_mean"]) < 1e-6
               and 0 <= entry["synthetic_auc_density"] <= 1 for entry in log)
    kept = int(better([entry[measure] for entry in log])) + 1  # the first of equal ones
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["training"]["shipped"].startswith(f"epoch {kept}:")
    assert "chosen without labels" in (out / "training_report.html").read_text()
    assert f"kept epoch {kept}:" in CliRunner().invoke(cli, ["info", str(out)]).output


@pytest.mark.parametrize("film, verdict", [("nema-wg04/RG3_RLE.dcm", "rejected"),  # a lower-leg CR
                                           ("fo-dicom/CR-MONO1-10-chest", "ok")])  # an adult chest CR
def test_a_thorax_box_model_has_quality_control_judge_the_whole_film(tmp_path, film, verdict):
    """The model reads the box of the thorax, quality control the whole film against a reference of
    whole films: the box of a lower leg looked enough like a chest's box to pass (and be flagged)."""
    normals = tmp_path / "normals"
    normals.mkdir()
    for path in sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[:64]:
        shutil.copy(path, normals / path.name)
    out = tmp_path / "box"
    result = CliRunner().invoke(cli, [
        "-q", "train", str(normals), "--out", str(out), "--preset", "tiny", "--epochs", "1", "--batch-size", "8",
        "--workers", "1", "--critic-snapshots", "1", "--field", "thorax-box", "--score", "density"])
    assert result.exit_code == 0, result.output
    reference = load_images([str(normals)], Policy(), workers=1, progress=False)[0]
    from radscan.model.metadata import read_metadata
    from radscan.qc import fit_reference, load_reference

    assert np.allclose(load_reference(out, read_metadata(out)).basis, fit_reference(reference).basis)

    (tmp_path / "in").mkdir()
    shutil.copy(DICOM_DIR / film, tmp_path / "in" / "film.dcm")
    report = tmp_path / "out" / "report.csv"
    result = CliRunner().invoke(cli, ["-q", "score", str(tmp_path / "in"), "--out", str(report), "--model", str(out),
                                      "--workers", "1", "--body-parts", "all", "--no-residuals"])
    row = next(csv.DictReader(report.open()))
    assert row["status"] == verdict, row


def test_blank_films_among_the_normals_are_not_trained_on_and_are_listed_with_the_reason(normals, tmp_path):
    """A site's normals folder with blank films in it (any grey, any size): they are quality-control
    rejects, listed in training_inputs.csv with the reason, and neither trained nor calibrated on, with
    the default thorax box (whose mean film they would darken) and with the whole film."""
    folder = tmp_path / "normals"
    shutil.copytree(normals, folder)
    blanks = {f"blank_{grey}.png": (grey, height, width)
              for grey, height, width in ((0, 512, 512), (255, 300, 420), (128, 256, 256), (37, 64, 150))}
    for name, (grey, height, width) in blanks.items():
        Image.fromarray(np.full((height, width), grey, np.uint8)).save(folder / name)
    (folder / "truncated.jpeg").write_bytes((folder / sorted(normals.iterdir())[0].name).read_bytes()[:300])
    for field in ("thorax-box", "film"):
        out = tmp_path / field
        result = CliRunner().invoke(cli, ["train", str(folder), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                                          "--critic-snapshots", "1", "--field", field, "--workers", "1"])
        # a file that cannot be read: the model is made, and the run exits 3 as the help says
        assert result.exit_code == 3 and "1 file could not be read (training_inputs.csv)" in result.output, \
            result.output
        with open(out / "training_inputs.csv", newline="") as handle:
            listed = {row["path"]: row for row in csv.DictReader(handle)}
        for name in blanks:
            assert listed[name]["status"] == "rejected" and "blank" in listed[name]["reason"], listed[name]
        with open(out / "training_split.csv", newline="") as handle:
            assert not {row["path"] for row in csv.DictReader(handle)} & set(blanks)
        # one WARNING line counts them, though the thorax box reads the films twice (whole, then the box)
        assert result.output.count(f"{len(blanks)} of {len(blanks) + 48} images failed quality control") == 1, \
            result.output
        # and the model says it, as its report does (a trial: only the inventory and one log line did)
        assert json.loads((out / "model.json").read_text())["training"]["inputs_not_used"] == {
            "error": 1, "rejected": len(blanks)}
        assert (f"{len(blanks) + 1} of the files given as normals were not trained on: 1 could not be read, "
                f"{len(blanks)} were rejected by quality control") in (out / "training_report.html").read_text()


@pytest.mark.parametrize("file", [WEIGHTS_FILE, "model.json", "train_log.jsonl"])  # the last one copied
def test_a_full_disk_while_saving_the_model_is_exit_73(trained, normals, tmp_path, monkeypatch, file):
    """A review: a disk that filled while the weights were written (safetensors' own error) was exit
    1 "a bug in radscan", in train and in calibrate. The full disk shows as the kernel reports it,
    when the file is synced."""
    monkeypatch.setattr(os, "fsync", fsync_spy([], fail=file))
    result = CliRunner().invoke(cli, ["calibrate", str(trained), "--normals", str(normals), "--out",
                                      str(tmp_path / "cal"), "--workers", "1"])
    assert result.exit_code == ExitCode.CANT_CREATE and "No space left on device" in result.output, result.output
    assert f"cannot write {tmp_path}" in result.output and file in result.output, result.output
    assert not (tmp_path / "cal").exists() and not list(tmp_path.iterdir())


def test_the_model_files_are_synced_to_disk_before_they_take_their_names(trained, normals, tmp_path, monkeypatch):
    """The weights were renamed into place unsynced, and calibrate's copies of the other files (the
    QC reference, the card) never synced, so a power cut soon after could leave one empty under its
    name, and every run refused the model (its sha256 no longer matched model.json)."""
    synced: list[str] = []
    before_rename: list[str] = []
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    (model / f".{WEIGHTS_FILE}.x1y2z3.tmp").write_bytes(b"left by a killed save")
    monkeypatch.setattr(os, "fsync", fsync_spy(synced, before_rename=before_rename))
    result = CliRunner().invoke(cli, ["calibrate", str(model), "--normals", str(normals), "--out",
                                      str(tmp_path / "cal"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    written = {path.name for path in (tmp_path / "cal").iterdir() if path.is_file()}
    assert {WEIGHTS_FILE, "model.json", "training_split.csv"} <= written <= set(synced), (written, synced)
    assert {WEIGHTS_FILE, "model.json"} <= set(before_rename), before_rename  # each whole before it took its name
    assert not [path for path in (tmp_path / "cal").iterdir() if path.name.endswith(".tmp")]  # not copied along
    load_model(tmp_path / "cal")


def _moved_film(grey: np.ndarray, dx: float) -> np.ndarray:
    """The film moved sideways by `dx` of its width, the part it leaves black (a chest placed off-centre)."""
    shift = round(dx * grey.shape[1])
    moved = np.zeros_like(grey)
    moved[:, shift:] = grey[:, :grey.shape[1] - shift]
    return moved


def test_a_box_that_follows_the_chest_reads_a_moved_film_as_it_reads_the_film(normals, tmp_path):
    """`--follow-chest`: the box is moved, film by film, to where its chest lies against the training
    normals' mean film (a reader's trial: a normal film moved 10% sideways scored like the worst
    pneumonia under a fixed box). The reference is a file beside the weights, verified and sealed:
    altered or unlisted, the model is refused (exit 65), not read with another box."""
    from radscan.model.field import FOLLOW_FILE
    from radscan.model.metadata import read_metadata
    from radscan.policy import for_model
    from radscan.preprocess import to_model_input, to_qc_input

    out = tmp_path / "follow"
    result = CliRunner().invoke(cli, [
        "-q", "train", str(normals), "--out", str(out), "--preset", "tiny", "--epochs", "1", "--batch-size", "8",
        "--workers", "1", "--critic-snapshots", "1", "--field", "thorax-box", "--follow-chest", "--json"])
    assert result.exit_code == 0, result.output
    model, metadata = load_model(out)
    assert metadata["config"]["follow"] is True and metadata["follow"]["file"] == FOLLOW_FILE
    reading = for_model(Policy(), read_metadata(out), out)
    assert reading.follow is not None and reading.crop == tuple(metadata["config"]["crop"])
    assert "moved with each film's chest" in CliRunner().invoke(cli, ["info", str(out)]).output

    # films moved 8-12% sideways either way: the box finds the chest within one step of 1/64 of the film
    paths = sorted(normals.iterdir())[:6]
    for path in paths:
        grey = np.asarray(Image.open(path).convert("L"))
        fixed = to_model_input(grey, reading.crop)
        for dx in (0.08, 0.12):
            moved = _moved_film(grey, dx)
            followed = to_model_input(moved, reading.crop, reading.follow, to_qc_input(moved)).astype(float)
            assert np.abs(followed - fixed).mean() < 0.5 * np.abs(to_model_input(moved, reading.crop) - fixed).mean()

    # every command reads a film through the moved box: score and scan as load_images does
    films = load_images([str(normals)], reading, workers=1, progress=False)[0][:6]
    by_hand = np.stack([to_model_input(g, reading.crop, reading.follow, to_qc_input(g))
                        for g in (np.asarray(Image.open(path).convert("L")) for path in paths)])
    assert np.array_equal(films, by_hand)
    report = tmp_path / "report.csv"
    scored = CliRunner().invoke(cli, ["-q", "score", str(normals), "--model", str(out), "--out", str(report),
                                      "--workers", "1", "--qc", "off"])
    assert scored.exit_code in (0, 1), scored.output
    rows = {row["path"]: float(row["score_raw"]) for row in csv.DictReader(report.open()) if row["score_raw"]}
    np.testing.assert_allclose([rows[path.name] for path in paths], score_arrays(model, films).raw_scores.numpy(),
                               rtol=1e-5)

    # the reference altered, removed, or unlisted in model.json: refused, never read with a fixed box
    for how in ("altered", "removed", "unlisted"):
        edited = tmp_path / how
        shutil.copytree(out, edited)
        if how == "altered":
            data = bytearray((edited / FOLLOW_FILE).read_bytes())
            data[-10] ^= 0x01
            (edited / FOLLOW_FILE).write_bytes(bytes(data))
        elif how == "removed":
            (edited / FOLLOW_FILE).unlink()
        else:
            changed = json.loads((edited / "model.json").read_text())
            del changed["follow"]
            (edited / "model.json").write_text(json.dumps(changed))
        refused = CliRunner().invoke(cli, ["-q", "score", str(normals), "--model", str(edited), "--out",
                                           str(tmp_path / "r" / how / "r.csv"), "--workers", "1"])
        assert refused.exit_code == ExitCode.DATA and "Traceback" not in refused.output, (how, refused.output)
        # a trial: info passed, and export copied, a model whose reference film was missing
        assert CliRunner().invoke(cli, ["info", str(edited)]).exit_code == ExitCode.DATA, how
        exported = CliRunner().invoke(cli, ["-q", "export", str(edited), "--out", str(tmp_path / "x" / how)])
        assert exported.exit_code == ExitCode.DATA and not (tmp_path / "x" / how).exists(), (how, exported.output)
        assert not (tmp_path / "r" / how / "r.csv").exists()


def test_a_box_follows_the_chest_only_where_there_is_a_box(normals, tmp_path):
    """The default of --follow-chest/--fixed-box applies to a thorax-box model; a whole-film model has no
    box to move (its default is off), and asking for both is a usage error (exit 2)."""
    from radscan.recipe import MODEL_SETTINGS

    refused = CliRunner().invoke(cli, ["-q", "train", str(normals), "--out", str(tmp_path / "m"), "--field", "film",
                                       "--follow-chest"])
    assert refused.exit_code == ExitCode.USAGE and "thorax-box" in refused.output
    assert "--fixed-box" in refused.output  # what to give instead (a trial: the refusal named no way out)
    assert not (tmp_path / "m").exists()
    config = preset("tiny", field="film", follow=False)
    assert config.follow is False and MODEL_SETTINGS["field"] == "thorax-box"


def test_a_missing_validation_path_is_named_before_the_normals_are_read(normals, tmp_path, monkeypatch):
    """A trial: a mistyped --val-abnormal was said as "input path does not exist" after every normal
    had been read (minutes at a site); it is named by its option, before any film is read."""
    import radscan.train

    monkeypatch.setattr(radscan.train, "load_images", lambda *a, **k: pytest.fail("normals read first"))
    for option, given in (("--val-abnormal", {"val_abnormal": [str(tmp_path / "typo")]}),
                          ("--val-normal", {"val_normal": [str(tmp_path / "typo")], "val_abnormal": [str(normals)]})):
        with pytest.raises(NoInputError, match=f"^{option} path does not exist: .*typo"):
            train([str(normals)], tmp_path / "m", TINY, FAST, workers=1, progress=False, **given)


def test_resume_without_a_checkpoint_says_a_new_run_starts(normals, tmp_path, caplog, monkeypatch):
    """A trial: --resume into a folder with no checkpoint (a mistyped --out after a crash) trained a
    new model from scratch without a word."""
    radscan_log = logging.getLogger("radscan")
    monkeypatch.setattr(radscan_log, "level", logging.ERROR)  # as a CLI test run with -q before may leave it
    monkeypatch.setattr(radscan_log, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="radscan"):
        train([str(normals)], tmp_path / "m", TINY, FAST, workers=1, progress=False, resume=True)
    assert any("holds no checkpoint of an interrupted run: a new run starts" in record.getMessage()
               for record in caplog.records)


def test_a_model_that_cuts_padding_fits_its_box_and_references_on_the_films_less_their_padding(normals, tmp_path):
    """With `trim_padding`, every other normal letterboxed with a black strip of a quarter of the image:
    the thorax box and the whole films quality control's reference is fitted to are those of the films
    as scoring reads them, less their padding, not the padded images'."""
    folder = tmp_path / "normals"
    folder.mkdir()
    for index, path in enumerate(sorted(normals.iterdir())):
        film = np.asarray(Image.open(path).convert("L"))
        if index % 2:
            film = np.pad(film, ((0, 0), (film.shape[1] // 3, 0)))
        Image.fromarray(film).save(folder / f"{path.stem}.png")
    box = replace(TINY, field="thorax-box", follow=True)

    def first_pass(folder: Path, trim: bool) -> tuple[tuple[float, ...], np.ndarray]:
        config, _, _, films = find_thorax_box([str(folder)], replace(box, trim_padding=trim),
                                              Policy(trim_padding=trim), 1, False)
        return config.crop, films

    original, _ = first_pass(normals, False)
    cut, films = first_pass(folder, True)
    assert films[1::2, :, :16].mean() > 20  # the strip is gone
    assert np.abs(np.subtract(cut, original)).max() < 0.02, (cut, original)
    uncut, padded = first_pass(folder, False)
    assert padded[1::2, :, :16].max() == 0 and np.abs(np.subtract(uncut, original)).max() > 0.05, (uncut, original)
