"""Design choices measured by validation AUC: trains one model per variant with `radscan train`
and tabulates, from each training log, the validation AUC of every score kind at the last epoch
and its mean and spread (sd) over the last 10 epochs: the shipped model is the last epoch, so a
variant is only as good as it is steady.

Each variant is PRESET[:key=value,...], e.g. ``tiny:d_norm=batch`` or ``small:critic_snapshots=5``;
the keys in RECIPE_KEYS set the training recipe instead of the model (``tiny:lr=0.0005,gamma=0.3``).
Runs resume where they stopped (rerun the same command after an interruption).

    python benchmarks/ablation.py --out /tmp/ablation --epochs 30 "tiny:lr=0.001,cosine_epochs=30"

Validation: the 400 pneumonia films of kermany_pediatric_224/val_abnormal against the calibration
normals that `radscan train` holds out (patients disjoint from training and from each other);
the official test split is never used here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def parse_variant(text: str) -> tuple[str, dict]:
    preset, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)  # numbers, booleans, lists
        except json.JSONDecodeError:
            overrides[key] = value  # plain words such as batch or learned
    return preset, overrides


RECIPE_KEYS = ("lr", "cosine_epochs", "batch_size", "aspect", "gamma", "contrast", "blur", "noise", "synthetic")
KINDS = ("critic", "critic_live", "seed", "residual")


def run_variant(variant: str, out: Path, args: argparse.Namespace) -> Path:
    preset, overrides = parse_variant(variant)
    recipe = {key: overrides.pop(key) for key in RECIPE_KEYS if key in overrides}
    folder = out / variant.replace(":", "__").replace(",", "_").replace("=", "-")
    command = [sys.executable, "-m", "radscan", "-q", "train", str(args.train), "--out", str(folder),
               "--preset", preset, "--epochs", str(args.epochs), "--val-abnormal", str(args.val_abnormal),
               "--seed", str(args.seed)]
    for key, value in recipe.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    if args.max_minutes:
        command += ["--max-minutes", str(args.max_minutes)]
    if (folder / "checkpoint.pt").exists():
        command.append("--resume")
    if (folder / "model.json").exists():
        return folder  # already finished
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as settings:
        json.dump(overrides, settings)
    command += ["--model-config", settings.name]
    subprocess.run(command, check=True)
    return folder


def summarise(variant: str, folder: Path) -> dict:
    epochs = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line]
    row = {"variant": variant, "epochs": len(epochs),
           "s_per_epoch": round(sum(e["seconds"] for e in epochs) / len(epochs), 1)}
    for kind in KINDS:
        last10 = [e[f"val_auc_{kind}"] for e in epochs[-10:]]
        row[kind] = f"{last10[-1]:.3f} ({statistics.mean(last10):.3f} +- {statistics.pstdev(last10):.3f})"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=Path, default=DATA / "kermany_pediatric_224" / "train_normal")
    parser.add_argument("--val-abnormal", type=Path, default=DATA / "kermany_pediatric_224" / "val_abnormal")
    args = parser.parse_args()
    rows = [summarise(v, run_variant(v, args.out, args)) for v in args.variants]
    print("validation AUC at the last epoch (mean +- sd over the last 10 epochs)")
    print("| variant | epochs | s/epoch | " + " | ".join(KINDS) + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    for r in rows:
        print(f"| {r['variant']} | {r['epochs']} | {r['s_per_epoch']} | " + " | ".join(r[k] for k in KINDS) + " |")


if __name__ == "__main__":
    main()
