#!/usr/bin/env bash
# The engine bench on a GPU host that has CUDA 13 and torch but neither onnxruntime-gpu nor a network.
#
#   bench/gpu.sh pack            here (PyPI reachable): download the onnxruntime-gpu wheel this project pins,
#                                split it into 60 MiB parts under bench/gpu-wheel/ (git-ignored)
#   bench/gpu.sh stash PART      on the GPU host: keep one part in $WHEEL_DIR (a transfer can carry one part
#                                at a time; the host keeps the folder between calls while it stays up)
#   bench/gpu.sh run             on the GPU host: join the parts, install the wheel into a venv that sees the
#                                system's torch (its pip-installed CUDA and cuDNN libraries serve ONNX Runtime),
#                                run tests/test_cuda.py (if the host has pytest) and
#                                `bench/engine.py --device cuda --cuda-only`, writing bench/out/engine-cuda.json
#
# CPU machines never need this: the default install is the CPU build of onnxruntime (./install --gpu swaps it).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-/tmp/wavecast-wheel}
VENV=${VENV:-/tmp/wavecast-gpu-venv}
PARTS=bench/gpu-wheel

case "${1:-}" in
pack)
  mkdir -p "$PARTS"
  rm -f "$PARTS"/*
  python3 -m pip download -q --no-deps --only-binary=:all: "onnxruntime-gpu>=1.20" -d "$PARTS"
  wheel=$(ls "$PARTS"/onnxruntime_gpu-*.whl)
  (cd "$PARTS" && split -b 60M -d "$(basename "$wheel")" "$(basename "$wheel").part" && sha256sum "$(basename "$wheel")" >SHA256SUMS)
  rm "$wheel"
  ls -l "$PARTS"
  ;;
stash)
  part=${2:?usage: bench/gpu.sh stash bench/gpu-wheel/NAME.partNN}
  mkdir -p "$WHEEL_DIR"
  cp "$part" "$WHEEL_DIR/"
  [ -f "$PARTS/SHA256SUMS" ] && cp "$PARTS/SHA256SUMS" "$WHEEL_DIR/"
  ls -l "$WHEEL_DIR"
  ;;
run)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  first=$(ls "$WHEEL_DIR"/*.part00)
  wheel="$WHEEL_DIR/$(basename "${first%.part00}")"
  cat "$WHEEL_DIR"/"$(basename "$wheel")".part* >"$wheel"
  (cd "$WHEEL_DIR" && sha256sum -c SHA256SUMS)
  python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q --no-index --no-deps "$wheel"
  # onnxruntime-gpu finds CUDA 13 and cuDNN 9 in the nvidia-* wheels that torch brought (preload_dlls)
  "$VENV/bin/python" -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
  # the repository's folders as the wavecast namespace, without installing it (the host has no index to reach)
  src=$(mktemp -d)
  mkdir "$src/wavecast"
  for pkg in daemon streaming models; do ln -s "$PWD/$pkg" "$src/wavecast/$pkg"; done
  export PYTHONPATH="$src:$PWD"
  if "$VENV/bin/python" -c "import pytest" 2>/dev/null; then  # the CUDA test, where the host has pytest
    "$VENV/bin/python" -c "import onnxruntime, pytest, sys; onnxruntime.preload_dlls(); sys.exit(pytest.main(['-q', 'tests/test_cuda.py']))" \
      || echo "tests/test_cuda.py failed: see above (the bench runs anyway)" >&2
  fi
  "$VENV/bin/python" - <<'EOF'
import runpy
import sys

import onnxruntime

onnxruntime.preload_dlls()
sys.argv = ["bench/engine.py", "--device", "cuda", "--cuda-only", "--out", "bench/out/engine-cuda.json"]
runpy.run_path("bench/engine.py", run_name="__main__")  # exits with the bench's status
EOF
  ;;
*)
  sed -n '2,13p' "$0"
  exit 2
  ;;
esac
