"""`radscan score`: the nightly job. Decode in worker processes, score in batches with the frozen
model, write the triage worklist (image and study CSVs) and explanation PNGs.

The run's orchestration only: a batch is judged and scored in radscan.batch (here or on a Dask
cluster's workers, radscan.cluster), identifiers handled in radscan.phi, the worklist written by
radscan.worklist, DICOM results delivered by radscan.pacs.

Runs are incremental (a state store beside the report remembers every file's result, keyed by
the file's identity and the run's fingerprint), locked (one run per output location) and atomic
(outputs are renamed into place only when complete; results are committed batch by batch, so a
killed run resumes where it stopped).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from radscan.batch import (
    BatchScorer,
    RunContext,
    ScoredBatch,
    ScoreSettings,
    crawl_study,
    judge_and_score,
    load_model_for_scoring,
    now,
    prepare_record,
    write_pictures,
)
from radscan.dicom import MODALITY_SKIPS
from radscan.dicomresults import ResultWriter, require_highdicom
from radscan.drift import Drift, check_drift
from radscan.errors import ModelError, NoInputError, SettingError
from radscan.ingest import (
    EMPTY_FILE,
    NOT_RECOGNISED,
    ONLY_ZERO_BYTES,
    READER_REVISION,
    READS_ONLY,
    Found,
    check_inputs,
    check_outputs_apart,
    distinct_inputs,
    fallback_study_key,
    find_files,
    iter_ingested,
    unread_formats,
)
from radscan.model.engine import check_device, import_engine
from radscan.model.metadata import ModelIdentity, read_metadata
from radscan.pacs import Delivery, deliver, forget_results
from radscan.phi import PhiFilter
from radscan.pictures import PICTURE_VERSION
from radscan.policy import FOLDER_STUDY_LIMIT, Policy, for_model, names_the_chest
from radscan.preprocess import PREPROCESS_VERSION
from radscan.qc import UNCHECKED, QualityControl, quality_control
from radscan.records import ImageRecord, Status, counted, printable, visible_controls
from radscan.report import (
    atomic_output,
    cannot_write,
    png_name,
    prepare_folder,
    refuse_special,
    remove_stale_temporaries,
)
from radscan.state import FILM_GONE_BAD, FileIdentity, StateStore, hold_lock, store_files
from radscan.stopping import raise_if_stop_asked
from radscan.worklist import DISCLAIMER, OutputPaths, write_readme, write_worklist

if TYPE_CHECKING:
    from radscan.cluster import Cluster

__all__ = ["ScoreSummary", "score", "default_model_dir", "check_dicom_settings", "check_request"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "kermany-tiny"
# which scored images get an explanation picture; "flagged" skips the gradient pass of the rest
PICTURE_MODES = ("all", "flagged", "none")


def default_model_dir() -> Path:
    """The model shipped in the repository's models/ folder."""
    return Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL_NAME


@dataclass
class ScoreSummary:
    files: int
    counts: dict[str, int]
    flagged_images: int
    flagged_studies: int
    studies: int
    scored_now: int  # files read this run, for the reasons in read_because
    reused: int  # files unchanged since the last run, of every status
    read_because: dict[str, int]  # READ_REASONS -> files (only those with any)
    duration_s: float
    images_per_s: float
    report: str
    studies_csv: str
    residuals: str | None
    model: str
    run_id: str
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""
    qc: str = ""  # how quality control judged: strict, warn or off (off: every film scored, whatever it shows)
    dicom: dict[str, Any] | None = None  # radscan.pacs.Delivery, with --dicom-out
    # what an operator must act on, in plain words (also logged as WARNING lines): files that could
    # not be read apart from results that did not reach the PACS; empty after a clean night
    problems: list[str] = dataclass_field(default_factory=list)
    # the flagged share of the films scored anew, against the run history and the calibration (radscan.drift)
    drift: dict[str, Any] | None = None
    # most films of the earlier list are gone from the inputs (a share that mounted in part): not a success
    inputs_missing: bool = False
    started_at: str = ""
    finished_at: str = ""
    disclaimer: str = DISCLAIMER

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def results_pending(self) -> bool:
        """DICOM results of this run not made or not sent (kept for the next run)."""
        return bool(self.dicom and (self.dicom["not_sent"] or self.dicom["not_made"]))

    @property
    def results_waiting(self) -> bool:
        """Of those, results a later run can still send: not sent, and not refused by the PACS for good
        (results that could not be made, or that it refuses, a retry would only repeat)."""
        return bool(self.dicom and self.dicom["not_sent"] - self.dicom.get("refused", 0) > 0)


