#!/bin/bash
# Multi-node training on SLURM through torchrun's c10d rendezvous (one torchrun per node, one process per GPU).
#
#   sbatch scripts/slurm_train.sh /data/nih --cache-dir /data/nih-cache-224 --epochs 30
#
# Adjust the #SBATCH lines to your cluster. Every node must see the code, the data and the run directory.
#SBATCH --job-name=cxr-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

DATA_DIR=${1:?usage: sbatch scripts/slurm_train.sh DATA_DIR [train.py flags...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-64} / GPUS_PER_NODE - 1 ))
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD_NODE:29500" \
    train.py --data-dir "$DATA_DIR" --out "runs/slurm-$SLURM_JOB_ID" --workers "$WORKERS" "$@"
