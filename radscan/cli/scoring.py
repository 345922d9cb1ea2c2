"""`radscan scan` and `radscan score`: the inventory of a folder, and the triage worklist."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radscan.cli.common import (
    EXIT_CODES_HELP,
    INPUT_PATH,
    FiniteFloatRange,
    device_option,
    echo_json,
    failure,
    json_option,
    model_option,
    qc_option,
    selection_options,
    study_key_option,
    views_option,
    workers_option,
)
from radscan.errors import ExitCode
from radscan.logs import one_line_text
from radscan.policy import Policy, parse_list
from radscan.qc import quality_control
from radscan.records import counted
from radscan.stopping import outcome_said


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("paths", nargs=-1, required=True, type=INPUT_PATH)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Inventory CSV to write (replaced atomically).")
@click.option("--previews", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the exact 128x128 model inputs as 8-bit PNGs.")
@model_option
@study_key_option
@qc_option
@views_option
@selection_options
@workers_option
@json_option
@click.pass_context
def scan(ctx: click.Context, paths: tuple[str, ...], out: Path, previews: Path | None, model: Path | None,
         study_key: str, qc_mode: str, views: str, policy: Policy, workers: int, as_json: bool) -> None:
    """Inventory PATHS: one CSV row per file with its kind, status, reason, study keys and QC fields.

    Files are recognised by content (any name, no extension needed). Usable images get the quality
    control verdict `radscan score` would give them with --model (status rejected, qc_status,
    qc_reason). With --previews, the exact images the model would see are written as PNGs, to check
    orientation, inversion and windowing.

    \b
    Example:
      radscan scan /data/incoming --out inventory.csv --previews previews/
      radscan scan /data/incoming --out inventory.csv --qc off --modalities all
    """
    from radscan.model.engine import verify_files
    from radscan.model.metadata import read_metadata
    from radscan.policy import for_model
    from radscan.scan import scan as run_scan
    from radscan.score import default_model_dir

    qc = None
    if model is not None or qc_mode != "off":  # read films as that model does: a thorax-box model's box
        model_dir = model or default_model_dir()
        metadata = read_metadata(model_dir)
        verify_files(model_dir, metadata)
        policy = for_model(policy, metadata, Path(model_dir))
        qc = quality_control(model_dir, metadata, qc_mode, parse_list(views)) if qc_mode != "off" else None
    summary = run_scan(paths, out, previews, policy, workers, progress=not ctx.obj["quiet"], qc=qc,
                       study_key=study_key)
    if as_json:
        echo_json(summary.as_dict(), ExitCode.PARTIAL if summary.counts["error"] else ExitCode.OK)
    elif not ctx.obj["quiet"]:
        counts = summary.counts
        click.echo(
            f"{counted(summary.files, 'file')}: {counts['ok']} ok, {counts['rejected']} rejected by QC, "
            f"{counts['skipped']} skipped, {counts['error']} error -> {one_line_text(str(summary.inventory))}",
            err=True,
        )
    if summary.counts["error"]:
        ctx.exit(ExitCode.PARTIAL)


def run_options(command: Callable) -> Callable:
    """The options of a scoring run (outputs, model, pictures, PHI, DICOM results, metrics, QC,
    selection): shared by `score` and `listen`, which run the same job."""
    for option in reversed(_RUN_OPTIONS):
        command = option(command)
    return command


_RUN_OPTIONS = [
    click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
                 help="Image-level worklist CSV (replaced atomically). The study CSV, explanation PNGs, state "
                      "store and lock go beside it."),
    model_option,
    click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True),
    device_option,
    click.option("--residuals", type=click.Path(file_okay=False, path_type=Path),
                 help="Folder for the explanation PNGs (the film beside the map of where it raises the score; "
                      "a model scored by its reconstruction, seed or residual, adds the difference) "
                      "[default: <out>_residuals/]."),
    click.option("--no-residuals", is_flag=True, help="Do not write explanation PNGs (faster: no gradient pass)."),
    click.option("--pictures", type=click.Choice(["all", "flagged"]), default="flagged", show_default=True,
                 help="Which scored images get an explanation picture: only the flagged ones (the rest are scored "
                      "without the generator and gradient passes: about 2x faster), or all. --no-residuals: none."),
    click.option("--no-html", is_flag=True,
                 help="Do not write the web page of the worklist (<out>.html: opens from a file share, no server)."),
    click.option("--studies", type=click.Path(dir_okay=False, path_type=Path),
                 help="Study-level worklist CSV [default: <out>_studies.csv]."),
    study_key_option,
    click.option("--phi", type=click.Choice(["keep", "hash", "drop"]), default="keep", show_default=True,
                 help="PatientID and AccessionNumber in the outputs: as they are, a keyed HMAC, or removed."),
    click.option("--phi-key", envvar="RADSCAN_PHI_KEY",
                 help="HMAC key for --phi hash, at least 16 characters (or RADSCAN_PHI_KEY)."),
    click.option("--phi-key-file", type=click.Path(dir_okay=False, path_type=Path),
                 default=Path("~/.config/radscan/phi.key").expanduser(), show_default="~/.config/radscan/phi.key",
                 help="Where the HMAC key is kept when no --phi-key is given (created on first use, mode 0600)."),
    click.option("--dicom-out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                 help="Write DICOM results for the PACS into DIR: per scored DICOM image a Structured Report (score, "
                      "threshold, flag, model) and a Secondary Capture of its explanation picture, in the source "
                      "study, marked not for diagnostic use. Needs radscan[pacs] and --phi keep."),
    click.option("--send", "send_to", metavar="[AE@]HOST:PORT",
                 help="Send the DICOM results the PACS has not yet accepted by C-STORE (needs --dicom-out; AE@ "
                      "names the PACS's AE title, as --called-ae does). A failed "
                      "send keeps them in DIR, says so in the rows, exits 3, and is retried by the next run."),
    click.option("--ae-title", default="RADSCAN", show_default=True,
                 help="radscan's own AE title when sending (the PACS must know it)."),
    click.option("--called-ae", default="ANY-SCP", show_default=True, help="The PACS's AE title."),
    click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                 help="Also write the run's metrics (exit code, last success, files by status, flagged share, results "
                      "not sent) to FILE in the Prometheus text format, for node_exporter's textfile collector; "
                      "written after every run, failed ones too."),
    qc_option,
    views_option,
    selection_options,
    workers_option,
    json_option,
]


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("paths", nargs=-1, required=True, type=INPUT_PATH)
@click.option("--scheduler", metavar="ADDRESS|local:N",
              help="Read and score on a Dask cluster: a scheduler address (tcp://HOST:8786) whose workers see the "
                   "inputs and the model at the same paths, or local:N to start N worker processes here. The "
                   "outputs are written here, as without it. Needs radscan[dask].")
@click.option("--forget-missing", is_flag=True,
              help="Forget the films of earlier runs that are gone from the inputs, even most of a folder's (a "
                   "deliberate clean-up). Without it such a night is exit 3 and, should the share have mounted in "
                   "part, those films are kept, off the list, until they are back.")
@run_options
@click.pass_context
def score(ctx: click.Context, paths: tuple[str, ...], out: Path, model: Path | None, batch_size: int,
          device: str, residuals: Path | None, no_residuals: bool, pictures: str, no_html: bool, studies: Path | None,
          study_key: str, phi: str, phi_key: str | None, phi_key_file: Path, dicom_out: Path | None,
          send_to: str | None, ae_title: str, called_ae: str, scheduler: str | None, forget_missing: bool,
          metrics: Path | None, qc_mode: str, views: str, policy: Policy, workers: int, as_json: bool) -> None:
    """Score every chest radiograph under PATHS and write the triage worklist.

    Writes an image-level CSV (--out, sorted by study score then score, highest first, one row per
    file including those not scored), a study-level CSV and explanation PNGs. Reruns score only new
    or changed files and rescore everything when the model changes; a second run on the same
    outputs exits at once with code 75. Research and triage support only, not diagnosis.

    \b
    Example:
      radscan score /data/incoming --out /data/worklist/report.csv
      radscan score /data/incoming --out report.csv --model models/site-2026 --phi hash --json
      radscan score /data/incoming --out report.csv --dicom-out results/ --send pacs:104 --called-ae PACS
      radscan score /archive/mimic --out report.csv --scheduler tcp://scheduler:8786
    """
    from radscan.score import score as run_score

    outputs, settings = _run_settings(ctx, paths, out, model, batch_size, device, residuals, no_residuals, pictures,
                                      no_html, studies, study_key, phi, phi_key, phi_key_file, dicom_out, send_to,
                                      ae_title, called_ae, scheduler, metrics, qc_mode, views, policy, workers)
    settings = dataclasses.replace(settings, forget_missing=forget_missing)
    summary = _score_recording_failure(run_score, paths, outputs, settings, metrics)
    outcome_said()  # the new worklist is in place: a stop from now on does not say "interrupted"
    exit_code = _report_run(ctx, summary, metrics, as_json)
    if exit_code != ExitCode.OK:
        ctx.exit(exit_code)


def _run_settings(ctx: click.Context, paths: tuple[str, ...], out: Path, model: Path | None, batch_size: int,
                  device: str, residuals: Path | None, no_residuals: bool, pictures: str, no_html: bool,
                  studies: Path | None, study_key: str, phi: str, phi_key: str | None, phi_key_file: Path,
                  dicom_out: Path | None, send_to: str | None, ae_title: str, called_ae: str, scheduler: str | None,
                  metrics: Path | None, qc_mode: str, views: str, policy: Policy, workers: int) -> tuple[Any, Any]:
    """The outputs and settings of a scoring run from its options, refused combinations refused
    before anything is created (the PHI key file included)."""
    from radscan.batch import ScoreSettings
    from radscan.pacs import Destination
    from radscan.phi import load_phi_key
    from radscan.score import check_dicom_settings
    from radscan.worklist import OutputPaths

    if residuals and no_residuals:
        raise click.UsageError("--residuals and --no-residuals exclude each other")
    if phi_key is None and "RADSCAN_PHI_KEY" in os.environ:  # Click reads a set but empty variable as unset
        phi_key = os.environ["RADSCAN_PHI_KEY"]
    if phi == "hash" and phi_key is None:  # the key must not be read as, or created among, the radiographs
        from radscan.ingest import check_outputs_apart

        check_outputs_apart(paths, [phi_key_file])
    outputs = OutputPaths.beside(out, studies, residuals, write_residuals=not no_residuals, write_html=not no_html,
                                 dicom=dicom_out)
    settings = ScoreSettings(model_dir=model, batch_size=batch_size, device=device, workers=workers, phi=phi,
                             policy=policy, progress=not ctx.obj["quiet"], qc=qc_mode,
                             views=parse_list(views), pictures=pictures,
                             send=Destination.parse(send_to, called_ae, ae_title) if send_to else None,
                             scheduler=scheduler, study_key=study_key)
    check_dicom_settings(outputs, settings)  # a refused combination must not create the PHI key file first
    if phi == "hash":
        settings = dataclasses.replace(settings, phi_key=load_phi_key(phi_key, phi_key_file))
    if metrics is not None:
        from radscan.ingest import check_outputs_apart
        from radscan.metrics import check_metrics_path
        from radscan.state import store_files

        check_outputs_apart(paths, [metrics])
        check_metrics_path(metrics, [*outputs.files, outputs.lock, *store_files(outputs.state)])
    return outputs, settings


def _report_run(ctx: click.Context, summary: Any, metrics: Path | None, as_json: bool, say: bool = True) -> int:
    """A finished run's exit code, metrics file, --json summary or (`say`) stderr line."""
    exit_code = (ExitCode.PARTIAL if summary.counts["error"] or summary.results_pending or summary.inputs_missing
                 else ExitCode.OK)
    if metrics is not None:
        from radscan.metrics import write_metrics

        write_metrics(metrics, exit_code, summary.as_dict())
    if as_json:
        echo_json(summary.as_dict(), exit_code)
    elif say and not ctx.obj["quiet"]:
        counts = summary.counts
        # files unchanged since the last run are of every status: counted apart, not as scored ones
        from radscan.score import why_read

        # "(3 unchanged since the last run; 1 new)", "(12 read again under another model or settings)"
        why = "; ".join(filter(None, [f"{summary.reused} unchanged since the last run" if summary.reused else "",
                                      why_read(summary.read_because)])) or "no files"
        click.echo(f"{counted(summary.files, 'file')} ({why}): {counts['ok']} "
                   f"scored, {counts['rejected']} rejected by QC, {counts['skipped']} skipped, {counts['error']} "
                   f"error; {summary.flagged_studies} of {summary.studies} studies flagged -> "
                   f"{one_line_text(str(summary.report))}", err=True)
        if summary.results_pending:
            click.echo(f"DICOM results: {summary.dicom['not_sent']} objects not sent, {summary.dicom['not_made']} "
                       "images without results: see dicom_result and reason in the worklist", err=True)
    return exit_code



