#!/usr/bin/env bash
# Install a real nova (its libvirt image backends and image cache manager,
# driven in process by tests/nova_driver.py; no database, no service) into
# its own venv, outside the repository, for the real-peer tests
# (tests/real_nova.py, tests/test_nova_real.py). Debian 12, as root. Safe
# to run again: a second run checks and exits in about a second.
#
#   NOVA_VENV   where the venv goes (default /opt/template-agent/nova-venv)
#   NOVA_PYTHON the interpreter it is made with (default /usr/bin/python3)
#
# nova 34.0.0 installs from wheels (and pure-Python sdists) on Python 3.11:
# nothing is compiled. The versions are pinned, with every dependency
# (constraints/nova.txt), to a set checked to work together
# (imagebackend's cache() for qcow2, flat and raw, and imagecache's
# update()). The driver needs nothing at import that
# nova does not require itself: libvirt-python is only imported by the
# driver's connection code, which the tests never load.
set -euo pipefail

NOVA_VENV=${NOVA_VENV:-/opt/template-agent/nova-venv}
NOVA_PYTHON=${NOVA_PYTHON:-/usr/bin/python3}
NOVA_VERSION=34.0.0
STAMP="$NOVA_VENV/.template-agent-nova-$NOVA_VERSION"
IMPORTS='import nova.conf, nova.objects, nova.privsep.path, nova.virt.libvirt.imagebackend, nova.virt.libvirt.imagecache'

check() {
    [ -f "$STAMP" ] &&
        "$NOVA_VENV/bin/python" -W ignore -c "$IMPORTS" 2>/dev/null
}

if check; then
    echo "install-nova: ready ($NOVA_VENV)"
    exit 0
fi

source "$(dirname "$0")/lib.sh"
# qemu-img and cp: what nova's image backends run
apt_install_missing install-nova python3 python3-venv ca-certificates \
    qemu-utils coreutils

rm -f "$NOVA_VENV"/.template-agent-nova-*
venv_pip_install install-nova "$NOVA_VENV" "$NOVA_PYTHON" \
    "$(dirname "$0")/constraints/nova.txt" "nova==$NOVA_VERSION"
touch "$STAMP"
if ! check; then
    echo "install-nova: installed, but nova does not import in" \
        "$NOVA_VENV" >&2
    "$NOVA_VENV/bin/python" -c "$IMPORTS" 2>&1 | tail -20 || true
    exit 1
fi
echo "install-nova: ready ($NOVA_VENV)"
