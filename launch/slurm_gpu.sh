#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per node, all local GPUs per process.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/coco.py /shared/runs/coco
# jax.distributed.initialize() reads the SLURM environment (coordinator, process count/id).
#SBATCH --job-name=vqdiffusion
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?workdir}
shift 2
srun --kill-on-bad-exit=1 python3 -m vqdiffusion_jax.main --multihost \
  --config="$config" --workdir="$workdir" "$@"