def _check_before_listening(spool: Any, outputs: Any, settings: Any) -> None:
    """What the first scoring run would find wrong, found before the listener accepts a study: the
    scoring run's own checks (outputs apart from the spool, the model there), a worklist folder that
    can be written, and the model's sealed files verified (exit 2, 65 or 73)."""
    import os

    from radscan.batch import load_model_for_scoring
    from radscan.errors import OutputError
    from radscan.ingest import check_outputs_apart
    from radscan.report import prepare_folder
    from radscan.score import check_request, default_model_dir

    check_request((str(spool.studies),), outputs, settings)
    check_outputs_apart([spool.root], outputs.every, kind="spool")
    for folder, option in ((outputs.report.parent, "--out"), (outputs.studies.parent, "--studies"),
                           (outputs.residuals, "--residuals"), (outputs.dicom, "--dicom-out")):
        if folder is None:
            continue
        prepare_folder(folder, option)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write in {folder} ({option}): read-only, or another user's")
    load_model_for_scoring(settings.model_dir or default_model_dir(), settings.device)


def _score_recording_failure(run_score: Callable, paths: tuple[str, ...], outputs: Any, settings: Any,
                             metrics: Path | None) -> Any:
    """`run_score`, and when it fails, a record of the failure in the worklist page it leaves as
    it was (radscan.htmlreport.record_failed_run), so that the page says its list is stale, and in
    the metrics file. A run refused because another one holds the lock records nothing: that one
    will write them."""
    from datetime import datetime, timezone

    from radscan.errors import LockHeldError, RadscanError
    from radscan.htmlreport import record_failed_run

    try:
        return run_score(paths, outputs, settings)
    except LockHeldError:
        raise
    except BaseException as exc:
        code, words = failure(exc)
        if outputs.html is not None:
            record_failed_run(outputs.html, {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                             "exit_code": int(code), "error": words})
        if metrics is not None:
            from radscan.metrics import write_metrics

            with contextlib.suppress(RadscanError):  # the run's own error is the one to report
                write_metrics(metrics, code, None)
        raise