def score(inputs: Sequence[str], outputs: OutputPaths, settings: ScoreSettings) -> ScoreSummary:
    """Score every image under `inputs` and write the worklist; see the module docstring."""
    started = time.monotonic()
    inputs, pictures, model_dir = check_request(inputs, outputs, settings)  # before any output is made
    metadata = read_metadata(model_dir)
    check_device(metadata, settings.device)
    identity = ModelIdentity.of(metadata)
    # a model's box is how it reads films
    settings = replace(settings, policy=for_model(settings.policy, metadata, model_dir))
    phi = PhiFilter(settings.phi, settings.phi_key)
    qc = quality_control(model_dir, metadata, settings.qc, settings.views)
    # the model's name and version too (model.json, not sealed in the weights): every row states them
    fingerprint = "|".join([identity.sha256, identity.name, identity.version, PREPROCESS_VERSION,
                            f"reader {READER_REVISION}", repr(settings.policy), phi.fingerprint,
                            _pictures_key(pictures, bool(outputs.dicom)), qc.fingerprint])
    # the drift history: what decides a flag, not how the list is drawn (pictures, identifiers)
    history_key = "|".join([identity.sha256, PREPROCESS_VERSION, repr(settings.policy), qc.fingerprint])
    run_id, started_at = uuid.uuid4().hex[:12], now()
    log.info("run %s started: %s -> %s, model %s %s (sha256 %s...)", run_id, ", ".join(inputs), outputs.report,
             identity.name, identity.version, identity.sha256[:12])
    if settings.qc == "off":  # said every run, and on the page: a reader must know nothing was set aside
        log.warning("quality control is off (--qc off): every film is scored whatever it shows; a blank, inverted "
                    "or non-chest image can top the list")
    elif settings.qc == "warn":
        log.info("quality control only warns (--qc warn): films it would set aside are scored, their reason says why")

    # torch (or, for an exported model, ONNX Runtime) and the model code are imported here, before any
    # other thread of the run starts, and the loading thread only reads the weights: a Ctrl-C that lands
    # inside Python's import machinery while a second thread imports (the loader, importing torch) can
    # leave the import lock held and hang the run instead of stopping it (seen, 1 in 7 runs interrupted
    # in their first 2 s)
    with _ctrl_c_deferred():  # and not inside torch's C++ start-up, which aborts on it (exit 134)
        import_engine(metadata)

    with hold_lock(outputs.lock) as lock, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="radscan-load") as loader:
        _tidy_outputs(outputs)
        loading = loader.submit(load_model_for_scoring, model_dir, settings.device)
        files, resolved_roots = _find_inputs(inputs, outputs, settings)
        store = StateStore(outputs.state, fingerprint, run_id, history_key)
        try:
            todo, read_because, moved_pictures = _reuse_stored(files, store, outputs.report.parent, pictures,
                                               dicom_pictures=bool(outputs.dicom), pictures_dir=outputs.residuals)
            log.info("%d files: %d unchanged since the last run, %d to read%s", len(files), len(files) - len(todo),
                     len(todo), f" ({why_read(read_because)})" if todo else "")
            run = RunContext(identity, run_id, phi, outputs.residuals, outputs.report.parent, pictures,
                             dicom_pictures=bool(outputs.dicom), resolved_roots=resolved_roots)
            scorer = BatchScorer(loading, run)
            with _cluster(settings, model_dir, metadata, resolved_roots, todo) as cluster:
                if cluster is not None:
                    cluster.prepare(run)
                _score_new(todo, settings, phi, qc, scorer, store, cluster)
            raise_if_stop_asked()  # and never lets it replace the outputs
            threshold = scorer.threshold  # the model is verified even when nothing was new
            by_root = store.films_by_root()  # one pass over the table: what this run saw, per root
            _refuse_filmless(inputs, by_root)
            lock.confirm()  # the shared outputs follow: never beside another run's
            delivery = _deliver(store, outputs, settings, scorer.provenance, identity)
            counts = store.counts()
            drift = check_drift(*store.scored_now(), store.run_history(), identity.target_specificity)
            skipped = store.skipped_rows()
            unread = sum(READS_ONLY in row.get("reason", "") for row in skipped)
            problems = _problems(counts, delivery, outputs, drift, read_because["study"], store.moved_aside, unread,
                                 chest_films_skipped(skipped, settings.policy))
            if qc.unchecked:  # said on the page and in --json too, not only in a log line (a trial)
                problems.append(UNCHECKED)
            gone, kept = _most_of_the_list_gone(by_root, inputs, settings.forget_missing)
            problems += filter(None, [gone])
            lock.confirm()
            # a success wrote a list of every film there is and delivered every result: a share that
            # mounted in part is not one (a trial: exit 0, ok and last_success on a night that lost two
            # thirds of its films)
            studies = write_worklist(store, outputs, threshold, identity, run=(run_id, dict(counts)),
                                     problems=problems,
                                     delivered=(delivery is None or delivery.complete) and gone is None,
                                     qc_mode=settings.qc)
            write_readme(outputs, identity, pictures)
            store.record_run(now(), drift.scored, drift.flagged)
            _forget(store.prune(keep_roots=kept), outputs)
            _remove_unlinked_pictures(store, outputs)
            _remove_moved_pictures(moved_pictures, outputs)
        finally:
            store.close()

    duration = time.monotonic() - started
    for problem in problems:
        log.warning("%s", problem)
    flagged_images = counts.pop("flagged")
    log.info("run %s finished in %.1f s: %d files, %s; %d of %d studies flagged", run_id, duration, len(files),
             ", ".join(f"{count} {status}" for status, count in counts.items()), studies[1], studies[0])
    return ScoreSummary(
        files=len(files), counts=counts, flagged_images=flagged_images, flagged_studies=studies[1],
        studies=studies[0], scored_now=len(todo), reused=len(files) - len(todo),
        read_because={reason: read_because[reason] for reason in READ_REASONS if read_because[reason]},
        duration_s=round(duration, 3),
        images_per_s=round(len(todo) / duration, 2) if duration else 0.0,
        report=str(outputs.report), studies_csv=str(outputs.studies),
        residuals=str(outputs.residuals) if outputs.residuals else None, model=str(model_dir), run_id=run_id,
        model_name=identity.name, model_version=identity.version, model_sha256=identity.sha256, qc=settings.qc,
        started_at=started_at, finished_at=now(),
        dicom=delivery.as_dict() if delivery else None, problems=problems, drift=drift.as_dict(),
        inputs_missing=gone is not None,
    )


