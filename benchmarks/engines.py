"""Torch against ONNX Runtime as the CPU engine of the same model (issue 24 part 1, issue 20 item 4).

Exports MODEL (`radscan export`) into a temporary folder, then scores the same films with both
engines (radscan.model.engine), alternating the two, in this one process and with the same number
of threads: the score alone (what an unflagged film costs), and the score with the map and the
reconstruction difference (what a flagged film's picture costs; torch computes every score kind's
raw value on that path, the export only the density's). Prints images/s and milliseconds per film of each,
the ratio ONNX Runtime / torch, and the largest difference of their scores.

    python benchmarks/engines.py models/kermany-tiny --films 512 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radscan.ingest import load_images
from radscan.model.engine import load_engine
from radscan.model.export import export_model
from radscan.model.metadata import read_metadata
from radscan.policy import Policy, for_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr" / "kermany_pediatric_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--films", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of both engines")
    args = parser.parse_args()
    films = load_images([str(DATA / "test_normal"), str(DATA / "test_abnormal")],
                        for_model(Policy(), read_metadata(args.model), args.model), workers=2,
                        progress=False)[0][:args.films]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        export_model(args.model, Path(folder) / "onnx")
        engines = {"torch": load_engine(args.model, "cpu")[0],
                   "onnxruntime": load_engine(Path(folder) / "onnx", threads=args.threads)[0]}
        print(f"{len(films)} films, {args.threads} thread(s), median of {args.repeats}")
        for label, explain, components, count in (("score only", False, False, len(films)),
                                                  ("score, map and picture", True, True, max(16, len(films) // 8))):
            times: dict[str, list[float]] = {name: [] for name in engines}
            results = {}
            for _ in range(args.repeats):
                for name, engine in engines.items():  # alternated: both see the machine in the same state
                    start = time.perf_counter()
                    results[name] = engine.score(films[:count], explain, components).scores
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(values) for name, values in times.items()}
            for name, seconds in median.items():
                print(f"  {label:27s} {name:12s} {count / seconds:7.1f} images/s  "
                      f"{1000 * seconds / count:6.2f} ms/film")
            ratio = median["onnxruntime"] / median["torch"]
            difference = np.abs(results["torch"] - results["onnxruntime"]).max()
            print(f"  {label:27s} ONNX Runtime / torch time: {ratio:.2f}; largest score difference {difference:.1e}")


if __name__ == "__main__":
    main()
