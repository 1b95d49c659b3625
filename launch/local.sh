#!/usr/bin/env bash
# Runs one experiment on this machine's devices.
#   launch/local.sh configs/shapes.py runs/shapes [--config.x.y=value ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [FLAGS...]}
shift 2
exec python3 -m vqdiffusion_jax.main --config="$config" --workdir="$workdir" "$@"
