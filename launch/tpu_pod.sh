#!/usr/bin/env bash
# Runs one experiment on every worker of a Cloud TPU VM slice (the same command everywhere;
# jax.distributed.initialize() discovers the other workers).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/coco.py gs://bucket/runs/coco [--config.x=y ...]
# Assumes the repository is checked out at ~/vqdiffusion-jax on every worker with
# `pip install -e ".[tpu]"` done.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
flags=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/vqdiffusion-jax && python3 -m vqdiffusion_jax.main --multihost --config=$config \
   --workdir=$workdir$flags"
