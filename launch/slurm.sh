#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, started by srun.
#
#   sbatch launch/slurm.sh --config configs/train.py:llava_hr_7b_mod0.34 --workdir /runs/gmod \
#       [--config.mesh.fsdp=8] [--config.init_checkpoint=/ckpt/stage1]
#
# Everything after the script name goes to `python -m launch.train`. Edit the #SBATCH
# header for your cluster (nodes, GPUs per node, partition, time); keep
# --ntasks-per-node equal to --gpus-per-node: one task per GPU.
#
# How the processes find each other: inside the srun step every task sees SLURM_JOB_ID,
# SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID; launch.train calls
# gamma_mod_jax.parallel.distributed.initialize, which hands them to
# jax.distributed.initialize (jax's own SLURM detection): the coordinator is the first
# node of the step, on a port derived from the job id; each task takes its own GPU
# (SLURM_LOCALID). Nothing to pass by hand. Outside SLURM use the flags instead:
# --coordinator-address=HOST:PORT --num-processes=N --process-id=I.
#
# Parallelism: the config's mesh spans all GPUs of all nodes, process-major, `tensor`
# innermost: keep tensor <= GPUs per node (tensor parallelism over NVLink), use fsdp
# within or across nodes and data across nodes, e.g. 4 nodes x 8 GPUs with
# --config.mesh.data=4 --config.mesh.fsdp=8 --config.mesh.tensor=1. Each process reads
# its own shard of the data (data.batch_size examples per process and micro-batch),
# so the global batch is data.batch_size x processes x accumulation_steps.
#
# Checkpoints: <workdir> must be on a filesystem every node sees; all processes write
# their shards and restore theirs, onto any mesh or node count (the data iterator's
# position is per process, so resume a run with the same process count for the same
# data order). Metrics: process 0 writes <workdir>/metrics.jsonl and TensorBoard.
# Failures: when a task dies, the others fail their next collective or are stopped by
# jax's coordination service after --heartbeat-timeout seconds; srun --kill-on-bad-exit
# ends the step at once. SIGTERM (scancel, preemption with --signal) reaches every task:
# they agree to stop at the same step, save a checkpoint and exit; resubmitting the
# same command resumes.
#
#SBATCH --job-name=gamma-mod
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-python}

# Every task sees all GPUs of its node; jax picks the one at SLURM_LOCALID.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1

srun --kill-on-bad-exit=1 --label --cpu-bind=none \
    "$PYTHON" -m launch.train --heartbeat-timeout=120 "$@"
