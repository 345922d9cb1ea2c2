#!/usr/bin/env bash
# Nightly radscan run, for cron. Scores new or changed studies under $RADSCAN_INPUT and refreshes
# the worklist in $RADSCAN_OUTPUT. Safe to start while a previous run is still going (exit 75),
# and safe to kill: the next run finishes the job.
#
# Settings: /etc/radscan.toml (or RADSCAN_CONFIG), RADSCAN_* variables, or the defaults below.
set -u
export RADSCAN_CONFIG="${RADSCAN_CONFIG:-/etc/radscan.toml}"
[ -f "$RADSCAN_CONFIG" ] || unset RADSCAN_CONFIG
input="${RADSCAN_INPUT:-/data/pacs-export}"
output="${RADSCAN_OUTPUT:-/data/radscan}"
venv="${RADSCAN_VENV:-/opt/radscan/.venv}"
mkdir -p "$output/logs"
log="$output/logs/$(date +%Y-%m-%d).log"

"$venv/bin/radscan" -v score "$input" --out "$output/worklist.csv" --json \
    >"$output/last-run.json" 2>>"$log"
status=$?
case $status in
  0)  ;;                                                                 # all scored
  3)  echo "$(date -Is) some files could not be used: see status=error rows" >>"$log" ;;
  75) echo "$(date -Is) previous run still holds the lock; skipped" >>"$log"; status=0 ;;
  *)  echo "$(date -Is) radscan failed with exit code $status" >>"$log" ;;
esac
exit $status