def check_request(inputs: Sequence[str], outputs: OutputPaths,
                   settings: ScoreSettings) -> tuple[list[str], str, Path]:
    """Every check that needs no lock, before anything is created: the inputs exist and are
    distinct, no output lies inside an input or the model or is another output, the settings are
    consistent, the model directory exists. Returns (distinct inputs, picture mode, model
    directory). Raises SettingError, NoInputError, ModelError or OutputError."""
    check_inputs(inputs)
    inputs = distinct_inputs(inputs)
    every_output = outputs.every
    check_outputs_apart(inputs, every_output)
    named = [Path(path).resolve() for path in every_output]
    if len(set(named)) < len(named):
        raise SettingError("two outputs have the same path (--out, --studies, --residuals or the files beside "
                           "them): give each its own")
    pictures = settings.pictures if outputs.residuals is not None else "none"
    if pictures not in PICTURE_MODES:
        raise SettingError(f"pictures must be one of {', '.join(PICTURE_MODES)}, not {pictures!r}")
    check_dicom_settings(outputs, settings)
    if settings.scheduler is not None:  # a malformed address is a usage error before anything is made
        from radscan.cluster import parse_scheduler

        parse_scheduler(settings.scheduler)
    model_dir = settings.model_dir or default_model_dir()
    check_outputs_apart([model_dir], every_output, kind="model")
    for path in (*outputs.files, outputs.lock, *store_files(outputs.state)):
        refuse_special(path)  # before anything is created beside them (e.g. --out /dev/null)
    if not model_dir.exists():
        raise ModelError(f"no model at {model_dir}: pass --model DIR (a directory made by radscan train)")
    return inputs, pictures, model_dir


def _find_inputs(inputs: list[str], outputs: OutputPaths, settings: ScoreSettings) -> tuple[list[Found],
                                                                                            dict[str, str]]:
    """The files to list (never the run's own outputs) and the resolved folder each was found under
    (a file given itself is found under its folder). Raises NoInputError when there is none, or
    when a folder given is empty: an unmounted share looks like one, and its studies must not be
    pruned from the worklist."""
    files = find_files(inputs, exclude=[outputs.report, outputs.studies, outputs.state, outputs.lock,
                                        *(folder for folder in (outputs.residuals, outputs.dicom) if folder)],
                       study_key=settings.study_key)
    if not files:
        raise NoInputError(f"no files found under {', '.join(inputs)}")
    with_files = {Path(found.root) for found in files}
    empty = [str(root) for root in inputs
             if Path(root).is_dir() and Path(root) not in with_files and not _holds_links(Path(root))]
    if empty:
        raise NoInputError(f"no files found under {', '.join(empty)} (an unmounted or emptied folder?): nothing "
                           "was changed; remove it from the command line if it is meant to be empty")
    return files, {root: str(Path(root).resolve()) for root in {found.root for found in files}}


def _refuse_filmless(inputs: Sequence[str], by_root: Mapping[str, tuple[int, int, int]]) -> None:
    """Raise NoInputError, before anything is written or pruned, when a folder given holds files but
    no image and no DICOM object (only a `.DS_Store`, notes), as an empty folder does, or when the
    inputs hold none at all while earlier runs listed films there (files given one by one: `radscan
    score S/*`). A share
    that did not mount, leaving a stray file, looked like a night on which all its films were
    deleted, and its films left the list with exit 0 (a trial; with a second share still mounted, a
    review). A folder whose films are reached through its links is listed under the links' targets
    and not judged here; images in formats radscan does not read keep their rows, which say so.
    `by_root`: `StateStore.films_by_root` after this run's reading."""
    for given in inputs:
        listed, images, gone = by_root.get(str(Path(given).resolve()), (0, 0, 0))
        if Path(given).is_dir() and listed and not images and not _holds_links(Path(given)):
            kept = f"; the {counted(gone, 'film')} earlier runs listed there stay listed" if gone else ""
            raise NoInputError(f"no DICOM file, JPEG or PNG found under {given}, only other files (an unmounted or "
                               f"emptied share?): nothing was changed{kept}; remove it from the command line if it "
                               "is meant to hold none")
    if not any(images for _, images, _ in by_root.values()):
        gone = sum(gone for _, _, gone in by_root.values())
        if gone:
            raise NoInputError(f"no DICOM file, JPEG or PNG found in {', '.join(inputs)}: nothing was changed; the "
                               f"{counted(gone, 'film')} earlier runs listed stay listed (an unmounted or emptied "
                               "share?)")
        if any(listed for listed, _, _ in by_root.values()) and not any(map(_holds_links, map(Path, inputs))):
            raise NoInputError(f"no DICOM file, JPEG or PNG found in {', '.join(inputs)}, only other files: nothing "
                               "was written")


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """SIGINT blocked in this (main) thread for the block: a Ctrl-C waits, it is not lost, and is
    raised when the block ends (or taken at once by another thread of the process, if one runs:
    then raised inside the import, which may swallow it; radscan.stopping raises it again later).
    For imports that must not be interrupted: a KeyboardInterrupt inside torch's C++ start-up
    aborts the process (exit 134). (Worker processes do not inherit the mask: loky's spawn resets
    it, so a Ctrl-C in their first second still prints their import tracebacks.)"""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# DICOM modalities (PS3.3 C.7.3.1.1.1) that are never a projection radiograph of the chest: a chest CT