class AeTitles(click.ParamType):
    """AE titles, several separated by commas: an AE title may hold spaces, so a RADSCAN_* variable
    is split at commas, not at spaces as Click splits a repeatable option's variable."""

    name = "TITLE"
    envvar_list_splitter = ","


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="TCP port to listen on (e.g. 11112).")
@click.option("--bind", default="", help="Address to listen on [default: every interface].")
@click.option("--allow-ae", multiple=True, type=AeTitles(),
              help="Calling AE titles accepted (repeatable, or several separated by commas, as in "
                   "RADSCAN_LISTEN_ALLOW_AE); associations from others are rejected. Default: any.")
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the received instances: incoming/ while a study arrives, studies/ once complete "
                   "(the scoring runs' input) [default: <out>_spool/ beside --out].")
@click.option("--quiet-seconds", type=FiniteFloatRange(0), default=30.0, show_default=True,
              help="A study is complete, and scored, when no instance of it has arrived for this long.")
@run_options
@click.pass_context
def listen(ctx: click.Context, port: int, bind: str, allow_ae: tuple[str, ...], spool: Path | None,
           quiet_seconds: float, out: Path, model: Path | None, batch_size: int, device: str, residuals: Path | None,
           no_residuals: bool, pictures: str, no_html: bool, studies: Path | None, study_key: str, phi: str,
           phi_key: str | None, phi_key_file: Path, dicom_out: Path | None, send_to: str | None, ae_title: str,
           called_ae: str, metrics: Path | None, qc_mode: str, views: str, policy: Policy, workers: int,
           as_json: bool) -> None:
    """Receive studies from the PACS (a DICOM storage SCP) and score each one when it is complete.

    radscan's AE title (--ae-title) is the one the PACS sends to, and the one it sends DICOM results
    from. Every instance is written to the spool before the sender is answered; a study with no new
    instance for --quiet-seconds is scored into the same worklist, page, state store and DICOM
    results as `radscan score SPOOL/studies --out OUT` (which can run beside it: the worklist's lock
    makes one wait for the other). SIGTERM or Ctrl-C finishes the scoring run in hand and exits 0; a
    restart scores what arrived and was not scored. With --json, one line per scored study (its spool
    folder, instances, its own files by status, the run's ok and exit code, the worklist's totals) and
    one when it stops.

    \b
    Example:
      radscan listen --port 11112 --ae-title RADSCAN --out /data/worklist/report.csv --spool /data/spool
      radscan listen --port 11112 --allow-ae PACS1 --spool /data/spool --out report.csv --dicom-out results/ \\
          --send pacs:104 --called-ae PACS1 --json
    """
    import logging

    from radscan.listen import ListenSettings, Spool, status_line
    from radscan.listen import listen as run_listen
    from radscan.pacs import check_ae_title
    from radscan.score import score as run_score

    allowed = tuple(check_ae_title("--allow-ae", title) for value in allow_ae for title in value.split(","))
    settings = ListenSettings(port=port, ae_title=check_ae_title("--ae-title", ae_title), bind=bind,
                              allow_ae=allowed, quiet_s=quiet_seconds)
    if not ctx.obj["quiet"]:  # a service: its start, associations and studies are logged without -v
        logging.getLogger("radscan.listen").setLevel(logging.DEBUG if ctx.obj.get("verbose", 0) > 1 else logging.INFO)
    spool = spool or out.parent / f"{out.stem}_spool"
    outputs, run = _run_settings(ctx, (str(spool / "studies"),), out, model, batch_size, device, residuals,
                                 no_residuals, pictures, no_html, studies, study_key, phi, phi_key, phi_key_file,
                                 dicom_out, send_to, ae_title, called_ae, None, metrics, qc_mode, views, policy,
                                 workers)
    received = Spool(spool, settings.min_free_bytes)  # after the settings were checked: a refusal creates nothing
    _check_before_listening(received, outputs, run)

    def score_studies(inputs: list[Path]) -> dict:
        summary = _score_recording_failure(run_score, tuple(map(str, inputs)), outputs, run, metrics)
        exit_code = _report_run(ctx, summary, metrics, as_json=False, say=False)
        return {"ok": exit_code == ExitCode.OK, "exit_code": int(exit_code), "run_id": summary.run_id,
                "worklist_files": summary.files, "worklist_flagged_studies": summary.flagged_studies,
                "results_pending": summary.results_pending, "results_waiting": summary.results_waiting,
                "worklist": str(summary.report)}

    runs = run_listen(settings, received, score_studies,
                      (lambda entry: click.echo(status_line(entry))) if as_json else None)
    if as_json:  # the last line: the listener ended as asked (SIGTERM, Ctrl-C)
        click.echo(status_line({"ok": True, "exit_code": 0, "event": "stopped", "scoring_runs": runs}))
