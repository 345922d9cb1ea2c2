"""The state store's reading list: the order a reader sees (radscan.state)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from radscan.state import FileIdentity, StateStore

# z-scores as a calibrated model gives them (on a 0.01 grid: the store keeps 3 decimals), many of them
# where sigmoid(z) rounds to 1.0 (z >= 14.5)
Z = st.one_of(st.integers(-300, 4000).map(lambda i: i / 100), st.sampled_from([14.6, 15.0, 17.9, 30.0]))


def _row(study: str, name: str, z: float) -> dict:
    score = round(1 / (1 + math.exp(-z)), 6)  # as radscan.batch stores it
    return {"status": "ok", "study_key": study, "root": "/in", "path": f"{study}/{name}", "score": score,
            "score_z": round(z, 3), "flag": score >= 0.9}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABCDE"), Z), min_size=2, max_size=14))
def test_the_list_follows_z_where_the_score_saturates_and_keeps_each_study_together(tmp_path_factory, films):
    """A new user's trial: films at z 15.7 and 17.9 both score 1.0, and the list put the lower
    first (by file name); two studies of one study score had their images interleaved."""
    store = StateStore(tmp_path_factory.mktemp("s") / "report.state.sqlite", "model", "run1")
    rows = [_row(study, f"f{index:02d}.png", z) for index, (study, z) in enumerate(films)]
    store.save((FileIdentity(f"/in\0{row['path']}", 1, 1), row) for row in rows)

    listed = list(store.worklist())
    study_z = {row["study_key"]: max(r["score_z"] for r in rows if r["study_key"] == row["study_key"])
               for row in rows}
    ordered = [(-study_z[row["study_key"]], row["study_key"], -row["score_z"]) for row in listed]
    assert ordered == sorted(ordered)  # by the study's top z, study by study, then by z
    studies = [study["study_key"] for study in store.studies()]
    assert [study_z[key] for key in studies] == sorted(study_z.values(), reverse=True)
    assert studies == list(dict.fromkeys(row["study_key"] for row in listed))  # the same order as the file list
    for study in store.studies():  # each study's row shows its top film
        assert study["top"]["score_z"] == study_z[study["study_key"]]
    store.close()


def test_a_film_read_for_the_first_time_after_an_error_is_new(tmp_path):
    """A new user's trial: a film whose read timed out one night (an unreadable row, for IT) and was
    scored and flagged the next was not `new_this_run`: the page's "new this run" filter hid it.
    A film already read keeps the run that first listed it, whatever a later read gave."""
    path = tmp_path / "report.state.sqlite"
    slow, seen = FileIdentity("/in\0slow.dcm", 10, 1), FileIdentity("/in\0seen.png", 10, 1)
    error = {"status": "error", "study_key": "S", "root": "/in", "score": None, "flag": False}
    first = StateStore(path, "model", "run1")
    first.save([(slow, {**error, "path": "slow.dcm"}), (seen, {**_row("S", "seen.png", 1.0), "path": "seen.png"})])
    first.record_run("2026-12-01T02:00:00", 1, 0)
    first.close()
    second = StateStore(path, "model B", "run2")  # another model: everything is read again
    second.save([(slow, {**_row("S", "slow.dcm", 20.0), "path": "slow.dcm"}),
                 (seen, {**error, "path": "seen.png"})])
    new = {row["path"]: row["new_this_run"] for row in second.worklist()}
    assert new == {"slow.dcm": True, "seen.png": False}
    second.record_run("2026-12-02T02:00:00", 1, 1)
    second.close()
    third = StateStore(path, "model", "run3")
    third.save([(seen, {**_row("S", "seen.png", 1.0), "path": "seen.png"})])
    assert {row["path"]: row["new_this_run"] for row in third.worklist()} == {"seen.png": False}
    third.close()


def test_a_store_of_0_2_reads_its_files_once_more_and_keeps_when_they_were_listed(tmp_path):
    """Rows stored before the inode was kept: each file is read once more ("settings", as after an
    upgrade), its `listed_since` kept, and from then on matched by its inode too."""
    path = tmp_path / "report.state.sqlite"
    old = StateStore(path, "model", "run1")
    film = FileIdentity("/in\0a.png", 10, 1, inode=77)
    old.save([(film, _row("S", "a.png", 1.0))])
    old.record_run("2026-12-01T02:00:00", 1, 0)
    old._db.execute("ALTER TABLE results DROP COLUMN inode")  # as 0.2 made it
    old.close()
    store = StateStore(path, "model", "run2")
    assert store.lookup(film) is None and store.why_stale(film) == "settings"
    store.save([(film, _row("S", "a.png", 1.0))])
    assert [row["new_this_run"] for row in store.worklist()] == [False]
    assert store.lookup(film) is not None and store.lookup(FileIdentity(film.key, 10, 1, inode=78)) is None
    assert store.why_stale(FileIdentity(film.key, 10, 1, inode=78)) == "changed"
    store.close()
