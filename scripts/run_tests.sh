#!/usr/bin/env bash
# Set up from scratch (scripts/setup_env.sh), then run the test suite on every core
# (pytest-xdist; HIFUSE_TEST_WORKERS=N or 0 to choose). Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$HIFUSE_PYTHON" -m pytest tests -p no:cacheprovider -rs -n "${HIFUSE_TEST_WORKERS:-auto}" "$@"
