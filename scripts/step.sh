#!/usr/bin/env bash
# Run one named step of a make target and print how long it took.
#   scripts/step.sh NAME COMMAND [ARGS...]
# Exits with the command's status. Its own lines go to stderr, so the
# command's stdout can be redirected cleanly.
set -euo pipefail

if (($# < 2)); then
    echo "usage: scripts/step.sh NAME COMMAND [ARGS...]" >&2
    exit 2
fi
name="$1"
shift

echo "==> [$name] $*" >&2
start=$(date +%s)
status=0
"$@" || status=$?
elapsed=$(($(date +%s) - start))
if ((status == 0)); then
    printf '<== [%s] ok in %dm%02ds\n' "$name" $((elapsed / 60)) $((elapsed % 60)) >&2
else
    printf '<== [%s] FAILED (exit %d) after %dm%02ds\n' "$name" "$status" $((elapsed / 60)) $((elapsed % 60)) >&2
fi
exit "$status"
