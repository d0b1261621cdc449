#!/usr/bin/env bash
# The training command for every row of the paper's CIFAR-10 and ImageNet-64
# tables (Xu, Nie, Vahdat 2025): each of the six f-divergences, plus the two
# ablations (no_gan = f-distill loss only, gan_only = adversarial distillation
# only). Hyperparameters are the configs' (paper Table 5); see launch/README.md.
#
#   bash launch/paper_tables.sh                 # print every command (a dry run)
#   bash launch/paper_tables.sh 'c10_'          # print the rows whose name matches a regex
#   RUN=1 bash launch/paper_tables.sh 'c10_fkl$'  # run the matching rows, one by one
#   LAUNCHER=slurm bash launch/paper_tables.sh 'in64_'    # the sbatch line of each row
#   LAUNCHER=tpu_pod RUNS=/mnt/gcs/runs C10_TEACHER=gs://B/edm-cifar10-32x32-cond-vp.pkl \
#     C10_ZIP=gs://B/cifar10-32x32.zip bash launch/paper_tables.sh 'c10_fkl$'
#
# One row is days of accelerator time at the configs' batch sizes (CIFAR-10:
# 2048 x 60k steps; ImageNet-64: 512 x 380k steps). LAUNCHER=slurm prints (RUN=1:
# submits) `sbatch launch/slurm.sbatch` with the row in its CONFIG / WORKDIR / TEACHER /
# DATA_PATH variables; LAUNCHER=tpu_pod prints (RUN=1: runs) `launch/tpu_pod.sh run` with
# CONFIG / WORKDIR / TEACHER_GCS / DATA_GCS (there the teachers and zips are gs:// paths
# and RUNS a folder under the pod's gcsfuse MOUNT). Both read EDM zips (DATA=edm).
set -euo pipefail

# ---- Set these (environment variables override) -----------------------------
# EDM teachers: .pkl snapshots, or directories written by
# `python -m fdistill_jax.tools.convert`. Download from
#   https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl
#   https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl
C10_TEACHER=${C10_TEACHER:-checkpoints/edm-cifar10-32x32-cond-vp.pkl}
IN64_TEACHER=${IN64_TEACHER:-checkpoints/edm-imagenet-64x64-cond-adm.pkl}
# Training data. edm: zips written by EDM's dataset_tool.py (the data the
# teachers and FID references were made from); tfds: prepared TFDS datasets
# (cifar10, imagenet_resized/64x64; the latter is a different downsampling of
# ImageNet than EDM's, so use edm to reproduce ImageNet-64 numbers).
DATA=${DATA:-edm}
C10_ZIP=${C10_ZIP:-datasets/cifar10-32x32.zip}
IN64_ZIP=${IN64_ZIP:-datasets/imagenet-64x64.zip}
TFDS_DIR=${TFDS_DIR:-$HOME/tensorflow_datasets}
RUNS=${RUNS:-runs}                 # one workdir per row below this
PYTHON=${PYTHON:-python}
EXTRA_FLAGS=${EXTRA_FLAGS:-}       # appended to every command, e.g. --config.seed=1
LAUNCHER=${LAUNCHER:-local}        # local | slurm | tpu_pod: what the printed line starts
# -----------------------------------------------------------------------------

FILTER=${1:-.}
RUN=${RUN:-0}                      # 0: print only (dry run); 1: also run each line
if [[ $DATA != edm && $DATA != tfds ]]; then
  echo "DATA=$DATA: expected 'edm' (dataset_tool.py zips) or 'tfds'." >&2
  exit 2
fi
case "$LAUNCHER" in
  local) ;;
  slurm|tpu_pod)
    if [[ $DATA != edm ]]; then
      echo "LAUNCHER=$LAUNCHER reads EDM dataset zips: use DATA=edm (not $DATA)." >&2
      exit 2
    fi ;;
  *) echo "LAUNCHER=$LAUNCHER: expected local, slurm or tpu_pod." >&2; exit 2 ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # show

data_flags() {  # data_flags c10|in64
  case "$DATA:$1" in
    edm:c10)   echo "--config.data.kind=edm --config.data.path=$C10_ZIP" ;;
    edm:in64)  echo "--config.data.kind=edm --config.data.path=$IN64_ZIP" ;;
    tfds:*)    echo "--config.data.kind=tfds --config.data.data_dir=$TFDS_DIR" ;;
  esac
}

row() {  # row NAME c10|in64 VARIANT
  local name=$1 ds=$2 variant=$3 config teacher zip
  [[ $name =~ $FILTER ]] || return 0
  case "$ds" in
    c10)  config=configs/cifar10.py; teacher=$C10_TEACHER; zip=$C10_ZIP ;;
    in64) config=configs/imagenet64.py; teacher=$IN64_TEACHER; zip=$IN64_ZIP ;;
  esac
  local -a cmd extra
  case "$LAUNCHER" in
    local)
      read -r -a extra <<< "$(data_flags "$ds") $EXTRA_FLAGS"
      cmd=("$PYTHON" -m fdistill_jax.main "--config=$config:$variant" "--workdir=$RUNS/$name"
           "--config.teacher.path=$teacher" "${extra[@]}") ;;
    slurm)
      cmd=(env "CONFIG=$config:$variant" "WORKDIR=$RUNS/$name" "TEACHER=$teacher"
           "DATA_PATH=$zip" "EXTRA_FLAGS=$EXTRA_FLAGS" sbatch launch/slurm.sbatch) ;;
    tpu_pod)
      cmd=(env "CONFIG=$config:$variant" "WORKDIR=$RUNS/$name" "TEACHER_GCS=$teacher"
           "DATA_GCS=$zip" "EXTRA_FLAGS=$EXTRA_FLAGS" bash launch/tpu_pod.sh run) ;;
  esac
  show "${cmd[@]}"
  if [[ $RUN == 1 ]]; then
    "${cmd[@]}"
  fi
}

# CIFAR-10 32x32, class-conditional (EDM DDPM++ teacher).
row c10_rkl                c10 rkl                 # reverse KL (= DMD2's objective)
row c10_softened_rkl       c10 softened_rkl
row c10_js                 c10 js
row c10_squared_hellinger  c10 squared_hellinger
row c10_fkl                c10 fkl                 # paper FID 1.92 (best on CIFAR-10)
row c10_jeffreys           c10 jeffreys
row c10_fkl_no_gan         c10 fkl,no_gan          # ablation: f-distill loss only
row c10_gan_only           c10 fkl,gan_only        # ablation: GAN loss only (divergence unused)

# ImageNet 64x64, class-conditional (EDM ADM teacher).
row in64_rkl               in64 rkl                # reverse KL (= DMD2's objective)
row in64_softened_rkl      in64 softened_rkl
row in64_js                in64 js                 # paper FID 1.16 (best on ImageNet-64)
row in64_squared_hellinger in64 squared_hellinger
row in64_fkl               in64 fkl
row in64_jeffreys          in64 jeffreys
row in64_js_no_gan         in64 js,no_gan          # ablation: f-distill loss only
row in64_gan_only          in64 js,gan_only        # ablation: GAN loss only (divergence unused)
