#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run both test tiers: the fast one
# (pure logic, -m unit) and the real one (-m real: real qemu-img, loop
# devices, libvirtd + QEMU, Glance, nova, Cinder on Ceph, as root). Extra
# arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/pytest -q -m unit tests "$@"
# the real peers the real tier starts: libvirtd + QEMU, Glance and nova
# in their own venvs, and Cinder on Ceph (with RabbitMQ and MariaDB)
bash scripts/install-libvirtd.sh
bash scripts/install-glance.sh
bash scripts/install-nova.sh
bash scripts/install-cinder.sh
exec .venv/bin/pytest -q -rs -m real tests "$@"
