#!/usr/bin/env bash
# The 2-D toy sweep: all six f-divergences on the exact Gaussian-mixture
# teacher, same seeds for each; writes per-run toy.png / metrics.json, a
# markdown table (table.md, mean +- std over seeds) and sweep.json into
# WORKDIR, with figure.png (every divergence side by side). CPU is enough.
# Extra arguments go to fdistill_jax.tools.sweep
# (e.g. --set=total_steps=500).
#
#   bash launch/toy_sweep.sh
#   WORKDIR=/tmp/toy SEEDS=0,1,2,3,4 bash launch/toy_sweep.sh --set=total_steps=500
set -euo pipefail

WORKDIR=${WORKDIR:-runs/toy_sweep}
SEEDS=${SEEDS:-0,1,2}
PYTHON=${PYTHON:-python}

"$PYTHON" -m fdistill_jax.tools.sweep --config=configs/toy2d.py --workdir="$WORKDIR" \
    --seeds="$SEEDS" "$@"