# routed to the same folder is no film lost (a review: a standing false alarm every night)
NOT_RADIOGRAPHS = frozenset(("CT", "MR", "PT", "NM", "US", "MG", "XA", "RF", "IO", "PX", "OP", "OPT", "OPM",
                             "SM", "XC", "ES", "ECG", "SR", "PR", "KO", "SEG", "REG", "RTIMAGE", "RTSTRUCT",
                             "RTDOSE", "RTPLAN", "RTRECORD", "DOC", "BI", "HD", "IVUS", "IVOCT", "LS", "OCT",
                             "OSS", "PLAN", "AU", "BDUS", "EPS", "GM", "DMS", "HC", "TG", "VA"))


def chest_films_skipped(skipped: Iterable[Mapping[str, Any]], policy: Policy) -> str:
    """What to say of the DICOM images of the chest (a BodyPartExamined that names it) that `skipped`
    (rows of this run) holds because of their Modality, that is none of NOT_RADIOGRAPHS, or "": a chest
    film a site's equipment labels DR, RG, OT or nothing was skipped with exit 0 and no word (a trial).
    Said every night they stay skipped, with the values counted (a header value, shown escaped and
    cut to a CS's 16 characters)."""
    values = Counter(visible_controls(str(row.get("Modality", ""))[:16]) or "none" for row in skipped
                     if row.get("kind") == "dicom" and str(row.get("reason", "")).startswith(MODALITY_SKIPS)
                     and names_the_chest(str(row.get("BodyPartExamined", "")))
                     and str(row.get("Modality", "")).strip().upper() not in NOT_RADIOGRAPHS)
    if not values:
        return ""
    said = ", ".join(f"{value} ({count})" for value, count in values.most_common(5))
    allowed = ",".join(policy.modalities or ())
    return (f"{counted(values.total(), 'DICOM image')} of the chest (by BodyPartExamined) "
            f"{'was' if values.total() == 1 else 'were'} skipped for their Modality: {said}; if they are "
            f"radiographs, add the value: --modalities {allowed},VALUE")


def _problems(counts: dict[str, int], delivery: Delivery | None, outputs: OutputPaths, drift: Drift,
              regrouped: int = 0, moved_aside: Path | None = None, unread: int = 0,
              chest_skipped: str = "") -> list[str]:
    """What needs an operator after a run that finished, each kind in its own words: files that
    could not be read (the source, or the share) apart from results that did not reach the PACS
    (the network or the PACS), so that monitoring never reads a PACS outage as a good night; and a
    flagged share that moved beyond chance (radscan.drift)."""
    problems = []
    if unread:  # a site exporting TIFF saw every film skipped, exit 0 and nothing flagged
        problems.append(unread_formats(unread))
    if chest_skipped:
        problems.append(chest_skipped)
    if counts["error"]:
        problems.append(f"{counts['error']} file(s) could not be read: see the status=error rows of "
                        f"{outputs.report.name}")
    if delivery is not None and delivery.refused:
        problems.append(f"{counted(delivery.refused, 'DICOM result object')} refused by {delivery.destination} "
                        f"({delivery.refusal}): kept in {delivery.folder}; no rerun sends them until the PACS's "
                        "configuration changes")
    if delivery is not None and delivery.not_sent > delivery.refused:
        problems.append(f"{counted(delivery.not_sent - delivery.refused, 'DICOM result object')} not sent to "
                        f"{delivery.destination} ({delivery.send_failure or 'see the worklist'}): kept in "
                        f"{delivery.folder} and sent by the next run")
    if delivery is not None and delivery.not_made:
        problems.append(f"{delivery.not_made} scored DICOM image(s) have no DICOM results: see their reason in "
                        f"{outputs.report.name}")
    if drift.warning:
        problems.append(drift.warning)
    if moved_aside is not None:
        problems.append(f"the state store was damaged and is moved aside to {moved_aside.name}: it may hold "
                        "identifiers of earlier runs; delete it once inspected (every file was read again)")
    if regrouped:  # counts only: a folder's name may carry a patient's
        problems.append(f"{counted(regrouped, 'film')} without a study UID {'is' if regrouped == 1 else 'are'} "
                        "grouped into studies differently from the last run (--study-key changed, or with "
                        f"--study-key auto their folder crossed {FOLDER_STUDY_LIMIT} films): set --study-key folder "
                        "or file to keep one grouping")
    return problems


