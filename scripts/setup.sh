#!/usr/bin/env bash
# Install what the agent and its tests need on a Debian machine (as root),
# and the project itself into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
apt_install_missing setup qemu-utils libvirt-dev pkg-config gcc python3-venv \
    python3-dev util-linux fdisk e2fsprogs xfsprogs curl time systemd \
    iproute2 openssl

# Debian's interpreter, not one under a home directory: the agent drops
# to the owner of instances_path (e.g. nova), who must be able to read the
# standard library it may still import
PYTHON=${PYTHON:-/usr/bin/python3}
home=$(dirname "$(readlink -f "$PYTHON")")
if [ -x .venv/bin/python ] && ! grep -qx "home = $home" .venv/pyvenv.cfg; then
    echo "setup: recreating .venv on $PYTHON"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,cinder,p2p]' \
    > .venv/pip-install.log 2>&1 || { cat .venv/pip-install.log; exit 1; }
echo "setup: ready (.venv/bin/template-agent)"
