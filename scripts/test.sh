#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on real components.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the real peers the tests start: libvirtd + QEMU, Glance and nova in their
# own venvs
bash scripts/install-libvirtd.sh
bash scripts/install-glance.sh
bash scripts/install-nova.sh
exec .venv/bin/pytest -q -rs tests "$@"