# A run whose inputs no longer hold more of the list's films than they still hold, at least this many,
# says so: a share that mounted in part, a restore under way (a night that lost its flagged studies
# silently, a trial); a nightly clean-up of old studies removes far fewer at once.
VANISHED_WARNING = 10


def _most_of_the_list_gone(by_root: Mapping[str, tuple[int, int, int]], inputs: Sequence[str],
                           forget: bool = False) -> tuple[str | None, frozenset[str]]:
    """(A problem line, the roots whose missing films are kept) when most films of the earlier list
    are gone from a folder given this run, else (None, no roots). A folder given before and not now
    is not one: the user chose other inputs (a review: it read as a partial mount). The missing films
    leave tonight's list but stay in the store, so that every night says it (exit 3) until they are
    back or `forget` (--forget-missing) lets them go: a share that stayed half mounted was a problem
    on its first night only (a review). `by_root`: `StateStore.films_by_root` after this run's reading."""
    given = {str(Path(root).resolve()) for root in inputs}
    # per input root: a share that mounted in part beside another that did not move is one too (a review)
    lost = {root: (gone, listed) for root, (_, listed, gone) in by_root.items()
            if root in given and gone >= VANISHED_WARNING and gone > listed}
    if not lost:
        return None, frozenset()
    gone, listed = sum(gone for gone, _ in lost.values()), sum(listed for _, listed in lost.values())
    if forget:
        log.info("%s listed by earlier runs %s forgotten (--forget-missing)", counted(gone, "film"),
                 "is" if gone == 1 else "are")
        return None, frozenset()
    return (f"{counted(gone, 'film')} listed by earlier runs {'is' if gone == 1 else 'are'} no longer among the "
            f"inputs, more than the {listed} {'its folder holds' if len(lost) == 1 else 'their folders hold'} now "
            "(a share that mounted in part, a restore under way?): they are not on this list, and are kept until "
            "they are back; mount the share and run again, or, if they were removed on purpose, run once with "
            "--forget-missing"), frozenset(lost)


def _holds_links(root: Path) -> bool:
    """Whether a folder that listed no file (or no film) holds a symbolic link: its films are then
    listed under another root or path that the link leads to (radscan.ingest.find_files), and it is
    not an unmounted or emptied share. Walked without following links, only on that rare path."""
    for folder, folders, names in os.walk(root):
        if any(os.path.islink(os.path.join(folder, name)) for name in (*folders, *names)):
            return True
    return False


@contextlib.contextmanager
def _cluster(settings: ScoreSettings, model_dir: Path, metadata: dict[str, Any], resolved_roots: dict[str, str],
             todo: list[tuple[Found, FileIdentity]]) -> Iterator[Cluster | None]:
    """The Dask cluster of --scheduler (closed at the end), when there is something to read."""
    if settings.scheduler is None or not todo:
        yield None
        return
    from radscan.cluster import Cluster

    samples: dict[str, str] = {}  # a file of each root: a worker that sees the folder but not its files is caught
    for found, _ in todo:
        if found.root not in samples:
            samples[found.root] = str(Path(resolved_roots[found.root]) / found.path)
    cluster = Cluster(settings.scheduler, settings, model_dir, metadata, list(resolved_roots.values()),
                      list(samples.values()))
    try:
        yield cluster
    finally:
        cluster.close()


def check_dicom_settings(outputs: OutputPaths, settings: ScoreSettings) -> None:
    """DICOM results go into the source's study in the PACS: they need the study's real patient
    identity (decided for 0.3: no de-identified results, whose UIDs and dates would still link them
    to the patient) and the explanation pictures their Secondary Captures are made of."""
    if outputs.dicom is None:
        if settings.send is not None:
            raise SettingError("--send sends the DICOM results that --dicom-out keeps: give --dicom-out DIR too")
        return
    require_highdicom()
    if settings.phi != "keep":
        raise SettingError(f"--dicom-out with --phi {settings.phi}: DICOM results join the source's study in the PACS "
                           "and must carry its patient and study as they are; use --phi keep for that run (results "
                           "with hashed or dropped identifiers would not join the study)")
    if outputs.residuals is None:
        raise SettingError("--dicom-out with --no-residuals: each DICOM image's Secondary Capture is its explanation "
                           "picture; leave out --no-residuals")


def _deliver(store: StateStore, outputs: OutputPaths, settings: ScoreSettings, provenance: dict[str, Any],
             identity: ModelIdentity) -> Delivery | None:
    """The DICOM results of the scored DICOM images, written and sent (radscan.pacs)."""
    if outputs.dicom is None:
        return None
    writer = ResultWriter(outputs.dicom, provenance, identity.score_kind)
    return deliver(store, writer, outputs.report.parent, settings.send)


