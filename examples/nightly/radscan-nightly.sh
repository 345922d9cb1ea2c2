#!/usr/bin/env bash
# Nightly radscan run, for cron. Scores new or changed studies under $RADSCAN_INPUT and refreshes
# the worklist in $RADSCAN_OUTPUT. Safe to start while a previous run is still going (exit 75),
# and safe to kill: the next run finishes the job.
#
# Settings: /etc/radscan.toml (or RADSCAN_CONFIG), RADSCAN_* variables, or the defaults below.
set -u
# A settings file that was asked for but is missing is an error (its PHI mode, model... would be
# silently replaced by the defaults); only the default location may be absent.
if [ -n "${RADSCAN_CONFIG:-}" ]; then
  if [ ! -f "$RADSCAN_CONFIG" ]; then
    echo "radscan nightly run not started: RADSCAN_CONFIG=$RADSCAN_CONFIG is not a file" >&2
    exit 2
  fi
elif [ -f /etc/radscan.toml ]; then
  export RADSCAN_CONFIG=/etc/radscan.toml
fi
input="${RADSCAN_INPUT:-/data/pacs-export}"
output="${RADSCAN_OUTPUT:-/data/radscan}"
venv="${RADSCAN_VENV:-/opt/radscan/.venv}"
mkdir -p "$output/logs"
log="$output/logs/$(date +%Y-%m-%d).log"

# --json prints one object even when the run fails ({"ok": false, "exit_code": ..., "error": ...},
# SIGTERM included); it is written to a temporary file of this run's own (overlapping runs do not
# share one) and renamed, so last-run.json is never empty or half-written.
summary=$(mktemp "$output/.last-run.json.XXXXXX") || exit 73
# --metrics: for node_exporter's textfile collector (set RADSCAN_METRICS to its directory's file)
metrics="${RADSCAN_METRICS:-$output/radscan.prom}"
started=$(mktemp "$output/.run-started.XXXXXX") || exit 73  # its time: did the run write its metrics?
"$venv/bin/radscan" -v score "$input" --out "$output/worklist.csv" --metrics "$metrics" \
  --json >"$summary" 2>>"$log"
status=$?
if [ ! -s "$summary" ]; then  # killed with SIGKILL (or out of memory): no summary of its own
  printf '{"ok": false, "exit_code": %d, "error": "radscan ended without a summary (killed?): see %s"}\n' \
    "$status" "$log" >"$summary"
fi
# a run that could not write its metrics (refused its settings before starting: exit 2; killed with
# SIGKILL) must not leave the last good night's exit code there: the failed attempt is written here,
# the rest kept (a run refused by the lock, exit 75, is another run's night and changes nothing)
if [ "$status" -ne 75 ] && ! [ "$metrics" -nt "$started" ]; then
  "$venv/bin/python" -c 'import sys; from pathlib import Path; from radscan.metrics import write_metrics
write_metrics(Path(sys.argv[1]), int(sys.argv[2]))' "$metrics" "$status" 2>>"$log"
fi
rm -f "$started"
chmod 644 "$summary"
mv -f "$summary" "$output/last-run.json"
date -Is >"$output/last_attempt"
# the summary's "problems" (plain words, one per line) and whether DICOM results failed to arrive
problems() {
  "$venv/bin/python" -c 'import json, sys; print(*json.load(open(sys.argv[1])).get("problems", []), sep="\n")' \
    "$output/last-run.json" 2>/dev/null
}
undelivered() {
  "$venv/bin/python" -c 'import json, sys; d = json.load(open(sys.argv[1])).get("dicom") or {}
sys.exit(0 if d.get("not_sent") or d.get("not_made") else 1)' "$output/last-run.json" 2>/dev/null
}
case $status in
  0)  date -Is >"$output/last_success" ;;                                # all scored and delivered
  3)  if undelivered; then  # radscan's own WARNING lines in the log give each problem
        # results that did not reach the PACS: not a good night. last_success stays as it was, and
        # the line on stderr makes cron mail it
        echo "radscan nightly run: DICOM results were not delivered (exit 3): $(problems | tr '\n' ';') see $log" >&2
      else
        date -Is >"$output/last_success"  # the worklist is complete for every file that could be read
      fi ;;
  75) echo "$(date -Is) previous run still holds the lock; skipped" >>"$log"; status=0 ;;
  *)  echo "$(date -Is) radscan failed with exit code $status" >>"$log"
      # a line on stderr: cron mails it (MAILTO), so a failed night does not go unnoticed
      echo "radscan nightly run failed (exit $status): see $log and $output/last-run.json" >&2 ;;
esac
exit $status
