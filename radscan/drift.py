"""Is tonight's flagged share what chance explains? (issue 21 item 7: the drift check)

A model whose inputs drift (a new detector, a processing change, a positioning habit) shows it
first in the share of films it flags. Two checks on the films scored in one run (new or changed
files, not the ones kept from earlier runs), each a binomial test (scipy.stats.binomtest) at
ALPHA, so that a night raises a false alarm about once in a thousand:

- **against the run's own history**: the pooled flagged share of the last HISTORY_RUNS runs with the
  same model and settings that scored at least MIN_FILMS films (at least MIN_RUNS of them; a new
  model, or a recalibrated one, starts a new history), two-sided: a share that moved up
  (normal films scoring higher) or down (scores collapsing) beyond chance;
- **against the model's calibration**: a share below the false-positive rate its threshold was
  set to on normal films (1 - target specificity), one-sided: a night's worklist holds abnormal
  films too, so fewer flags than normal films alone would give means the scores moved down.

The history lives in the state store (radscan.state, table `runs`), one row per finished run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Drift", "check_drift", "ALPHA", "MIN_FILMS", "MIN_RUNS", "HISTORY_RUNS"]

ALPHA = 0.001
MIN_FILMS = 20  # a run with fewer scored films says too little about a share
MIN_RUNS = 5
HISTORY_RUNS = 30


@dataclass(frozen=True)
class Drift:
    """The check of one run: `share` flagged of `scored` new films; `baseline` the history's pooled
    share over `history_runs` runs (None without enough history); p-values of both tests (None when
    not run); `warning` plain words when one fails, else ""."""

    scored: int
    flagged: int
    share: float | None
    baseline: float | None
    history_runs: int
    expected_on_normals: float | None
    p_history: float | None
    p_calibration: float | None
    warning: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_drift(scored: int, flagged: int, history: Sequence[tuple[int, int]],
                target_specificity: float | None) -> Drift:
    """Check `flagged` of `scored` new films against `history`, the (scored, flagged) counts of earlier
    runs, newest first, and against the model's `target_specificity` (None: not known)."""
    from scipy.stats import binomtest

    share = flagged / scored if scored else None
    usable = [(n, k) for n, k in history if n >= MIN_FILMS][:HISTORY_RUNS]
    baseline = sum(k for _, k in usable) / sum(n for n, _ in usable) if len(usable) >= MIN_RUNS else None
    expected = 1 - target_specificity if target_specificity is not None else None
    p_history = p_calibration = None
    warnings = []
    if scored >= MIN_FILMS and baseline is not None and 0 < baseline < 1:
        p_history = float(binomtest(flagged, scored, baseline).pvalue)
        if p_history < ALPHA:
            warnings.append(f"{flagged} of {scored} new films flagged ({share:.0%}) against {baseline:.0%} over the "
                            f"last {len(usable)} runs (p = {p_history:.1g}): the films or the scanners may have "
                            "changed; check the flagged share per scanner (StationName) and recalibrate if the normals "
                            "moved")
    if scored >= MIN_FILMS and expected is not None and 0 < expected < 1:
        p_calibration = float(binomtest(flagged, scored, expected, alternative="less").pvalue)
        if p_calibration < ALPHA:
            warnings.append(f"{flagged} of {scored} new films flagged ({share:.0%}), fewer than the {expected:.0%} of "
                            f"normal films alone the threshold was set to flag (p = {p_calibration:.1g}): the scores "
                            "may have drifted down")
    return Drift(scored, flagged, share, baseline, len(usable), expected, p_history, p_calibration,
                 "; ".join(warnings))
