"""Cost of each model preset: parameters, training step time, inference throughput, peak memory.

Each preset runs in a fresh process (so that peak memory is its own): --steps training
iterations at batch 16 (discriminator every step, generator every second step, as in training;
after one warm-up pair), then scoring at batch 64 for --score-batches batches (after one warm-up).

    python benchmarks/train_step.py [--presets reference small tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(name: str, device_name: str, steps: int, score_batches: int) -> dict:
    import numpy as np
    import torch

    from radscan.model.config import preset
    from radscan.model.runtime import resolve_device
    from radscan.model.simsid import to_model_tensor
    from radscan.recipe import TrainConfig
    from radscan.trainer import Trainer

    device = resolve_device(device_name)
    trainer = Trainer(preset(name), TrainConfig(), device)
    rng = np.random.default_rng(0)
    batch = to_model_tensor(rng.integers(0, 256, (16, 128, 128), dtype=np.uint8), device)
    trainer.step(batch, False)
    trainer.step(batch, True)
    _sync(device)
    started = time.perf_counter()
    for index in range(steps):
        trainer.step(batch, generator_step=index % 2 == 1)
    _sync(device)
    step_s = (time.perf_counter() - started) / steps

    model = trainer.model.eval()
    images = to_model_tensor(rng.integers(0, 256, (64, 128, 128), dtype=np.uint8), device)
    model.score(images)
    _sync(device)
    started = time.perf_counter()
    for _ in range(score_batches):
        model.score(images)
    _sync(device)
    score_ips = 64 * score_batches / (time.perf_counter() - started)
    return {
        "preset": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s": round(step_s, 3),
        "score_images_per_s": round(score_ips, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["reference", "small", "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--score-batches", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.steps, args.score_batches)))
        return
    print(f"{'preset':10} {'params':>8} {'train s/iter (b16)':>19} {'score img/s (b64)':>18} {'peak RSS':>9}")
    for name in args.presets:
        line = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device,
                               "--steps", str(args.steps), "--score-batches", str(args.score_batches)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(f"{r['preset']:10} {r['parameters'] / 1e6:7.2f}M {r['step_s']:19.3f} {r['score_images_per_s']:18.1f} "
              f"{r['peak_rss_mb']:7d}MB   ({r['device']}, {r['threads']} threads)")


if __name__ == "__main__":
    main()
