"""`radscan score --scheduler`: reading, judging and scoring on a Dask cluster.

The driver (the `radscan score` process) lists the files, looks them up in the state store and
submits the files to read in batches of `--batch-size` as Dask tasks, a bounded window of them at
a time. Each worker loads and verifies the model once (a worker plugin), reads its batch by path
from storage that every worker mounts at the same place, applies the PHI mode, quality control and
the model with the same functions as a single-machine run (radscan.score.judge_and_score), draws
the explanation pictures, and sends back only rows and encoded PNGs. The driver stays the single
writer of the pictures, the state store, the CSVs and the page, so everything a single-machine run
promises still holds: the lock, incremental reruns, atomic outputs, a killed driver losing at
most the batches in flight.

A worker that dies (a decoder that crashes its process, a machine lost) costs nothing: Dask gives
its tasks to another worker; a batch whose workers keep dying is split and each of its files
retried alone, and the one that still kills its worker gets an error row, as on one machine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radscan.errors import ModelError, NoInputError, SettingError, UnavailableError
from radscan.ingest import Found, folder_study_key, ingest_file
from radscan.preprocess import PREPROCESS_VERSION
from radscan.records import ImageRecord

try:  # an optional extra: radscan[dask]
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - Cluster() says what to install
    WorkerPlugin = object

if TYPE_CHECKING:
    from radscan.score import PhiFilter, ScoredBatch, ScoreSettings
    from radscan.state import FileIdentity

__all__ = ["Cluster", "parse_scheduler", "PLUGIN_NAME"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "radscan-model"
_CONNECT_TIMEOUT_S = 30


def parse_scheduler(text: str) -> tuple[str, int]:
    """("address", 0) for a running scheduler (tcp://HOST:8786, tls://...), or ("local", N) for a
    LocalCluster of N worker processes started for this run. SettingError (exit 2) otherwise."""
    text = text.strip()
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if count.isdigit() and 1 <= int(count) <= 1024:
            return "local", int(count)
        raise SettingError(f"--scheduler local:N needs a number of worker processes from 1 to 1024, not {count!r}")
    if "://" in text and text.split("://", 1)[1]:
        return text, 0
    raise SettingError(f"--scheduler must be a scheduler address (tcp://HOST:8786) or local:N, not {text!r}")


@dataclass(frozen=True)
class _BatchJob:
    """What every batch task needs besides its files (sent with each task; small)."""

    policy: Any  # radscan.policy.Policy
    phi: PhiFilter
    metadata: dict[str, Any]
    residuals: Path | None
    link_base: Path
    run_id: str
    pictures: str
    dicom_pictures: bool
    resolved_roots: dict[str, str]
    read_timeout: float


class _ModelPlugin(WorkerPlugin):
    """Loaded once in each worker process (registered with the client: also on workers that join
    or are restarted later): the verified model and quality control of the run. An error is kept
    and raised by the tasks, so that the driver reports it (a wrong model: exit 65)."""

    name = PLUGIN_NAME

    def __init__(self, model_dir: str, sha256: str, device: str, qc_mode: str, views: tuple[str, ...] | None,
                 torch_threads: int):
        self.model_dir, self.sha256, self.device = model_dir, sha256, device
        self.qc_mode, self.views, self.torch_threads = qc_mode, views, torch_threads
        self.model: Any = None
        self.qc: Any = None
        self.error: BaseException | None = None

    def setup(self, worker: Any = None) -> None:
        import torch

        from radscan.model.io import load_model
        from radscan.model.metadata import read_metadata
        from radscan.model.runtime import resolve_device
        from radscan.qc import quality_control

        try:
            # as many torch threads as the worker runs tasks (one per core: --nthreads 1 --nworkers N)
            torch.set_num_threads(self.torch_threads or max(1, int(getattr(worker, "nthreads", 1) or 1)))
            directory = Path(self.model_dir)
            if not directory.is_dir():
                raise ModelError(f"a worker cannot see the model {directory}: it must be on storage every worker "
                                 "mounts at the same path")
            metadata = read_metadata(directory)
            if metadata["weights"]["sha256"] != self.sha256:
                raise ModelError(f"the model at {directory} on a worker is not the driver's (sha256 "
                                 f"{metadata['weights']['sha256'][:12]}... instead of {self.sha256[:12]}...)")
            self.model = load_model(directory, resolve_device(self.device))[0]
            self.qc = quality_control(directory, metadata, self.qc_mode, self.views)
        except BaseException as exc:  # noqa: BLE001 - kept for the tasks to raise on the driver
            self.error = exc

    def teardown(self, worker: Any = None) -> None:
        self.model = self.qc = None


def _score_batch(files: list[tuple[str, str, str]], job: _BatchJob) -> tuple[list[dict[str, Any]],
                                                                              list[tuple[Path, bytes | None]]]:
    """On a worker: read (resolved root, given root, path) files, judge and score them; rows in
    order and the pictures as PNG bytes (None: remove the stale one)."""
    from distributed import get_worker

    from radscan.score import PictureJob, _Scorer, judge_and_score, prepare_record

    plugin = get_worker().plugins[PLUGIN_NAME]
    if plugin.error is not None:
        raise plugin.error
    items = []
    for resolved, given, path in files:
        record, image = _read(Found(resolved, path), job.policy, job.read_timeout)
        record.root = given  # rows name the root as it was given, as on one machine
        prepare_record(record, job.phi, job.run_id)
        items.append((record, image))
    loaded: Future = Future()
    loaded.set_result(plugin.model)
    scorer = _Scorer(loaded, job.metadata, job.residuals, job.link_base, job.run_id, job.pictures,
                     dicom_pictures=job.dicom_pictures, resolved_roots=job.resolved_roots)
    rows, pictures = judge_and_score(items, plugin.qc, scorer)
    return rows, [(path, picture.png() if isinstance(picture, PictureJob) else picture)
                  for path, picture in pictures]


def _read(found: Found, policy: Any, timeout: float) -> tuple[ImageRecord, Any]:
    """`ingest_file` in a thread that may take `timeout` seconds: a decoder that hangs costs its
    file an error row (the thread stays busy until it returns or the worker stops)."""
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(ingest_file(found, policy)), daemon=True,
                              name="radscan-read")
    reader.start()
    reader.join(timeout)
    if result:
        return result[0]
    log.warning("reading %s took longer than %g s; its thread is left behind", found.path, timeout)
    return _failed(found, f"reading took longer than {timeout:g} s (a hung or pathologically slow decoder)"), None


def _failed(found: Found, reason: str) -> ImageRecord:
    record = ImageRecord(path=found.path, root=found.root, kind="other", preprocess_version=PREPROCESS_VERSION,
                         study_key=folder_study_key(found))
    return record.fail(reason)


def _visible(roots: list[str], model_dir: str) -> list[str]:
    """On a worker: the input roots and model it cannot see."""
    return [path for path in [*roots, model_dir] if not os.path.isdir(path)]


class Cluster:
    """A connection to a Dask scheduler (or a LocalCluster started for the run), ready to score."""

    def __init__(self, scheduler: str, settings: ScoreSettings, model_dir: Path, metadata: dict[str, Any],
                 roots: list[str]):
        address, local_workers = parse_scheduler(scheduler)
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError:
            raise SettingError("--scheduler needs Dask: pip install 'radscan[dask]'") from None
        self.settings, self._local = settings, None
        try:
            if local_workers:
                # a file that kills its worker is given up after one death (Dask's default: three),
                # then retried alone (see score)
                dask.config.set({"distributed.scheduler.allowed-failures": 1})
                self._local = LocalCluster(n_workers=local_workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR)
                address = self._local.scheduler_address
            self.client = Client(address, timeout=_CONNECT_TIMEOUT_S, set_as_default=False)
            self.client.wait_for_workers(1, timeout=_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise UnavailableError(f"cannot use the Dask scheduler {scheduler}: {exc or type(exc).__name__} (is it "
                                   "running, with workers, and reachable from here?)") from None
        self.workers = len(self.client.scheduler_info()["workers"])
        self._check_visibility(roots, model_dir)
        cores = os.cpu_count() or 1
        self.client.register_plugin(_ModelPlugin(
            str(model_dir.resolve()), metadata["weights"]["sha256"], settings.device, settings.qc, settings.views,
            torch_threads=max(1, cores // local_workers) if local_workers else 0))
        self.job: _BatchJob | None = None
        log.info("Dask scheduler %s: %d workers", address, self.workers)

    def _check_visibility(self, roots: list[str], model_dir: Path) -> None:
        """Refuse (exit 66, or 65 for the model) a run whose inputs some worker cannot see."""
        unseen = self.client.run(_visible, roots, str(model_dir.resolve()))
        for worker, missing in sorted(unseen.items()):
            if str(model_dir.resolve()) in missing:
                raise ModelError(f"Dask worker {worker} cannot see the model {model_dir}: it must be on storage "
                                 "every worker mounts at the same path")
            if missing:
                raise NoInputError(f"Dask worker {worker} cannot see {', '.join(missing)}: the inputs must be on "
                                   "storage every worker mounts at the same path as the driver")

    def prepare(self, phi: PhiFilter, metadata: dict[str, Any], residuals: Path | None, link_base: Path, run_id: str,
                pictures: str, dicom_pictures: bool, resolved_roots: dict[str, str]) -> None:
        provenance = {"name": metadata.get("name", ""), "version": metadata.get("version", ""),
                      "weights": {"sha256": metadata["weights"]["sha256"]}}  # what the scorer reads: small
        self.job = _BatchJob(self.settings.policy, phi, provenance, residuals, link_base, run_id, pictures,
                             dicom_pictures, resolved_roots, self.settings.policy.read_timeout)

    def score(self, todo: list[tuple[Found, FileIdentity]]) -> Iterator[ScoredBatch]:
        """Batches of `todo` scored on the workers, as they complete (any order), with a window of
        2 batches per worker in flight: the driver's memory does not grow with the run."""
        from distributed import KilledWorker, as_completed

        from radscan.score import prepare_record

        size = self.settings.batch_size
        batches = (todo[start:start + size] for start in range(0, len(todo), size))
        waiting: dict[Any, list[tuple[Found, FileIdentity]]] = {}

        def submit(batch: list[tuple[Found, FileIdentity]]) -> Any:
            files = [(self.job.resolved_roots[found.root], found.root, found.path) for found, _ in batch]
            future = self.client.submit(_score_batch, files, self.job, pure=False)
            waiting[future] = batch
            return future

        running = as_completed([submit(batch) for batch in islice(batches, 2 * max(self.workers, 1))],
                               loop=self.client.loop)
        for future in running:
            batch = waiting.pop(future)
            try:
                rows, pictures = future.result()
            except KilledWorker:
                future.release()
                if len(batch) > 1:  # find the file that kills its worker: each alone
                    log.warning("a Dask worker died on a batch of %d files; retrying them one by one", len(batch))
                    for item in batch:
                        running.add(submit([item]))
                    continue
                found = batch[0][0]
                log.warning("the worker reading %s died", found.path)
                record = _failed(found, "the decoder crashed on this file (its worker process died)")
                prepare_record(record, self.job.phi, self.job.run_id)
                rows, pictures = [record.as_row()], []
            future.release()
            yield [identity for _, identity in batch], rows, pictures
            following = next(batches, None)
            if following:
                running.add(submit(following))

    def close(self) -> None:
        for part in (getattr(self, "client", None), self._local):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # noqa: BLE001 - closing must not hide the run's own outcome
                    log.debug("closing Dask: %s", exc)
