#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on real components.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-glance.sh   # real Glance in its own venv, for tests/test_glance_real.py
exec .venv/bin/pytest -q -rs tests "$@"
