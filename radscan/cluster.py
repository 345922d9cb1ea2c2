"""`radscan score --scheduler`: reading, judging and scoring on a Dask cluster.

The driver (the `radscan score` process) lists the files, looks them up in the state store and
submits the files to read in batches of `--batch-size` as Dask tasks, a bounded window of them at
a time. Each worker loads and verifies the model once (a worker plugin), reads its batch by path
from storage that every worker mounts at the same place, applies the PHI mode, quality control and
the model with the same functions as a single-machine run (radscan.batch.judge_and_score), draws
the explanation pictures, and sends back only rows and encoded PNGs. The driver stays the single
writer of the pictures, the state store, the CSVs and the page, so everything a single-machine run
promises still holds: the lock, incremental reruns, atomic outputs, a killed driver losing at
most the batches in flight.

A worker that dies (a decoder that crashes its process, a machine lost) costs nothing: Dask gives
its tasks to another worker; a batch whose workers keep dying is split and each of its files
retried alone, and the one that still kills its worker with nothing else in flight gets an error
row, as on one machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radscan.errors import ModelError, NoInputError, SettingError, UnavailableError
from radscan.ingest import CANNOT_READ, CRASHED, Found, failed_record, hung_reason, ingest_file
from radscan.preprocess import PREPROCESS_VERSION
from radscan.records import ImageRecord, one_line

try:  # an optional extra: radscan[dask]
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - Cluster() says what to install
    WorkerPlugin = object

if TYPE_CHECKING:
    from radscan.batch import RunContext, ScoredBatch, ScoreSettings
    from radscan.state import FileIdentity

__all__ = ["Cluster", "parse_scheduler"]

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 30
# the protocols a remote scheduler speaks (inproc is for Dask's own tests), HOST:PORT, IPv6 in brackets
_ADDRESS = re.compile(r"(tcp|tls|ucx|ws|wss)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


def parse_scheduler(text: str) -> tuple[str, int]:
    """("address", 0) for a running scheduler (tcp://HOST:8786, tls://...), or ("local", N) for a
    LocalCluster of N worker processes started for this run. SettingError (exit 2) otherwise."""
    text = text.strip()
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if re.fullmatch(r"[0-9]{1,4}", count) and 1 <= int(count) <= 1024:
            return "local", int(count)
        raise SettingError(f"--scheduler local:N needs a number of worker processes from 1 to 1024, not {count!r}")
    match = _ADDRESS.fullmatch(text)
    if match and 0 < int(match.group(3)) < 65536:
        return text, 0
    raise SettingError(f"--scheduler must be a scheduler address (tcp://HOST:8786, tls://HOST:8786) or local:N, not "
                       f"{text!r}")


@dataclass(frozen=True)
class _BatchJob:
    """What every batch task needs besides its files (sent with each task; small)."""

    policy: Any  # radscan.policy.Policy
    run: RunContext
    read_timeout: float
    plugin: str  # the name of this run's model plugin on the workers


class _ModelPlugin(WorkerPlugin):
    """Loaded once in each worker process (registered with the client: also on workers that join
    or are restarted later): the verified model and quality control of the run. An error is kept
    and raised by the tasks, so that the driver reports it (a wrong model: exit 65)."""

    def __init__(self, name: str, model_dir: str, sha256: str, device: str, qc_mode: str,
                 views: tuple[str, ...] | None, torch_threads: int, versions: tuple[str, str]):
        self.name = name  # one per run: two runs on one scheduler never share a model or QC settings
        self.model_dir, self.sha256, self.device, self.versions = model_dir, sha256, device, versions
        self.qc_mode, self.views, self.torch_threads = qc_mode, views, torch_threads
        self.model: Any = None
        self.qc: Any = None
        self.error: BaseException | None = None

    def setup(self, worker: Any = None) -> None:
        from radscan.model.engine import load_engine
        from radscan.model.metadata import is_exported, read_metadata
        from radscan.qc import quality_control

        where = f"Dask worker {getattr(worker, 'address', '?')}"
        try:
            if _versions() != self.versions:
                raise UnavailableError(f"{where} runs radscan {_versions()[0]} (preprocessing {_versions()[1]}), the "
                                       f"driver {self.versions[0]} ({self.versions[1]}): install the same radscan on "
                                       "every worker")
            # as many threads as the worker runs tasks (one per core: --nthreads 1 --nworkers N)
            threads = self.torch_threads or max(1, int(getattr(worker, "nthreads", 1) or 1))
            directory = Path(self.model_dir)
            if not directory.is_dir():
                raise ModelError(f"{where} cannot see the model {directory}: it must be on storage every worker "
                                 "mounts at the same path")
            metadata = read_metadata(directory)
            if metadata["weights"]["sha256"] != self.sha256:
                raise ModelError(f"the model at {directory} on {where} is not the driver's (sha256 "
                                 f"{metadata['weights']['sha256'][:12]}... instead of {self.sha256[:12]}...)")
            if not is_exported(metadata):  # an exported model's ONNX Runtime takes its threads when it loads
                import torch

                torch.set_num_threads(threads)
            self.model = load_engine(directory, self.device, threads)[0]
            self.qc = quality_control(directory, metadata, self.qc_mode, self.views)
        except ModelError as exc:
            self.error = ModelError(exc.message if exc.message.startswith(where) else f"{where}: {exc.message}")
        except BaseException as exc:  # noqa: BLE001 - kept for the tasks to raise on the driver
            self.error = exc

    def teardown(self, worker: Any = None) -> None:
        self.model = self.qc = None


# How far a worker's modification time of a file may be from the driver's: file systems shared over
# the network keep times to 100 ns (SMB) or whole seconds (some NFS servers, FAT); a stale copy differs
# by more, or in size.
MTIME_SLACK_NS = 2_000_000_000


def _score_batch(files: list[tuple[str, str, str, str, int, int]], job: _BatchJob
                 ) -> tuple[list[dict[str, Any]], list[tuple[Path, bytes | None]]]:
    """On a worker: read (resolved root, given root, path, study key, size, mtime_ns as the driver
    listed it) files, judge and score them; rows in order and the pictures as PNG bytes (None:
    remove the stale one). A file the worker sees with another size or time is an error row."""
    from distributed import get_worker

    from radscan.batch import BatchScorer, judge_and_score, prepare_record

    plugin = get_worker().plugins[job.plugin]
    if plugin.error is not None:
        raise plugin.error
    items = []
    for resolved, given, path, study_key, size, mtime_ns in files:
        found = Found(resolved, path, study_key=study_key)
        other = _seen_otherwise(found, size, mtime_ns)
        if other:
            record, image = failed_record(found, f"on Dask worker {get_worker().address} {other}: a worker that sees "
                                                 "another copy at this path (a stale or different mount?), or a file "
                                                 "changed while it was read; the next run reads it again"), None
        else:
            record, image = _read(found, job.policy, job.read_timeout)
        record.root = given  # rows name the root as it was given, as on one machine
        if record.reason.startswith(CANNOT_READ):
            record.reason += f" (on Dask worker {get_worker().address}: are the inputs mounted there?)"
        prepare_record(record, job.run.phi, job.run.run_id)
        items.append((record, image))
    loaded: Future = Future()
    loaded.set_result(plugin.model)
    scorer = BatchScorer(loaded, job.run)
    rows, pictures = judge_and_score(items, plugin.qc, scorer)
    return rows, [(path, picture if picture is None or isinstance(picture, bytes) else picture.png())
                  for path, picture in pictures]


def _seen_otherwise(found: Found, size: int, mtime_ns: int) -> str:
    """How the file at `found` differs on this worker from the driver's listing ((size, mtime_ns); -1:
    the driver could not stat it), in words, or "" (also when this worker cannot stat it: reading it
    says why). A worker reading other content under the same path scored the wrong film with exit 0,
    and the stored row stayed, the driver's file being unchanged (a trial)."""
    if size < 0:
        return ""
    try:
        status = found.full_path.stat()
    except OSError:
        return ""
    if status.st_size != size:
        return f"the file has {status.st_size:,} bytes where the run listed {size:,}"
    if abs(status.st_mtime_ns - mtime_ns) > MTIME_SLACK_NS:
        return "the file has another modification time than the run listed"
    return ""