def _tidy_outputs(outputs: OutputPaths) -> None:
    """Under the lock: refuse a pictures folder that is a symbolic link (pictures would land, and
    old ones be deleted, wherever it points), and remove what a killed run left half-written."""
    for folder, option in ((outputs.residuals, "--residuals"), (outputs.dicom, "--dicom-out")):
        if folder is not None:
            prepare_folder(folder, option)
    if outputs.residuals is not None:
        _claim_pictures(outputs.residuals, outputs.report)
    if outputs.dicom is not None:  # found out now, not after a night of scoring
        try:
            tempfile.TemporaryFile(dir=outputs.dicom).close()
        except OSError as exc:
            raise cannot_write(outputs.dicom, exc) from None
    removed = sum(remove_stale_temporaries(path.parent, glob.escape(path.name)) for path in outputs.files)
    if outputs.residuals is not None and outputs.residuals.is_dir():
        removed += remove_stale_temporaries(outputs.residuals, "*.png")
    if outputs.dicom is not None and outputs.dicom.is_dir():
        removed += remove_stale_temporaries(outputs.dicom, "*.dcm")
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)


PICTURES_OWNER = ".radscan-worklist"  # in a pictures folder: the worklist whose pictures it holds


def _claim_pictures(folder: Path, report: Path) -> None:
    """Refuse (SettingError, exit 2) a pictures folder that holds another worklist's pictures, while
    that worklist exists: picture names depend on the film alone, so two worklists sharing a folder
    (one `residuals` in a TOML file used by two jobs) overwrote each other's pictures (a caption with
    the other job's identifiers) and deleted pictures the other still linked (a trial). Else the
    folder is marked as this worklist's. Call under the lock of the outputs.

    The mark names the worklist and the folder it was made in: a mark copied with its folder (a
    worklist folder copied elsewhere) names another folder, and is not another worklist's claim;
    a worklist exists from its first run's lock on (two first runs at once both took the folder:
    a review)."""
    owner, here = _pictures_owner(folder)
    if owner == str(report.resolve()) and here:
        return
    other = OutputPaths.beside(Path(owner)) if owner else None
    if other is not None and here and any(path.exists() for path in (other.report, other.state, other.lock)):
        raise SettingError(f"the pictures folder {printable(str(folder))} holds the pictures of another worklist, "
                           f"{printable(owner)}: worklists sharing one folder overwrite and delete each other's "
                           "pictures; give each --out its own --residuals (or none: the default is beside it)")
    marker = folder / PICTURES_OWNER
    try:
        with atomic_output(marker) as handle:
            handle.write(f"{report.resolve()}\n{folder.resolve()}\n")
    except OSError as exc:
        raise cannot_write(marker, exc) from None


def _pictures_owner(folder: Path) -> tuple[str, bool]:
    """(the worklist a pictures folder's mark names, "" when none or unreadable; whether the mark
    was made in this folder, not copied here with it)."""
    try:
        lines = (folder / PICTURES_OWNER).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return "", False
    owner = lines[0].strip() if lines else ""
    made_in = lines[1].strip() if len(lines) > 1 else ""
    return owner, made_in == str(folder.resolve())


def _forget(rows: list[dict[str, Any]], outputs: OutputPaths) -> None:
    """Remove the pictures of files that are no longer among the inputs (their rows are gone from
    the store): the worklist lists what is there now, and nothing of a removed study stays behind.
    Only files inside the pictures folder are removed, whatever a stored row says."""
    if rows:
        log.info("%d files are no longer among the inputs: their rows and pictures are removed", len(rows))
    forget_results(rows, outputs.dicom, outputs.report.parent)
    folder = (outputs.residuals or outputs.default_residuals).resolve()
    for row in rows:
        name = row.get("residual_png")
        if not name:
            continue
        picture = (outputs.report.parent / name).resolve()
        if picture.parent == folder and picture.suffix == ".png":
            picture.unlink(missing_ok=True)


def _remove_unlinked_pictures(store: StateStore, outputs: OutputPaths) -> None:
    """Under --no-residuals, remove from the default pictures folder the picture an earlier run drew
    of each film this run read (with a pictures folder, each batch already removes the picture of a
    film it scores without one: write_pictures). Only the film's own picture name
    (radscan.report.png_name) is removed, so a folder shared with another worklist keeps that list's
    pictures; never a symbolic link or a folder."""
    folder = outputs.default_residuals
    if outputs.residuals is not None or folder.is_symlink() or not folder.is_dir():
        return
    removed = 0
    for key in store.read_without_picture():
        picture = folder / png_name(key)  # the key is the resolved root and the path, as the picture was named
        if picture.is_file() and not picture.is_symlink():
            picture.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d pictures of films that have none now (%s)", removed, folder)


def _remove_moved_pictures(links: list[str], outputs: OutputPaths) -> None:
    """Remove the pictures this worklist drew in an earlier pictures folder (`links`, as its rows
    linked them), now drawn in this run's or not at all (--no-residuals): their captions may carry
    identifiers, and nothing links them (a trial found them left behind, a review after
    --no-residuals). Only PNG files in a folder marked as this worklist's
    (PICTURES_OWNER; or its default folder, made before the mark); the mark and the folder go too
    once no picture is left in it. Call after the list that links the new pictures is written."""
    owner, folders, removed = str(outputs.report.resolve()), set(), 0
    for link in links:
        picture = outputs.report.parent / link
        folder = picture.parent
        if picture.suffix != ".png" or picture.is_symlink() or not picture.is_file() or \
                not _pictures_of(folder, owner, outputs.default_residuals):
            continue
        picture.unlink(missing_ok=True)
        folders.add(folder)
        removed += 1
    for folder in folders:
        with contextlib.suppress(OSError):
            if not any(folder.glob("*.png")):
                (folder / PICTURES_OWNER).unlink(missing_ok=True)
                folder.rmdir()  # only if nothing else is left in it
    if removed:
        log.info("removed %d pictures of an earlier pictures folder (%s)", removed,
                 f"drawn again in {printable(str(outputs.residuals))}" if outputs.residuals else "--no-residuals")


