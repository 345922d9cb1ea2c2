"""Split a validation folder of abnormal films into two halves by patient (issue 20's protocol):
half A may choose (an epoch, a setting) and half B judges, with no patient in both.

    python benchmarks/halves.py ../shared/data/cxr/kermany_pediatric_224/val_abnormal OUT_DIR

The patient is the file name's `person<N>` (Kermany) or its first 8 digits (NIH); a file is in half
A when the sha256 of its patient's identifier is even, else in B. Files are copied to OUT_DIR/A and
OUT_DIR/B (Kermany val_abnormal: 195 and 205 films; nih_adult_512 val_abnormal: 152 and 168).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

PATIENT = re.compile(r"^(person\d+|\d{8})")


def half(name: str) -> str:
    """'A' or 'B' for a file name; ValueError when it names no patient."""
    match = PATIENT.match(name)
    if not match:
        raise ValueError(f"{name}: no patient in the name")
    return "A" if int(hashlib.sha256(match.group(1).encode()).hexdigest(), 16) % 2 == 0 else "B"


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    counts = {"A": 0, "B": 0}
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        side = half(path.name)
        (out / side).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / side / path.name)
        counts[side] += 1
    print(f"{source}: half A {counts['A']} films, half B {counts['B']} films -> {out}")


if __name__ == "__main__":
    main()