def _read(found: Found, policy: Any, timeout: float) -> tuple[ImageRecord, Any]:
    """`ingest_file` in a thread that may take `timeout` seconds: a decoder that hangs costs its
    file an error row (the thread stays busy until it returns or the worker stops)."""
    try:
        return _in_time(timeout, ingest_file, found, policy)
    except TimeoutError:
        log.warning("reading %s took longer than %g s; its thread is left behind", found.path, timeout)
        return failed_record(found, hung_reason(timeout)), None


def _in_time(seconds: float, function: Any, *args: Any) -> Any:
    """`function(*args)` in a daemon thread: its result, or its exception raised here, or
    TimeoutError when it has not returned within `seconds` (the thread is then left behind)."""
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            outcome.append((True, function(*args)))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=call, daemon=True, name="radscan-in-time")
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds:g} s")
    returned, value = outcome[0]
    if not returned:
        raise value
    return value


def _visible(paths: list[str]) -> list[str]:
    """On a worker: the paths it cannot see."""
    return [path for path in paths if not os.path.exists(path)]


def _versions() -> tuple[str, str]:
    from radscan import __version__

    return __version__, PREPROCESS_VERSION


class Cluster:
    """A connection to a Dask scheduler (or a LocalCluster started for the run), ready to score."""

    def __init__(self, scheduler: str, settings: ScoreSettings, model_dir: Path, metadata: dict[str, Any],
                 roots: list[str], samples: list[str] = ()):
        address, local_workers = parse_scheduler(scheduler)
        try:
            import dask
            from distributed import LocalCluster
        except ImportError:
            raise SettingError("--scheduler needs Dask: pip install 'radscan[dask]'") from None
        self.settings, self._local, self.client, self.plugin = settings, None, None, ""
        _quiet_dask()
        try:
            if local_workers:
                # a file that kills its worker is given up after one death (Dask's default: three),
                # then retried alone (see score)
                dask.config.set({"distributed.scheduler.allowed-failures": 1})
                self._local = LocalCluster(n_workers=local_workers, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL)
                address = self._local.scheduler_address
            self.client = _connect(address, scheduler)
            self.workers = len(self.client.scheduler_info()["workers"])
            self._check_workers(roots, model_dir, samples)
            cores = os.cpu_count() or 1
            self.plugin = f"radscan-{uuid.uuid4().hex[:12]}"
            self.client.register_plugin(_ModelPlugin(
                self.plugin, str(model_dir.resolve()), metadata["weights"]["sha256"], settings.device, settings.qc,
                settings.views, torch_threads=max(1, cores // local_workers) if local_workers else 0,
                versions=_versions()))
        except BaseException:
            self.close()
            raise
        self.job: _BatchJob | None = None
        log.info("Dask scheduler %s: %d workers", address, self.workers)

    def _check_workers(self, roots: list[str], model_dir: Path, samples: list[str]) -> None:
        """Refuse a run with a worker of another radscan (exit 69), or that cannot see the inputs
        (exit 66: the roots and a file of each) or the model (65)."""
        for worker, versions in sorted(self._run(_versions).items()):
            if tuple(versions) != _versions():
                raise UnavailableError(f"Dask worker {worker} runs radscan {versions[0]} (preprocessing "
                                       f"{versions[1]}), this driver {_versions()[0]} ({_versions()[1]}): install the "
                                       "same radscan on every worker")
        unseen = self._run(_visible, [*roots, *samples, str(model_dir.resolve())])
        for worker, missing in sorted(unseen.items()):
            if str(model_dir.resolve()) in missing:
                raise ModelError(f"Dask worker {worker} cannot see the model {model_dir}: it must be on storage "
                                 "every worker mounts at the same path")
            if missing:
                raise NoInputError(f"Dask worker {worker} cannot see {', '.join(missing)}: the inputs must be on "
                                   "storage every worker mounts at the same path as the driver")

    def _run(self, function: Any, *args: Any) -> dict[str, Any]:
        """`function` on every worker, or UnavailableError when one does not answer in time (a
        frozen worker would otherwise hold the run before it starts)."""
        try:
            return _in_time(2 * _CONNECT_TIMEOUT_S, self.client.run, function, *args)
        except TimeoutError:
            raise UnavailableError(f"a Dask worker did not answer within {2 * _CONNECT_TIMEOUT_S} s (a frozen or "
                                   "overloaded worker?): restart it, or run without it") from None
        except Exception as exc:  # noqa: BLE001 - whatever Dask raises, the run cannot use these workers
            raise UnavailableError(f"the Dask workers could not be asked: {one_line(exc)}") from None

    def prepare(self, run: RunContext) -> None:
        self.job = _BatchJob(self.settings.policy, run, self.settings.policy.read_timeout, self.plugin)

    def score(self, todo: list[tuple[Found, FileIdentity]]) -> Iterator[ScoredBatch]:
        """Batches of `todo` scored on the workers, as they complete (any order), with a window of
        2 batches per worker in flight (workers that join during the run count too): the driver's
        memory does not grow with the run."""
        from distributed import as_completed

        size = self.settings.batch_size
        batches = (todo[start:start + size] for start in range(0, len(todo), size))
        waiting: dict[Any, list[tuple[Found, FileIdentity]]] = {}

        def submit(batch: list[tuple[Found, FileIdentity]]) -> Any:
            files = [(self.job.run.resolved_roots[found.root], found.root, found.path, found.study_key,
                      identity.size, identity.mtime_ns) for found, identity in batch]
            future = self.client.submit(_score_batch, files, self.job, pure=False)
            waiting[future] = batch
            return future

        running = as_completed([submit(batch) for batch in islice(batches, 2 * max(self.workers, 1))],
                               loop=self.client.loop)
        suspects: list[tuple[Found, FileIdentity]] = []
        for future in self._completed(running):
            batch = waiting.pop(future)
            scored = self._collect(future, batch)
            if scored is None and len(batch) > 1:  # find the file that kills its worker: each alone
                log.warning("a Dask worker died on a batch of %d files; retrying them one by one", len(batch))
                for item in batch:
                    running.add(submit([item]))
                continue
            if scored is None:
                suspects.append(batch[0])
                continue
            yield scored
            # two batches per worker, counting workers that joined since (a cluster that scales up)
            for following in islice(batches, max(1, 2 * self._worker_count() - len(waiting))):
                running.add(submit(following))
        # A dying worker takes the tasks queued on it along (Dask counts the death against each of
        # them), so a file retried beside the one that kills workers can reach Dask's limit of
        # deaths too. Each suspect is judged again with nothing else in flight: only a file that
        # still kills its worker alone gets the error row.
        for item in suspects:
            alone = submit([item])
            for future in self._completed(as_completed([alone], loop=self.client.loop)):
                waiting.pop(future)
                yield self._collect(future, [item]) or self._crashed(item)

    def _collect(self, future: Any, batch: list[tuple[Found, FileIdentity]]) -> ScoredBatch | None:
        """The scored `batch` of a completed `future`, or None when its workers kept dying (Dask's
        KilledWorker); UnavailableError when the scheduler was lost."""
        from concurrent.futures import CancelledError

        from distributed import KilledWorker
        from distributed.comm.core import CommClosedError

        try:
            rows, pictures = future.result()
        except (CancelledError, CommClosedError, OSError) as exc:
            raise UnavailableError(f"lost the Dask scheduler during the run ({type(exc).__name__}): what was "
                                   "scored is kept; rerun to finish") from None
        except KilledWorker:
            return None
        finally:
            future.release()
        return [identity for _, identity in batch], rows, pictures

    def _crashed(self, item: tuple[Found, FileIdentity]) -> ScoredBatch:
        """The error row of a file that kills the worker reading it, every time and alone."""
        from radscan.batch import prepare_record

        found, identity = item
        log.warning("the worker reading %s died", found.path)
        record = failed_record(found, CRASHED)
        prepare_record(record, self.job.run.phi, self.job.run.run_id)
        return [identity], [record.as_row()], []

    def _completed(self, running: Any) -> Iterator[Any]:
        """The futures of `running` as they complete; UnavailableError when the cluster has had no
        worker for _CONNECT_TIMEOUT_S (every worker died and none came back: waiting would be forever)."""
        alone_since = None
        while not running.is_empty():
            if running.has_ready():
                yield from running.next_batch(block=False)
                alone_since = None
                continue
            if self._live_workers():
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > _CONNECT_TIMEOUT_S:
                raise UnavailableError(f"no Dask worker left for {_CONNECT_TIMEOUT_S} s: what was scored is kept; "
                                       "start workers and rerun to finish")
            time.sleep(0.05)

    def _live_workers(self) -> int:
        try:
            return len(self.client.scheduler_info()["workers"])
        except (KeyError, OSError):
            return 0

    def _worker_count(self) -> int:
        try:
            return max(1, len(self.client.scheduler_info()["workers"]))
        except (KeyError, OSError):
            return max(1, self.workers)

    def close(self) -> None:
        if getattr(self, "plugin", "") and getattr(self, "client", None) is not None:
            try:  # workers that join later must not load this run's model
                self.client.unregister_worker_plugin(self.plugin)
            except Exception as exc:  # noqa: BLE001 - a lost scheduler forgets it anyway
                log.debug("unregistering the model plugin: %s", exc)
        for part in (getattr(self, "client", None), getattr(self, "_local", None)):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # noqa: BLE001 - closing must not hide the run's own outcome
                    log.debug("closing Dask: %s", exc)


def _connect(address: str, scheduler: str) -> Any:
    """A client of the scheduler at `address` with at least one worker, or UnavailableError (exit
    69) within about twice _CONNECT_TIMEOUT_S: a port that accepts connections but does not speak
    Dask can otherwise hang the handshake, or answer garbage."""
    from distributed import Client

    _probe(address, scheduler)  # a port that answers garbage fails here, before a Client exists

    def client_with_a_worker() -> Any:
        client = Client(address, timeout=_CONNECT_TIMEOUT_S, set_as_default=False)
        try:
            client.wait_for_workers(1, timeout=_CONNECT_TIMEOUT_S)
        except BaseException:
            client.close()
            raise
        return client

    try:
        return _in_time(2 * _CONNECT_TIMEOUT_S + 5, client_with_a_worker)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, no worker: the scheduler's failure
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UnavailableError(f"cannot use the Dask scheduler {scheduler}: {why} (is it running, with workers, and "
                               "reachable from here?)") from None


def _quiet_dask() -> None:
    """Dask's own log lines and warnings are for Dask's developers: radscan says what matters (a
    worker that died, a file given up) in its own log. -vv shows them."""
    if not log.isEnabledFor(logging.DEBUG):
        import distributed  # noqa: F401 - its import sets levels of its own loggers, overridden here

        for name in [*logging.root.manager.loggerDict, "distributed", "tornado"]:
            if name.split(".")[0] in ("distributed", "tornado"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*Port .* is already in use.*")


def _probe(address: str, scheduler: str) -> None:
    """Open and close one Dask connection (with its handshake) to `address`, or UnavailableError."""
    from distributed.comm import connect

    async def handshake() -> None:
        comm = await connect(address, timeout=_CONNECT_TIMEOUT_S)
        await comm.close()

    try:
        asyncio.run(asyncio.wait_for(handshake(), _CONNECT_TIMEOUT_S + 5))
    except Exception as exc:  # noqa: BLE001 - refused, timed out, or an answer that is not Dask's
        why = "no answer in time" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else (
            "it did not answer as a Dask scheduler" if isinstance(exc, (MemoryError, ValueError, TypeError))
            else one_line(exc))
        raise UnavailableError(f"cannot use the Dask scheduler {scheduler}: {why} (is it running, with workers, and "
                               "reachable from here?)") from None
