#!/usr/bin/env bash
# Install what the agent and its tests need on a Debian machine (as root),
# and the project itself into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
apt_install_missing setup qemu-utils libvirt-dev pkg-config gcc python3-venv \
    python3-dev util-linux fdisk e2fsprogs xfsprogs curl time systemd

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
    > .venv/pip-install.log 2>&1 || { cat .venv/pip-install.log; exit 1; }
echo "setup: ready (.venv/bin/template-agent)"
