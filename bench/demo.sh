#!/usr/bin/env bash
# The main job on the built-in example (run by `make demo`): prune + fine-tune the digits MLP,
# convert it to a verified sparse artifact, inspect it, compare speed dense vs sparse, then serve it
# and answer one request over HTTP.
set -euo pipefail
out=${1:-out}
mkdir -p "$out"
se=.venv/bin/sparse-engine
echo "TODO" >&2
