#!/bin/bash
# Train under SLURM so that preemption and time limits cost at most a few steps, never the run.
#
#   sbatch scripts/slurm_train.sh --data-dir /data/nih --cache-dir /data/nih-cache-224
#
# - SLURM signals the batch shell (B:) with USR1 three minutes before the time limit; the trap forwards SIGTERM to
#   torchrun, which forwards it to every worker: each rank finishes its step, rank 0 writes last.pt with the
#   position inside the epoch and the workers exit with status 75. The script then requeues the job.
# - --requeue: a preempted job goes back into the queue with the same job id, hence the same run directory;
#   --resume auto continues from its last.pt (a fresh start when there is none), so every start is the same command.
# - torchrun --max-restarts restarts the workers of a node after a lost process; they resume from the newest
#   checkpoint of the same directory (train.py does that by itself on a restart).
#SBATCH --job-name=cxr-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out

set -u
RUN_DIR="${CXR_RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}"
GPUS="${SLURM_GPUS_ON_NODE:-8}"
PREEMPTED=75  # cxr.preemption.PREEMPTED_EXIT_CODE

requeue() {
  echo "$(date '+%F %T') caught a stop signal: asking the workers to checkpoint"
  kill -TERM "$child" 2>/dev/null
  wait "$child"
  status=$?
  echo "$(date '+%F %T') training exited with status $status; requeueing job ${SLURM_JOB_ID:-?}"
  [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
  exit "$status"
}
trap requeue USR1 TERM

# A new rendezvous store for every restart round (pytorch/pytorch#135712; needed once --standalone becomes a
# multi-node --rdzv-endpoint, harmless on one node).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
torchrun --standalone --nproc_per_node="$GPUS" --max-restarts=3 \
  train.py --out "$RUN_DIR" --resume auto --workers 7 "$@" &
child=$!
wait "$child"
status=$?
if [ "$status" -eq "$PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  scontrol requeue "$SLURM_JOB_ID"  # stopped by a signal that did not come through this shell
fi
exit "$status"
