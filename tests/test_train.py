"""Training, model files and their safety checks, on real normal radiographs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from radscan.cli import cli
from radscan.errors import ExitCode, ModelError
from radscan.ingest import load_images
from radscan.model.config import preset
from radscan.model.io import WEIGHTS_FILE, load_model
from radscan.model.runtime import score_arrays
from radscan.model.simsid import to_model_tensor
from radscan.policy import Policy
from radscan.train import TrainConfig, Trainer, train

from .conftest import CXR_DIR

TINY = preset("tiny")
FAST = TrainConfig(epochs=2, batch_size=8, seed=3)


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
    assert (trained / "train_log.jsonl").read_text().count("\n") == 2
    assert not (trained / "checkpoint.pt").exists()
    images = load_images([str(normals)], Policy(), workers=1, progress=False)[0]
    first = score_arrays(model, images)
    again = score_arrays(load_model(trained)[0], images)
    assert torch.equal(first.scores, again.scores)
    assert torch.equal(first.residual_maps, again.residual_maps)
    # the threshold flags about 5% of normals: at most 1 of the 7 calibration normals scores above it
    assert 0.0 < float(model.threshold) < 1.0


def test_same_seed_same_data_same_model(trained, normals, tmp_path):
    again = tmp_path / "again"
    train([str(normals)], again, TINY, FAST, workers=1, progress=False)
    assert (again / WEIGHTS_FILE).read_bytes() == (trained / WEIGHTS_FILE).read_bytes()


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_after_interruption_gives_the_same_model(normals, tmp_path, monkeypatch, ema_decay):
    config = TrainConfig(epochs=3, batch_size=8, seed=5, ema_decay=ema_decay)
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
    train([str(normals)], tmp_path / "resumed", TINY, config, workers=1, progress=False, resume=True)
    straight = (tmp_path / "straight" / WEIGHTS_FILE).read_bytes()
    assert (tmp_path / "resumed" / WEIGHTS_FILE).read_bytes() == straight


def test_ema_is_the_running_average_of_the_live_weights():
    trainer = Trainer(TINY, TrainConfig(batch_size=2, ema_decay=0.5, seed=1), torch.device("cpu"))
    expected = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    batch = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for index in range(3):
        trainer.step(batch, generator_step=index % 2 == 1)
        for name, p in trainer.model.named_parameters():
            expected[name] = 0.5 * expected[name] + 0.5 * p.detach()
    assert trainer.evaluated is trainer.ema
    for name, p in trainer.ema.named_parameters():
        torch.testing.assert_close(p, expected[name])
    assert not all(torch.equal(a, b) for a, b in zip(trainer.ema.parameters(), trainer.model.parameters(),
                                                      strict=True))
    for averaged, live in zip(trainer.ema.buffers(), trainer.model.buffers(), strict=True):
        assert torch.equal(averaged, live)  # the memory queue and norm statistics follow the live model


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


def test_missing_model_is_a_model_error(tmp_path):
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "nothing")])
    assert result.exit_code == ExitCode.DATA and "not found" in result.output


def test_cli_train_with_validation_and_info(normals, tmp_path):
    abnormal = sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[:8]
    normal = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:8]
    for folder, files in (("val_n", normal), ("val_a", abnormal)):
        (tmp_path / folder).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / folder / f.name)
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, [
        "-q", "train", str(normals), "--out", str(out), "--preset", "tiny", "--epochs", "1", "--batch-size", "8",
        "--val-normal", str(tmp_path / "val_n"), "--val-abnormal", str(tmp_path / "val_a"), "--json",
        "--workers", "1",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["selection"] == "val_auc_discriminator" and 0.0 <= summary["val_auc"] <= 1.0
    info = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert info.exit_code == 0
    assert json.loads(info.stdout)["calibration"]["method"] == "validation set, Youden's J"


def test_init_from_starts_from_a_models_weights(trained, normals, tmp_path):
    frozen = TrainConfig(epochs=1, batch_size=8, seed=3, lr=0.0, cosine_eta_min=0.0)  # weights cannot move
    continued = tmp_path / "continued"
    train([str(normals)], continued, TINY, frozen, workers=1, progress=False, init_from=trained)
    start, end = load_model(trained)[0], load_model(continued)[0]
    for name, weight in start.named_parameters():
        assert torch.equal(weight, dict(end.named_parameters())[name]), name
    assert json.loads((continued / "model.json").read_text())["training"]["init_from"] == str(trained)
    with pytest.raises(Exception, match="architecture"):
        train([str(normals)], tmp_path / "other", preset("small"), frozen, workers=1, progress=False,
              init_from=trained)