def _pictures_of(folder: Path, owner: str, default: Path) -> bool:
    """Whether `folder` holds the pictures of the worklist `owner` (its mark, made there, names it;
    or it is the worklist's default pictures folder and holds no mark)."""
    if not (folder / PICTURES_OWNER).exists():
        return str(default.resolve()) == str(folder.resolve())
    named, here = _pictures_owner(folder)
    return here and named == owner


def _identity(found: Found) -> FileIdentity:
    key = f"{Path(found.root).resolve()}\0{found.path}"
    try:
        stat = found.full_path.stat()
        return FileIdentity(key, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError:
        return FileIdentity(key, -1, -1)


# why a file is read again (ScoreSummary.read_because), in the order the one-line summary names them
READ_REASONS = {
    "new": "new",
    "changed": "changed",
    "settings": "read again under another model or settings",
    "error": "retried after an error",
    "picture": "whose picture was missing or in another folder",
    "study": "whose study changed",
    "store": "read again because the state store was damaged",
}


def why_read(reasons: Mapping[str, int]) -> str:
    """'3 new, 12 read again under another model or settings': why the files of a run were read."""
    return ", ".join(f"{reasons[reason]} {words}" for reason, words in READ_REASONS.items() if reasons.get(reason))


def _picture_in(link: str, link_base: Path, folder: str | None) -> bool:
    """Whether a stored picture (`link`, relative to `link_base`, as the list links it) is a file in
    this run's pictures folder (`folder`, relative to `link_base` too): a rerun given another
    `--residuals` folder draws its pictures there, so that the list, its README and the folder agree.
    Compared as the links are written (radscan.batch), without resolving paths for every film."""
    return (folder is None or _folder_of(link) == folder) and (link_base / link).is_file()


def _folder_of(link: str) -> str:
    """The folder of a stored picture link, as `_reuse_stored` writes this run's pictures folder."""
    return os.path.dirname(os.path.normpath(link))


def _reuse_stored(files: list[Found], store: StateStore, link_base: Path, pictures: str,
                  dicom_pictures: bool = False, pictures_dir: Path | None = None,
                  ) -> tuple[list[tuple[Found, FileIdentity]], Counter[str], list[str]]:
    """Mark the rows still valid in the store as seen by this run; return the files left to read,
    with the identity they were looked up by, how many are read for each reason (READ_REASONS), and
    the links of the pictures they leave behind in another folder (an earlier --residuals).
    Files with errors are always retried; a scored (or rejected) row whose picture has gone is read
    again (with `dicom_pictures`, every DICOM image has one), and so is a row whose study was named by
    the crawl and is another now (radscan.ingest.assign_study_keys)."""
    todo, unchanged, reasons, moved = [], [], Counter(), []
    folder = None if pictures_dir is None else os.path.normpath(os.path.relpath(pictures_dir, link_base))
    for found in files:
        identity = _identity(found)
        row = None if found.problem else store.lookup(identity)
        if row is None:
            reason = store.why_stale(identity)  # a file that cannot even be opened is "new" the first time
        elif row["status"] == Status.ERROR:
            reason = "error"
        elif not (row.get("StudyInstanceUID") or
                  # a study named by the crawl, not the file, moves when --study-key or the folder's size does
                  crawl_study(row.get("study_key", "")) == fallback_study_key(found)):
            reason = "study"
        elif pictures != "none" and (row["status"] == Status.REJECTED or (
                row["status"] == Status.OK and (pictures == "all" or (pictures == "flagged" and (
                    row.get("flag") is True or (dicom_pictures and row.get("kind") == "dicom")))))) \
                and not _picture_in(row.get("residual_png", ""), link_base, folder):
            reason = "picture"
        else:
            unchanged.append((identity, printable(found.root)))
            continue
        reasons[reason] += 1
        todo.append((found, identity))
        # its earlier picture, in another folder than this run's (or any, with --no-residuals), is left
        # behind; a file new to the store has none (no query for each file of a first run)
        link = row.get("residual_png", "") if row is not None else \
            "" if reason in ("new", "store") else store.stored_picture(identity.key)
        if link and (folder is None or _folder_of(link) != folder):
            moved.append(link)
    store.mark_seen(unchanged)
    return todo, reasons, moved


def _score_new(todo: list[tuple[Found, FileIdentity]], settings: ScoreSettings, phi: PhiFilter, qc: QualityControl,
               scorer: BatchScorer, store: StateStore, cluster: Cluster | None = None) -> None:
    """Read, judge and score `todo`, here (decoding in worker processes while the model scores
    full batches) or on a Dask cluster; write each batch's pictures, then commit its rows."""
    dicom = Counter()  # DICOM files read this run, and those skipped: a policy that skips all is a mistake
    progress = _ProgressLog(len(todo), quiet=not settings.progress or sys.stderr.isatty())
    batches = cluster.score(todo) if cluster is not None else _score_here(todo, settings, phi, qc, scorer)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="radscan-png") as pool, \
            tqdm(total=len(todo), unit="file", desc="score", disable=None if settings.progress else True) as bar:
        for identities, rows, pictures in batches:
            write_pictures(pictures, pool)
            _fail_films_gone_bad(identities, rows, store)
            store.save(zip(identities, rows, strict=True))
            dicom.update(row["status"] for row in rows if row["kind"] == "dicom")
            bar.update(len(rows))
            progress.tick(len(rows))
            raise_if_stop_asked()  # a Ctrl-C that a library swallowed (radscan.stopping) stops the run here
    if dicom and dicom[Status.SKIPPED] == dicom.total():
        log.warning("none of the %d DICOM files read in this run was used: all were skipped by the selection "
                    "policy (modalities %s, body parts %s); check --modalities and --body-parts",
                    dicom.total(), _listed(settings.policy.modalities), _listed(settings.policy.body_parts))


