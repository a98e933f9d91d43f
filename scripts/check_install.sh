#!/usr/bin/env bash
# Installs hifuse as a user does, `pip install .`, into a fresh environment that already holds
# a torch other than the newest (default: torch==2.13.0, a CPU build), and checks that the
# native ops load and compute there. pip builds in an isolated environment; the library must
# still be built against the torch of the environment it lands in.
#
#   bash scripts/check_install.sh ["torch==X.Y.Z"]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
torch_req=${1:-torch==2.13.0}
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "check_install: fresh environment with $torch_req"
"$python" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" "$torch_req" numpy
echo "check_install: pip install . (build isolation, as a user types it)"
HIFUSE_NO_CUDA=1 HIFUSE_REQUIRE_CUDA=0 "${pip[@]}" "$root"
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import torch
import hifuse
import hifuse_kernels
from hifuse_kernels.layer_norm_cf import layer_norm_cf, layer_norm_cf_ref

error = hifuse_kernels.native_load_error()
assert error is None, f"native ops do not load under torch {torch.__version__}: {error}"
x, w, b = torch.randn(2, 8, 3, 5), torch.randn(8), torch.randn(8)
torch.testing.assert_close(layer_norm_cf(x, w, b), layer_norm_cf_ref(x, w, b, 1e-6))
print(f"check_install: native ops load and agree with the reference under torch {torch.__version__}")
PY
