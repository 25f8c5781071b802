#!/usr/bin/env bash
# Install a real Glance (its v2 API, run under gunicorn) and
# python-glanceclient into their own venv, outside the repository, for the
# real-peer tests (tests/real_glance.py) and bench/glance.py. Debian 12, as
# root. Safe to run again: a second run checks and exits in about a second.
#
#   GLANCE_VENV   where the venv goes (default /opt/template-agent/glance-venv)
#   GLANCE_PYTHON the interpreter it is made with (default /usr/bin/python3)
#
# The versions are pinned, with every dependency (constraints/glance.txt),
# to a set checked to work together (sqlite db_sync, file store, no-auth API, image upload/download,
# glance image-download, glance_store's cinder store for cinder://
# locations): Glance 33.0.0, gunicorn 27.0.1, python-glanceclient 4.13.0,
# python-cinderclient 9.10.0 and os-brick 7.1.1 (the cinder store imports
# both, or stays disabled).
set -euo pipefail

GLANCE_VENV=${GLANCE_VENV:-/opt/template-agent/glance-venv}
GLANCE_PYTHON=${GLANCE_PYTHON:-/usr/bin/python3}
GLANCE_VERSION=33.0.0
GUNICORN_VERSION=27.0.1
GLANCECLIENT_VERSION=4.13.0
CINDERCLIENT_VERSION=9.10.0
OS_BRICK_VERSION=7.1.1
STAMP="$GLANCE_VENV/.template-agent-glance-$GLANCE_VERSION-gunicorn-$GUNICORN_VERSION-glanceclient-$GLANCECLIENT_VERSION-cinderstore-$CINDERCLIENT_VERSION-$OS_BRICK_VERSION"
IMPORTS='import glance.common.wsgi_app, glance_store, glanceclient, cinderclient, os_brick'

check() {
    [ -f "$STAMP" ] &&
        [ -x "$GLANCE_VENV/bin/gunicorn" ] &&
        [ -x "$GLANCE_VENV/bin/glance-manage" ] &&
        [ -x "$GLANCE_VENV/bin/glance" ] &&
        [ -f "$GLANCE_VENV/etc/glance/glance-api-paste.ini" ] &&
        "$GLANCE_VENV/bin/python" -c "$IMPORTS" 2>/dev/null
}

if check; then
    echo "install-glance: ready ($GLANCE_VENV)"
    exit 0
fi

source "$(dirname "$0")/lib.sh"
apt_install_missing install-glance python3 python3-venv python3-dev gcc \
    ca-certificates curl

rm -f "$GLANCE_VENV"/.template-agent-glance-*
venv_pip_install install-glance "$GLANCE_VENV" "$GLANCE_PYTHON" \
    "$(dirname "$0")/constraints/glance.txt" "glance==$GLANCE_VERSION" \
    "gunicorn==$GUNICORN_VERSION" "python-glanceclient==$GLANCECLIENT_VERSION" \
    "python-cinderclient==$CINDERCLIENT_VERSION" "os-brick==$OS_BRICK_VERSION"
touch "$STAMP"
if ! check; then
    echo "install-glance: installed, but Glance does not import or a" \
        "command is missing in $GLANCE_VENV" >&2
    "$GLANCE_VENV/bin/python" -c "$IMPORTS" || true
    exit 1
fi
echo "install-glance: ready ($GLANCE_VENV)"
