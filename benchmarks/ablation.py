"""Design choices measured by validation AUC: trains one model per variant with `radscan train`
and tabulates, from each training log, the best validation AUC of every score kind.

Each variant is PRESET[:key=value,...], e.g. ``tiny:d_norm=batch`` or ``small:memory_kind=learned``;
the keys lr, cosine_epochs, batch_size and ema set the training recipe instead of the model
(``tiny:lr=0.0005``).
Runs resume where they stopped (rerun the same command after an interruption).

    python benchmarks/ablation.py --out /tmp/ablation --epochs 12 tiny tiny:d_norm=batch

Validation is the Kermany full-resolution set (40 normal + 40 pneumonia, patients disjoint from
training); the test split is never used here.
"""

from __future__ import annotations

import argparse
import json
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


RECIPE_KEYS = ("lr", "cosine_epochs", "batch_size", "ema")


def run_variant(variant: str, out: Path, args: argparse.Namespace) -> Path:
    preset, overrides = parse_variant(variant)
    recipe = {key: overrides.pop(key) for key in RECIPE_KEYS if key in overrides}
    folder = out / variant.replace(":", "__").replace(",", "_").replace("=", "-")
    command = [sys.executable, "-m", "radscan", "-q", "train", str(args.train), "--out", str(folder),
               "--preset", preset, "--epochs", str(args.epochs), "--val-normal", str(args.val_normal),
               "--val-abnormal", str(args.val_abnormal), "--seed", str(args.seed)]
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
    for kind in ("discriminator", "residual", "combined"):
        key = f"val_auc_{kind}"
        best = max(epochs, key=lambda e: e[key])
        row[kind] = f"{best[key]:.3f} (ep {best['epoch']})"
        row[f"{kind}_last"] = round(epochs[-1][key], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=Path, default=DATA / "kermany_pediatric_224" / "train_normal")
    parser.add_argument("--val-normal", type=Path, default=DATA / "kermany_pediatric_fullres" / "normal")
    parser.add_argument("--val-abnormal", type=Path, default=DATA / "kermany_pediatric_fullres" / "abnormal")
    args = parser.parse_args()
    rows = [summarise(v, run_variant(v, args.out, args)) for v in args.variants]
    print("| variant | epochs | s/epoch | best val AUC: discriminator | residual | combined | last: D / R / C |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['epochs']} | {r['s_per_epoch']} | {r['discriminator']} | {r['residual']} | "
              f"{r['combined']} | {r['discriminator_last']} / {r['residual_last']} / {r['combined_last']} |")


if __name__ == "__main__":
    main()