def _fail_films_gone_bad(identities: list[FileIdentity], rows: list[dict[str, Any]], store: StateStore) -> None:
    """Each file that is no film now (any kind of file radscan does not read) and that an earlier run
    read as one keeps that in its reason (FILM_GONE_BAD), night after night whatever its damage
    becomes; and one skipped as no known kind of file (empty, not recognised: zero-filled or cut short
    by a copy that did not finish, overwritten) is an error. Skipped, its study left the worklist with
    exit 0 and no word (a trial: a study flagged one night was gone the next; then one zero-filled one
    night and overwritten the next). A film packed (gzip) or converted (TIFF) in place stays skipped,
    its row saying what to do. Rows changed in place."""
    for identity, row in zip(identities, rows, strict=True):
        if row["kind"] != "other" or (was := store.stored_film_kind(identity.key)) is None:
            continue
        said = FILM_GONE_BAD.format(was.upper())
        damaged = row["reason"] in (EMPTY_FILE, NOT_RECOGNISED, ONLY_ZERO_BYTES)
        if damaged:
            row["status"] = Status.ERROR
        if said not in row["reason"]:
            guess = ": damaged, overwritten or not fully copied?" if damaged else ""
            row["reason"] = f"{row['reason']}; {said}{guess}"


def _score_here(todo: list[tuple[Found, FileIdentity]], settings: ScoreSettings, phi: PhiFilter,
                qc: QualityControl, scorer: BatchScorer) -> Iterator[ScoredBatch]:
    """On this machine: decode in worker processes, and judge and score in batches of
    `settings.batch_size` images (or of 4x as many files that cannot be scored)."""
    pending: list[tuple[FileIdentity, ImageRecord, np.ndarray | None]] = []
    results = iter_ingested([found for found, _ in todo], settings.policy, settings.workers,
                            in_flight=2 * settings.batch_size)
    images = 0
    for (_, identity), (record, image) in zip(todo, results, strict=True):
        prepare_record(record, phi, scorer.provenance["run_id"])
        pending.append((identity, record, image))
        images += image is not None
        if images >= settings.batch_size or len(pending) >= 4 * settings.batch_size:
            yield _judged(pending, qc, scorer)
            pending, images = [], 0
    if pending:
        yield _judged(pending, qc, scorer)


def _judged(pending: list[tuple[FileIdentity, ImageRecord, np.ndarray | None]], qc: QualityControl,
            scorer: BatchScorer) -> ScoredBatch:
    rows, pictures = judge_and_score([(record, image) for _, record, image in pending], qc, scorer)
    return [identity for identity, _, _ in pending], rows, pictures


class _ProgressLog:
    """Where no progress bar is drawn (cron, a log file), a log line every minute or every 1,000
    files, so that a long run shows it is alive and how far it got."""

    def __init__(self, total: int, quiet: bool, every_s: float = 60.0, every_files: int = 1000):
        self.total, self.quiet, self.every_s, self.every_files = total, quiet, every_s, every_files
        self.done, self._last_time, self._last_done = 0, time.monotonic(), 0

    def tick(self, files: int = 1) -> None:
        self.done += files
        if self.quiet:
            return
        moment = time.monotonic()
        if moment - self._last_time >= self.every_s or self.done - self._last_done >= self.every_files:
            log.info("read %d of %d files (%.1f files/s)", self.done, self.total,
                     (self.done - self._last_done) / max(moment - self._last_time, 1e-9))
            self._last_time, self._last_done = moment, self.done


def _pictures_key(pictures: str, dicom: bool) -> str:
    """Which films get a picture, and the pictures' layout (a rerun after a layout change redraws them:
    the worklist page finds a picture's main panel from the layout)."""
    return pictures + ("+dicom" if dicom else "") + (f"/layout {PICTURE_VERSION}" if pictures != "none" or dicom
                                                     else "")


def _listed(values: tuple[str, ...] | None) -> str:
    return "all" if values is None else ",".join(values)


