"""The drift check as a function (issue 21 item 7): a night's flagged share against its own history
and the model's calibration, pooling a small site's nights; the run history in the state store."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from radscan.drift import ALPHA, MIN_FILMS, MIN_RUNS, check_drift


@settings(deadline=None)  # the first call imports scipy.stats
@given(share=st.floats(0.02, 0.6), scored=st.integers(MIN_FILMS, 2000), runs=st.integers(MIN_RUNS, 40))
def test_a_night_like_its_history_raises_nothing(share, scored, runs):
    flagged = max(1, round(share * scored))
    history = [(scored, flagged)] * runs
    drift = check_drift(scored, flagged, history, target_specificity=None)
    assert drift.warning == "" and drift.p_history is not None and drift.p_history > ALPHA


def test_a_share_that_moves_beyond_chance_is_named_and_small_samples_are_not_judged():
    history = [(200, 20)] * 10  # 10% flagged, night after night
    up = check_drift(200, 60, history, target_specificity=0.95)
    assert "60 of 200 new films flagged (30%) against 10% over the last 10 runs" in up.warning
    down = check_drift(200, 1, history, target_specificity=0.95)
    assert "against 10%" in down.warning and "fewer than the 5% of normal films" in down.warning
    alone = check_drift(MIN_FILMS - 1, MIN_FILMS - 1, [], 0.95)  # too few films to say, and nothing to pool with
    assert alone.warning == "" and alone.note == f"not checked: {MIN_FILMS - 1} new films in this run (at least " \
        f"{MIN_FILMS} are needed)"
    assert check_drift(200, 60, history[:MIN_RUNS - 1], 0.95).baseline is None  # too little history
    assert check_drift(200, 60, [(5, 5)] * 10, None).baseline is None  # 50 films are too few as history
    assert check_drift(0, 0, [], 0.95).note == "not checked: no new films in this run or the runs before it"
    # a night without new films keeps the verdict of the nights before it (the alarm does not switch off)
    raised = [(20, 19)] + history
    assert check_drift(0, 0, raised, 0.95).warning and check_drift(0, 0, history, 0.95).warning == ""
    assert check_drift(0, 0, raised, 0.95).judged == 20


def test_a_small_sites_nights_are_pooled_until_there_are_enough_films():
    """A site that scores a few films a night is checked too: tonight with the nights just before it."""
    history = [(8, 1)] * 40  # 8 films a night, one flagged
    quiet = check_drift(8, 1, history, target_specificity=0.95)
    assert quiet.warning == "" and quiet.judged == 24 and quiet.judged_runs == 3 and quiet.baseline == 1 / 8
    assert quiet.note == "checked 24 new films of this run and the 2 runs before it, 12% flagged, against the " \
        "calibration (which tests only a fall below the 5% that normal films alone give: a night holds abnormal " \
        "films too) and the last 30 runs"
    # a first night that flags far more than normal films would: a warning with what to do (a trial: 40 of 40
    # adult films flagged by the children's model was said only in --json); one within chance is not
    first = check_drift(20, 18, [], target_specificity=0.95)
    assert "18 of 20 new films flagged (90%), many times the 5%" in first.warning
    assert "recalibrate on its normals" in first.warning and "90% flagged" in first.note
    assert check_drift(20, 3, [], target_specificity=0.95).warning == ""  # 15%: 3 times 5%, within chance
    assert check_drift(200, 30, [], target_specificity=0.95).warning == ""  # 15% of 200: not many times
    assert check_drift(200, 45, [], target_specificity=0.95).warning  # 22% of 200
    assert check_drift(20, 18, [(200, 180)] * 10, target_specificity=0.95).warning == ""  # as its history
    history = [(8, 7), (8, 8)] + history  # two nights of nearly every film flagged, then tonight
    moved = check_drift(8, 8, history, target_specificity=0.95)
    assert "23 of 24 new films of this run and the 2 runs before it flagged (96%) against 12% over the last 30" \
        in moved.warning
    few = check_drift(2, 0, [(2, 0)] * 3, target_specificity=0.95)  # 8 films in all: still too few
    assert few.warning == "" and few.judged == 0 and few.note.startswith("not checked: 8 new films in this run and "
                                                                          "the 3 runs before it")


def test_a_store_of_runs_without_a_model_column_is_upgraded_and_starts_a_new_history(tmp_path):
    """Stores written before the runs table said which model ran: their rows stay, and do not count
    as the history of any model."""
    from radscan.state import StateStore

    path = tmp_path / "report.state.sqlite"
    StateStore(path, "model A", "run1").close()
    with sqlite3.connect(path) as db:  # as 0.2 wrote it: four columns
        db.execute("DROP TABLE runs")
        db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, finished_at TEXT NOT NULL, scored INTEGER NOT NULL, "
                   "flagged INTEGER NOT NULL)")
        db.execute("INSERT INTO runs VALUES ('old', '2026-11-01T02:00:00+00:00', 100, 3)")
    store = StateStore(path, "model A", "run2")
    assert store.run_history() == []
    store.record_run("2026-11-02T02:00:00+00:00", 50, 2)
    store.close()
    later = StateStore(path, "model A", "run3")
    assert later.run_history() == [(50, 2)] and StateStore(path, "model B", "run4").run_history() == []
    later.close()


def test_a_history_that_flagged_none_or_all_still_judges_tonight():
    """A review: a history whose flagged share was exactly 0 or 1 was not tested, so a night going from
    0% to 90% flagged was not said, and a night of 40 of 40 against a history of all flagged read "no run
    history yet"."""
    jumped = check_drift(20, 18, [(20, 0)] * 6, None)
    assert "18 of 20 new films flagged (90%) against 0% over the last 6 runs" in jumped.warning
    assert check_drift(20, 0, [(20, 0)] * 6, None).warning == ""  # as its history
    same = check_drift(40, 40, [(40, 40)] * 6, 0.95)
    assert "no run history yet" not in same.warning and same.p_history is not None
