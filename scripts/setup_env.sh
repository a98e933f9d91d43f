#!/usr/bin/env bash
# Sets up everything hifuse needs, from scratch, into a virtual environment (.venv by
# default) and builds the native extension. Sourced by run_tests.sh and run_benchmarks.sh.
#
#   HIFUSE_VENV=path   where the environment goes (default: .venv in the project)
#   HIFUSE_VENV=none   use the current python as it is (torch must be installed there)
#   HIFUSE_TORCH       pip requirement for torch when it is missing (default "torch>=2.6")
# Build settings (HIFUSE_NO_CUDA, HIFUSE_CUDA_ARCHS, CUDA_HOME, MAX_JOBS) are read by setup.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HIFUSE_VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ "$venv" != none ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "hifuse setup: creating $venv"
    "$python" -m venv "$venv"
  fi
  python="$venv/bin/python"
fi
pip=("$python" -m pip install --disable-pip-version-check -q)

if ! "$python" -c "import torch" 2>/dev/null; then
  echo "hifuse setup: installing ${HIFUSE_TORCH:-torch>=2.6} (with triton)"
  "${pip[@]}" "${HIFUSE_TORCH:-torch>=2.6}"
fi
tools=(setuptools wheel ninja)
command -v cmake >/dev/null || tools+=("cmake>=3.18")
"${pip[@]}" "${tools[@]}"

echo "hifuse setup: building and installing hifuse (editable) with its native extension"
"${pip[@]}" --no-build-isolation -e "$root[test,train,export]"
"$python" -c "import hifuse_kernels as k; print('hifuse setup: native ops', k.native_load_error() or 'built and loaded')"
export HIFUSE_PYTHON="$python"
