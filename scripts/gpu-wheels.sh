#!/usr/bin/env bash
# Download, into .whl/ (git-ignored through .git/info/exclude), the wheels that a lent
# GPU machine lacks for scripts/gpu-check.sh: it has Python 3.12, torch, numpy,
# Pillow, psutil and an older transformers/huggingface-hub, but no diffusers, pyzmq
# or structlog and no network. Each wheel is pinned to the version in this project's
# virtualenv, so the GPU runs the code the CPU tests ran. Run here, then carry `.whl`.
#
# The list is the import-time dependency closure of our actors, broker and clients
# (diffusers, transformers, pyzmq, structlog, msgpack) from each wheel's
# Requires-Dist, less what the GPU image has in a version that satisfies it (torch,
# numpy, Pillow, psutil, requests, fsspec, accelerate) and less what is imported only
# by command-line tools (typer, rich, pydantic) or downloads (hf-xet).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$LEGO_ROOT"

PACKAGES=(
  # ours, absent there
  diffusers pyzmq structlog
  # newer than the image's (transformers' import-time version checks, hub 2.x API)
  transformers huggingface-hub tokenizers safetensors regex tqdm filelock pyyaml packaging msgpack
  # huggingface-hub 2.x and diffusers import these; the image has none or older ones
  httpx2 httpcore2 truststore h11 anyio idna click typing-extensions importlib-metadata lazy-importer zipp
)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$LEGO_VENV/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
  pins+=("$name==$version")
done

rm -rf .whl && mkdir .whl
# Pure-Python wheels match any platform; binary ones need a manylinux tag, which pip
# matches exactly: name every one the x86-64 glibc Linux there accepts.
platforms=()
for glibc in 2_35 2_34 2_31 2_28 2_27 2_26 2_24 2_17; do
  platforms+=(--platform "manylinux_${glibc}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$LEGO_VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"

count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
  echo "gpu-wheels: expected ${#PACKAGES[@]} wheels, got $count" >&2
  exit 1
fi
du -ch .whl/*.whl | tail -1 | sed 's/total/.whl total/'
ls -1 .whl
