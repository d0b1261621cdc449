#!/usr/bin/env bash
# The 2-D toy sweep: all six f-divergences on the exact Gaussian-mixture
# teacher, same seeds for each; writes per-run toy.png / metrics.json and a
# markdown table (table.md, mean +- std over seeds) into WORKDIR. CPU is enough.
#
#   bash launch/toy_sweep.sh
#   WORKDIR=/tmp/toy SEEDS=0,1,2,3,4 bash launch/toy_sweep.sh
set -euo pipefail

WORKDIR=${WORKDIR:-runs/toy_sweep}
SEEDS=${SEEDS:-0,1,2}
PYTHON=${PYTHON:-python}

"$PYTHON" -m fdistill_jax.toy_demo --workdir="$WORKDIR" --seeds="$SEEDS" "$@"
