"""Is tonight's flagged share what chance explains? (issue 21 item 7: the drift check)

A model whose inputs drift (a new detector, a processing change, a positioning habit) shows it
first in the share of films it flags. Checks on the films scored in one run (new or changed
files, not the ones kept from earlier runs; a run with fewer than MIN_FILMS, none included, is pooled
with the runs just before it, up to POOL_RUNS, so that a small site is checked too and a warning does
not switch off on a night without new films), each a binomial test
(scipy.stats.binomtest) at ALPHA, so that a night raises a false alarm about once in a thousand:

- **against the run's own history**: the pooled flagged share of the HISTORY_RUNS runs before those
  judged, with the same model and the settings that decide a flag (at least MIN_RUNS runs that scored
  new films and MIN_RUNS x MIN_FILMS films; a new model, a recalibrated one, another selection or QC
  mode starts a new history, whose first run counts every film it scores), two-sided: a share that moved up
  (normal films scoring higher) or down (scores collapsing) beyond chance;
- **against the model's calibration**: a share below the false-positive rate its threshold was
  set to on normal films (1 - target specificity), one-sided: a night's worklist holds abnormal
  films too, so fewer flags than normal films alone would give means the scores moved down;
- **without a history** (a site's first nights): a share more than FAR_ABOVE times that rate, beyond
  chance (one-sided), is said too: most often a model whose scale does not fit the site's films.

The history lives in the state store (radscan.state, table `runs`), one row per finished run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from radscan.records import counted

__all__ = ["Drift", "check_drift", "ALPHA", "MIN_FILMS", "MIN_RUNS", "HISTORY_RUNS", "POOL_RUNS"]

ALPHA = 0.001
MIN_FILMS = 20  # fewer films say too little about a share: a small site's nights are pooled until there are this many
MIN_RUNS = 5  # the history needs this many runs, and MIN_RUNS x MIN_FILMS films in them
HISTORY_RUNS = 30
FAR_ABOVE = 3  # without a history, a flagged share this many times the calibration's is said as a warning
POOL_RUNS = 7  # a week of nights at most is pooled with a small night; fewer films than MIN_FILMS then: not checked


@dataclass(frozen=True)
class Drift:
    """The check of one run: `flagged` of its `scored` new films (`share`); the films judged, this run's
    pooled with the runs just before it while fewer than MIN_FILMS (`judged` films, `judged_flagged` of
    them flagged, from `judged_runs` runs, this one included); `baseline` the pooled share of the
    `history_runs` runs before those (None without enough history); p-values of both tests (None when
    not run); `warning` plain words when one fails, else ""; `note` what was checked, in plain words."""

    scored: int
    flagged: int
    share: float | None
    baseline: float | None
    history_runs: int
    expected_on_normals: float | None
    p_history: float | None
    p_calibration: float | None
    warning: str = ""
    judged: int = 0
    judged_flagged: int = 0
    judged_runs: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_drift(scored: int, flagged: int, history: Sequence[tuple[int, int]],
                target_specificity: float | None) -> Drift:
    """Check `flagged` of `scored` new films against `history`, the (scored, flagged) counts of earlier
    runs, newest first, and against the model's `target_specificity` (None: not known). A run with
    fewer than MIN_FILMS new films is pooled with the runs just before it (at most POOL_RUNS in all),
    so that a small site's nights are checked too; a run with no new films is judged by the runs
    before it, so that a warning stays raised until new films tell otherwise."""
    from scipy.stats import binomtest

    share = flagged / scored if scored else None
    judged, judged_flagged, pooled = scored, flagged, 0
    while judged < MIN_FILMS and pooled < min(len(history), POOL_RUNS - 1):
        judged, judged_flagged, pooled = judged + history[pooled][0], judged_flagged + history[pooled][1], pooled + 1
    earlier = list(history[pooled:pooled + HISTORY_RUNS])
    earlier_films = sum(n for n, _ in earlier)
    baseline = (sum(k for _, k in earlier) / earlier_films
                if len(earlier) >= MIN_RUNS and earlier_films >= MIN_RUNS * MIN_FILMS else None)
    expected = 1 - target_specificity if target_specificity is not None else None
    judged_share = judged_flagged / judged if judged else 0.0
    which = f"{judged_flagged} of {judged} new films" + (f" of this run and the {counted(pooled, 'run')} before it"
                                                          if pooled else "")
    p_history = p_calibration = None
    warnings = []
    checkable = judged >= MIN_FILMS
    if checkable and baseline is not None:
        # a history that flagged none (or all) of its films is a share known to about half a film in its count:
        # tested against that, not skipped (a review: from 0% to 90% in one night went unsaid)
        tested = min(max(baseline, 0.5 / earlier_films), 1 - 0.5 / earlier_films)
        p_history = float(binomtest(judged_flagged, judged, tested).pvalue)
        if p_history < ALPHA:
            warnings.append(f"{which} flagged ({judged_share:.0%}) against {baseline:.0%} over the last "
                            f"{len(earlier)} runs (p = {p_history:.1g}): the films or the scanners may have "
                            "changed; check the flagged share per scanner (StationName) and recalibrate if the normals "
                            "moved")
    if (checkable and baseline is None and expected is not None and 0 < expected < 1
            and judged_share > FAR_ABOVE * expected
            and binomtest(judged_flagged, judged, expected, alternative="greater").pvalue < ALPHA):
        # no history to compare with (a site's first nights): a share far above what normal films alone give
        # is most often a model whose scale does not fit the site (a trial: 40 of 40 adult films flagged, said
        # only in --json); a night of mostly abnormal films reads the same, so the words say both
        warnings.append(f"{which} flagged ({judged_share:.0%}), many times the {expected:.0%} of normal films alone "
                        "the threshold was set to flag, and no run history yet to compare with: if most of these "
                        "films are normal, the model's scale does not fit this site's films: recalibrate on its "
                        "normals (radscan calibrate)")
    if checkable and expected is not None and 0 < expected < 1:
        p_calibration = float(binomtest(judged_flagged, judged, expected, alternative="less").pvalue)
        if p_calibration < ALPHA:
            warnings.append(f"{which} flagged ({judged_share:.0%}), fewer than the {expected:.0%} of "
                            f"normal films alone the threshold was set to flag (p = {p_calibration:.1g}): the scores "
                            "may have drifted down")
    return Drift(scored, flagged, share, baseline, len(earlier), None if expected is None else round(expected, 6),
                 p_history, p_calibration, "; ".join(warnings), judged if checkable else 0,
                 judged_flagged if checkable else 0, pooled + 1 if checkable else 0,
                 _note(scored, judged, judged_share, pooled, checkable, p_history, earlier, expected))


def _note(scored: int, judged: int, judged_share: float, pooled: int, checkable: bool, p_history: float | None,
          earlier: list[tuple[int, int]], expected: float | None) -> str:
    """What the check looked at, for the summary: a quiet check and a check not made read alike otherwise.
    The calibration test is one-sided (a night holds abnormal films too): the note says so; a share far
    above what normal films alone give, while no history can judge it, is check_drift's warning."""
    if not checkable and not judged:
        return "not checked: no new films in this run or the runs before it"
    if not checkable:
        where = f"this run and the {counted(pooled, 'run')} before it" if pooled else "this run"
        return f"not checked: {counted(judged, 'new film')} in {where} (at least {MIN_FILMS} are needed)"
    what = (counted(judged, "new film") + (f" of this run and the {counted(pooled, 'run')} before it" if pooled
                                           else "") + f", {judged_share:.0%} flagged,")
    against = "" if expected is None else (f" (which tests only a fall below the {expected:.0%} that normal films "
                                           "alone give: a night holds abnormal films too)")
    if p_history is None:
        note = (f"checked {what} against the calibration only{against}: the history holds "
                f"{counted(len(earlier), 'run')} ({sum(n for n, _ in earlier)} films; {MIN_RUNS} runs and "
                f"{MIN_RUNS * MIN_FILMS} films are needed to test a rise)")
        return note
    return f"checked {what} against the calibration{against} and the last {counted(len(earlier), 'run')}"
