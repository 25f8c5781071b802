#!/usr/bin/env bash
# Install what the Cinder tier of the tests (tests/real_cinder.py) and
# bench/cinder.py start: a one-node Ceph (mon, mgr, memstore OSD),
# RabbitMQ, MariaDB, qemu-storage-daemon + FUSE (the userspace attach route
# for hosts whose kernel has no rbd module), and Cinder itself in its own
# venv outside the repository. Debian 12, as root. Safe to run again: a
# second run checks and exits in about a second.
#
#   CINDER_VENV   where the venv goes (default /opt/template-agent/cinder-venv)
#   CINDER_PYTHON the interpreter it is made with (default /usr/bin/python3:
#                 Debian's rados/rbd bindings are built for it)
#
# Cinder 29.0.0 is pinned with every dependency to a set checked to work
# together (MariaDB, RabbitMQ, the RBD driver, noauth, attachments API).
# The venv is a plain one (not --system-site-packages: Debian's
# python3-openssl breaks with PyPI's cryptography); only Debian's rados
# and rbd modules are made visible to it, through a .pth file.
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
CLEANUP=()
trap 'rm -f "${CLEANUP[@]}"' EXIT
# no init system to start services with: keep apt from trying to start the
# daemons it installs (the tests start their own, with all state in a
# temp dir)
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    CLEANUP+=(/usr/sbin/policy-rc.d)
fi
apt_install_missing install-cinder "${PACKAGES[@]}"

if [ ! -x "$CINDER_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$CINDER_VENV")"
    "$CINDER_PYTHON" -m venv "$CINDER_VENV"
fi
rm -f "$CINDER_VENV"/.template-agent-cinder-*
pyver=$("$CINDER_VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
bindings="$CINDER_VENV/ceph-bindings"
mkdir -p "$bindings"
for mod in rados rbd; do
    ln -sf "$(ls /usr/lib/python3/dist-packages/$mod.cpython-*.so | head -1)" \
        "$bindings/"
done
echo "$bindings" > "$CINDER_VENV/lib/python$pyver/site-packages/ceph-bindings.pth"

CONSTRAINTS=$(mktemp /tmp/cinder-constraints.XXXXXX)
CLEANUP+=("$CONSTRAINTS")
LOG="$CINDER_VENV/pip-install.log"
cat > "$CONSTRAINTS" <<'EOF'
alembic==1.20.1
amqp==5.4.2
attrs==26.1.0
automaton==3.5.0
autopage==0.6.0
bcrypt==5.0.0
cachetools==8.0.1
castellan==5.8.0
certifi==2026.10.18
cffi==2.1.1
charset-normalizer==3.5.2
cliff==4.17.0
cmd2==4.3.1
cotyledon==2.2.0
cryptography==50.0.2
cursive==0.3.1
debtcollector==3.1.0
decorator==5.3.1
distro==1.9.0
dnspython==2.9.2
dogpile.cache==1.5.0
eventlet==0.41.3
fasteners==0.20
futurist==3.5.0
greenlet==3.5.6
idna==3.20
invoke==3.0.3
iso8601==2.1.0
Jinja2==3.1.6
jsonpatch==1.47
jsonpointer==3.12
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
keystoneauth1==5.18.1
keystonemiddleware==13.0.1
kombu==5.7.0
lxml==6.1.3
Mako==1.4.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
msgpack==1.2.4
netaddr==1.3.0
networkx==3.6.1
os-brick==7.1.1
os-service-types==1.9.0
oslo.cache==4.3.0
oslo.concurrency==7.6.1
oslo.config==10.7.0
oslo.context==6.5.0
oslo.db==18.1.1
oslo.i18n==6.9.0
oslo.log==8.3.2
oslo.messaging==18.3.1
oslo.metrics==0.17.0
oslo.middleware==8.2.0
oslo.policy==6.0.1
oslo.privsep==3.12.0
oslo.reports==3.9.0
oslo.rootwrap==7.10.0
oslo.serialization==5.11.0
oslo.service==4.8.0
oslo.upgradecheck==2.8.0
oslo.utils==10.2.0
oslo.versionedobjects==3.12.0
oslo.vmware==4.10.1
osprofiler==4.4.0
packaging==26.3
paramiko==5.1.0
Paste==3.10.1
PasteDeploy==3.1.0
pbr==7.1.3
prettytable==3.18.0
prometheus_client==0.26.0
prompt_toolkit==3.0.53
psutil==7.2.2
pycadf==4.1.0
pycparser==3.12
pydot==4.0.1
Pygments==2.21.0
PyJWT==2.15.1
PyMySQL==1.2.4
PyNaCl==1.6.2
pyOpenSSL==26.4.0
pyparsing==3.3.3
pyperclip==1.11.0
python-barbicanclient==7.6.0
python-dateutil==4.0.0
python-glanceclient==4.13.0
python-keystoneclient==6.0.0
python-novaclient==18.13.1
pyudev==0.24.5
PyYAML==6.0.3
referencing==0.37.0
repoze-lru==0.8
requests==2.34.2
rfc3986==2.0.0
rich==15.0.0
rich-argparse==1.8.0
Routes==2.5.1
rpds-py==2026.9.1
rtslib-fb==2.2.4
setproctitle==1.3.8
six==1.17.0
SQLAlchemy==2.1.9
statsd==4.0.1
stevedore==5.10.0
suds-community==1.2.0
tabulate==0.10.0
taskflow==6.5.0
tenacity==9.2.1
testresources==2.1.2
testscenarios==0.7.0
tooz==9.1.0
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
vine==5.1.0
voluptuous==0.16.0
warlock==2.1.0
wcwidth==0.9.4
WebOb==1.8.11
wrapt==2.5.2
yappi==1.7.6
zstd==1.5.7.2
EOF

echo "install-cinder: pip install cinder==$CINDER_VERSION PyMySQL" \
    "into $CINDER_VENV (about a minute)"
if ! "$CINDER_VENV/bin/pip" install -q --disable-pip-version-check \
        -c "$CONSTRAINTS" "cinder==$CINDER_VERSION" PyMySQL > "$LOG" 2>&1; then
    tail -40 "$LOG"
    echo "install-cinder: pip install failed (full log: $LOG)" >&2
    exit 1
fi
touch "$STAMP"
if ! check; then
    echo "install-cinder: installed, but Cinder, rados/rbd or a command" \
        "is missing" >&2
    "$CINDER_VENV/bin/python" -c "$IMPORTS" || true
    exit 1
fi
echo "install-cinder: ready ($CINDER_VENV)"
