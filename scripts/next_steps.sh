#!/usr/bin/env bash
# Prints how to run the peerd installed in VENV: commands that work as printed in any shell.
#   bash scripts/next_steps.sh VENV
set -euo pipefail
venv="$(cd "$1" && pwd)"
cat <<MESSAGE
peerd is installed in $venv; every command it prints names it by that path. Try:
  $venv/bin/peerd cluster
  $venv/bin/peerd --help
To type plain \`peerd\` in this shell, put it on PATH first:
  source $venv/bin/activate
MESSAGE
