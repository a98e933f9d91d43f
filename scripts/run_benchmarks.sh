#!/usr/bin/env bash
# Set up from scratch (scripts/setup_env.sh), then run the benchmarks. Sizes follow the
# machine (GPU: 224x224, batch 32 and 128, bf16; CPU: small); extra arguments go to pytest
# (for example --compile, --batch 64, --dtype fp32,bf16). JSON goes to benchmarks/results/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_env.sh"
cd "$root"
device=$("$HIFUSE_PYTHON" -c "import torch, re; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print(re.sub(r'[^a-z0-9]+', '-', n.lower()).strip('-'))")
mkdir -p "benchmarks/results/$device"
json="benchmarks/results/$device/$(date -u +%Y%m%d-%H%M%S).json"
"$HIFUSE_PYTHON" -m pytest benchmarks -p no:cacheprovider --benchmark-only \
  --benchmark-json "$json" --benchmark-columns=median,iqr,rounds "$@"
"$HIFUSE_PYTHON" scripts/summarize.py "$json"
