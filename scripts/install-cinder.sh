#!/usr/bin/env bash
# Install what the Cinder tier of the tests (tests/real_cinder.py) and
# bench/cinder.py start: a one-node Ceph (mon, mgr, memstore OSD),
# RabbitMQ, MariaDB, qemu-storage-daemon + FUSE (the userspace attach route
# for hosts whose kernel has no rbd module), and Cinder itself in its own
# venv outside the repository. Debian 12, as root. Safe to run again: a
# second run checks and exits in a few seconds.
#
#   CINDER_VENV   where the venv goes (default /opt/template-agent/cinder-venv)
#   CINDER_PYTHON the interpreter it is made with (default /usr/bin/python3:
#                 Debian's rados/rbd bindings are built for it)
#
# Cinder 29.0.0 is pinned with every dependency (constraints/cinder.txt) to
# a set checked to work together (MariaDB, RabbitMQ, the RBD driver, noauth,
# attachments API). The venv is a plain one (not --system-site-packages:
# Debian's python3-openssl breaks with PyPI's cryptography); only Debian's
# rados and rbd modules are made visible to it, through a .pth file.
set -euo pipefail

CINDER_VENV=${CINDER_VENV:-/opt/template-agent/cinder-venv}
CINDER_PYTHON=${CINDER_PYTHON:-/usr/bin/python3}
CINDER_VERSION=29.0.0
STAMP="$CINDER_VENV/.template-agent-cinder-$CINDER_VERSION"
PACKAGES=(ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd
          rabbitmq-server mariadb-server qemu-utils qemu-block-extra
          qemu-system-common fuse3 uuid-runtime iproute2 curl python3-venv)
IMPORTS='import cinder.volume.drivers.rbd, rados, rbd, pymysql'

check() {
    [ -f "$STAMP" ] &&
        [ -x "$CINDER_VENV/bin/cinder-volume" ] &&
        [ -x "$CINDER_VENV/bin/cinder-manage" ] &&
        command -v ceph-mon ceph-osd ceph-mgr rbd mariadbd \
            qemu-storage-daemon >/dev/null &&
        [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] &&
        "$CINDER_VENV/bin/python" -c "$IMPORTS" 2>/dev/null
}

if check; then
    echo "install-cinder: ready ($CINDER_VENV)"
    exit 0
fi

source "$(dirname "$0")/lib.sh"
# no init system to start services with: keep apt from trying to start the
# daemons it installs (the tests start their own, with all state in a
# temp dir)
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt_install_missing install-cinder "${PACKAGES[@]}"

rm -f "$CINDER_VENV"/.template-agent-cinder-*
venv_pip_install install-cinder "$CINDER_VENV" "$CINDER_PYTHON" \
    "$(dirname "$0")/constraints/cinder.txt" "cinder==$CINDER_VERSION" PyMySQL
pyver=$("$CINDER_VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
bindings="$CINDER_VENV/ceph-bindings"
mkdir -p "$bindings"
for mod in rados rbd; do
    ln -sf "$(ls /usr/lib/python3/dist-packages/$mod.cpython-*.so | head -1)" \
        "$bindings/"
done
echo "$bindings" > "$CINDER_VENV/lib/python$pyver/site-packages/ceph-bindings.pth"
touch "$STAMP"
if ! check; then
    echo "install-cinder: installed, but Cinder, rados/rbd or a command" \
        "is missing" >&2
    "$CINDER_VENV/bin/python" -c "$IMPORTS" || true
    exit 1
fi
echo "install-cinder: ready ($CINDER_VENV)"
