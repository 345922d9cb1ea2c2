#!/usr/bin/env bash
# Nightly radscan run, for cron. Scores new or changed studies under $RADSCAN_INPUT and refreshes
# the worklist in $RADSCAN_OUTPUT. Safe to start while a previous run is still going (exit 75),
# and safe to kill: the next run finishes the job.
#
# Settings: /etc/radscan.toml (or RADSCAN_CONFIG), RADSCAN_* variables, or the defaults below.
set -u
input="${RADSCAN_INPUT:-/data/pacs-export}"
output="${RADSCAN_OUTPUT:-/data/radscan}"
venv="${RADSCAN_VENV:-/opt/radscan/.venv}"
# --metrics: for node_exporter's textfile collector (set RADSCAN_METRICS to its directory's file)
metrics="${RADSCAN_METRICS:-$output/radscan.prom}"

# A night that fails without radscan recording it (refused here, killed, out of memory, a refused
# setting) must not leave the last good night's exit code in the metrics, nor a page that reads as
# tonight's list: the failed attempt is written into both, the rest kept.
record_failure() {  # STATUS
  "$venv/bin/python" - "$metrics" "$1" "$output/worklist.html" 2>>"$log" <<'PY'
import sys
from datetime import datetime, timezone
from pathlib import Path

from radscan.errors import RadscanError
from radscan.htmlreport import record_failed_run
from radscan.metrics import write_metrics

metrics, status, page = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
try:
    write_metrics(metrics, status)
except RadscanError as exc:
    print(f"radscan nightly: the metrics could not be written either: {exc}", file=sys.stderr)
record_failed_run(page, {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "exit_code": status,
                         "error": f"radscan ended with exit code {status} before it could record its failure "
                                  "(killed, out of memory, or a refused setting): see the nightly log"})
PY
}

mkdir -p "$output/logs"
log="$output/logs/$(date +%Y-%m-%d).log"
# A settings file that was asked for but is missing is an error (its PHI mode, model... would be
# silently replaced by the defaults); only the default location may be absent.
if [ -n "${RADSCAN_CONFIG:-}" ]; then
  if [ ! -f "$RADSCAN_CONFIG" ]; then
    message="radscan nightly run not started: RADSCAN_CONFIG=$RADSCAN_CONFIG is not a file"
    echo "$(date -Is) $message" >>"$log"
    echo "$message" >&2
    record_failure 2
    printf '{"ok": false, "exit_code": 2, "error": "RADSCAN_CONFIG is not a file: see %s"}\n' "$log" \
      >"$output/.last-run.json.tmp" && mv -f "$output/.last-run.json.tmp" "$output/last-run.json"
    date -Is >"$output/last_attempt"
    exit 2
  fi
elif [ -f /etc/radscan.toml ]; then
  export RADSCAN_CONFIG=/etc/radscan.toml
fi

# --json prints one object even when the run fails ({"ok": false, "exit_code": ..., "error": ...},
# SIGTERM included); it is written to a temporary file of this run's own (overlapping runs do not
# share one) and renamed, so last-run.json is never empty or half-written.
summary=$(mktemp "$output/.last-run.json.XXXXXX") || exit 73
started=$(mktemp "$output/.run-started.XXXXXX") || exit 73  # its time: did the run write its metrics?
trap 'rm -f "$summary" "$started"' EXIT  # a wrapper killed itself leaves no temporary file behind
"$venv/bin/radscan" -v score "$input" --out "$output/worklist.csv" --metrics "$metrics" \
  --json >"$summary" 2>>"$log"
status=$?
if [ ! -s "$summary" ]; then  # killed with SIGKILL (or out of memory): no summary of its own
  printf '{"ok": false, "exit_code": %d, "error": "radscan ended without a summary (killed?): see %s"}\n' \
    "$status" "$log" >"$summary"
fi
# a run that could not record its own failure (refused its settings before starting: exit 2; killed
# with SIGKILL, out of memory)
if [ "$status" -ne 75 ] && ! [ "$metrics" -nt "$started" ]; then
  record_failure "$status"
fi
rm -f "$started"
if [ "$status" -eq 75 ]; then  # refused by the lock: another run's night, whose files these are
  rm -f "$summary"
else
  chmod 644 "$summary"
  mv -f "$summary" "$output/last-run.json"
  date -Is >"$output/last_attempt"
fi
# the summary's "problems" (plain words, one per line) and whether DICOM results failed to arrive
problems() {
  "$venv/bin/python" -c 'import json, sys; print(*json.load(open(sys.argv[1])).get("problems", []), sep="\n")' \
    "$output/last-run.json" 2>/dev/null
}
incomplete() {  # results that did not reach the PACS, or most of the list's films gone from the inputs
  "$venv/bin/python" -c 'import json, sys; s = json.load(open(sys.argv[1])); d = s.get("dicom") or {}
sys.exit(0 if d.get("not_sent") or d.get("not_made") or s.get("inputs_missing") else 1)' \
    "$output/last-run.json" 2>/dev/null
}
case $status in
  0)  date -Is >"$output/last_success" ;;                                # all scored and delivered
  3)  if incomplete; then  # radscan's own WARNING lines in the log give each problem
        # results that did not reach the PACS, or a share that mounted in part: not a good night.
        # last_success stays as it was, and the line on stderr makes cron mail it
        echo "radscan nightly run: results not delivered or films missing (exit 3): $(problems | tr '\n' ';') see $log" >&2
      else
        date -Is >"$output/last_success"  # the worklist is complete for every file that could be read
      fi ;;
  75) echo "$(date -Is) previous run still holds the lock; skipped" >>"$log"; status=0 ;;
  *)  echo "$(date -Is) radscan failed with exit code $status" >>"$log"
      # a line on stderr: cron mails it (MAILTO), so a failed night does not go unnoticed
      echo "radscan nightly run failed (exit $status): see $log and $output/last-run.json" >&2 ;;
esac
exit $status
