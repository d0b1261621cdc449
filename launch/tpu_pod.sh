#!/usr/bin/env bash
# Brings an f-distill run up on a Cloud TPU VM pod slice (every worker runs one
# process; jax.distributed.initialize() finds the others by itself on TPU).
#
#   bash launch/tpu_pod.sh create    # create the TPU VM slice
#   bash launch/tpu_pod.sh setup     # copy this checkout, install, mount the bucket, fetch inputs
#   bash launch/tpu_pod.sh run       # start training on all workers (detached)
#   bash launch/tpu_pod.sh logs      # follow worker 0's log
#   bash launch/tpu_pod.sh stop      # SIGTERM: each worker checkpoints, then exits
#   bash launch/tpu_pod.sh delete    # delete the slice
#   DRY_RUN=1 bash launch/tpu_pod.sh run    # print the gcloud commands, run nothing
#   LAUNCHER=tpu_pod bash launch/paper_tables.sh 'in64_js$'   # this line for a table row
#
# Run from the repository root. Re-running `run` resumes from the latest
# checkpoint in WORKDIR. See launch/README.md.
set -euo pipefail

# ---- Set these (environment variables override) -----------------------------
PROJECT=${PROJECT:-my-gcp-project}
ZONE=${ZONE:-us-central2-b}
TPU_NAME=${TPU_NAME:-fdistill}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}          # 16 chips, 4 workers
# TPU VM image: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
# v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}                                      # 1: --spot (preemptible)
BUCKET=${BUCKET:-my-fdistill-bucket}                 # GCS bucket, no gs:// prefix
MOUNT=${MOUNT:-/mnt/gcs}                             # gcsfuse mount of BUCKET on every worker
# The workdir must be one directory all workers share (orbax writes one
# checkpoint together): a path under the gcsfuse mount.
WORKDIR=${WORKDIR:-$MOUNT/runs/c10_fkl}
CONFIG=${CONFIG:-configs/cifar10.py:fkl}             # any row of launch/paper_tables.sh
TEACHER_GCS=${TEACHER_GCS:-gs://$BUCKET/teachers/edm-cifar10-32x32-cond-vp.pkl}
DATA_GCS=${DATA_GCS:-gs://$BUCKET/datasets/cifar10-32x32.zip}   # EDM dataset_tool.py zip
EXTRA_FLAGS=${EXTRA_FLAGS:-}                         # more --config.* overrides
JAX_VERSION=${JAX_VERSION:-0.10.2}                   # as pinned in requirements.txt
DRY_RUN=${DRY_RUN:-0}                                # 1: print the commands, run nothing
# -----------------------------------------------------------------------------

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # show

do_or_print() {  # do_or_print COMMAND...: run it, or with DRY_RUN=1 print it (shell-quoted)
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

REMOTE_DIR=fdistill_jax                              # under each worker's $HOME
LOCAL_INPUTS=/tmp/fdistill_inputs                    # teacher + data copied here per worker
TEACHER_LOCAL=$LOCAL_INPUTS/$(basename "$TEACHER_GCS")
DATA_LOCAL=$LOCAL_INPUTS/$(basename "$DATA_GCS")

tpu() {  # tpu SUBCOMMAND [ARGS...]: gcloud compute tpus tpu-vm in PROJECT / ZONE
  do_or_print gcloud compute tpus tpu-vm "$1" "${@:2}" --project="$PROJECT" --zone="$ZONE"
}

on_workers() {  # on_workers WORKER COMMAND
  tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

create() {
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot[@]}"
}

setup() {
  do_or_print git archive --format=tar.gz -o /tmp/fdistill_src.tar.gz HEAD
  tpu scp /tmp/fdistill_src.tar.gz "$TPU_NAME":~/ --worker=all
  on_workers all "set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/fdistill_src.tar.gz -C ~/$REMOTE_DIR
    # Python >= 3.11 (the pinned numpy/scipy need it) in a uv-managed venv.
    python3 -m pip install -q --user uv
    ~/.local/bin/uv venv -q --python 3.11 ~/venv
    grep -v -E '^(torch|pytest)' ~/$REMOTE_DIR/requirements.txt > /tmp/req.txt
    # The text-to-image runs' CLIP tokenizer (pinned beside the test dependencies).
    grep -E '^(transformers|ftfy)==' ~/$REMOTE_DIR/requirements-test.txt >> /tmp/req.txt
    ~/.local/bin/uv pip install -q -p ~/venv -r /tmp/req.txt 'jax[tpu]==$JAX_VERSION' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    # gcsfuse, then mount the bucket at the same path on every worker.
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT
    # Teacher and data on local disk (random reads from a zip over fuse are slow).
    mkdir -p $LOCAL_INPUTS
    gcloud storage cp -n '$TEACHER_GCS' '$DATA_GCS' $LOCAL_INPUTS/"
}

run() {
  local cmd="cd ~/$REMOTE_DIR && mkdir -p $WORKDIR && \
    setsid nohup ~/venv/bin/python -m fdistill_jax.main --multihost \
      --config=$CONFIG --workdir=$WORKDIR \
      --config.teacher.path=$TEACHER_LOCAL \
      --config.data.kind=edm --config.data.path=$DATA_LOCAL $EXTRA_FLAGS \
      > ~/fdistill_run.log 2>&1 < /dev/null & echo \$! > ~/fdistill_run.pid"
  on_workers all "$cmd"
}

case "${1:-}" in
  create) create ;;
  setup) setup ;;
  run) run ;;
  logs) on_workers 0 "tail -n 100 -f ~/fdistill_run.log" ;;
  stop) on_workers all "kill -TERM \$(cat ~/fdistill_run.pid)" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  *) echo "usage: bash launch/tpu_pod.sh create|setup|run|logs|stop|delete" >&2; exit 2 ;;
esac
