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
# nothing is compiled. The versions are pinned, with every dependency, to a
# set checked to work together (imagebackend's cache() for qcow2, flat and
# raw, and imagecache's update()). The driver needs nothing at import that
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

if [ ! -x "$NOVA_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$NOVA_VENV")"
    "$NOVA_PYTHON" -m venv "$NOVA_VENV"
fi
rm -f "$NOVA_VENV"/.template-agent-nova-*

CONSTRAINTS=$(mktemp /tmp/nova-constraints.XXXXXX)
LOG="$NOVA_VENV/pip-install.log"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<'EOF'
alembic==1.20.1
amqp==5.4.2
async-timeout==5.0.1
attrs==26.1.0
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
dnspython==2.9.2
dogpile.cache==1.5.0
eventlet==0.41.3
fasteners==0.20
fixtures==4.3.2
futurist==3.5.0
greenlet==3.5.6
idna==3.20
invoke==3.0.3
iso8601==2.1.0
Jinja2==3.1.6
jmespath==1.1.0
jsonpatch==1.47
jsonpointer==3.12
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
jwcrypto==1.6.1
keystoneauth1==5.18.1
keystonemiddleware==13.0.1
kombu==5.7.0
lxml==6.1.3
Mako==1.4.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
microversion_parse==2.1.0
msgpack==1.2.4
netaddr==1.3.0
nova==34.0.0
numpy==2.4.6
openstacksdk==4.22.0
os-brick==7.1.1
os-resource-classes==1.1.0
os-service-types==1.9.0
os-traits==3.9.0
os_vif==5.3.0
osc-lib==4.7.0
oslo.cache==4.3.0
oslo.concurrency==7.6.1
oslo.config==10.7.0
oslo.context==6.5.0
oslo.db==18.1.1
oslo.i18n==6.9.0
oslo.limit==2.12.0
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
ovs==4.0.0
ovsdbapp==3.0.0
packaging==26.3
paramiko==5.1.0
Paste==3.10.1
PasteDeploy==3.1.0
pbr==7.1.3
platformdirs==4.14.7
prettytable==3.18.0
prometheus_client==0.26.0
prompt_toolkit==3.0.53
psutil==7.2.2
pycadf==4.1.0
pycparser==3.12
Pygments==2.21.0
PyJWT==2.15.1
PyNaCl==1.6.2
pyOpenSSL==26.4.0
pyparsing==3.3.3
pyperclip==1.11.0
pyroute2==0.9.7
python-barbicanclient==7.6.0
python-cinderclient==9.10.0
python-dateutil==4.0.0
python-glanceclient==4.13.0
python-keystoneclient==6.0.0
python-neutronclient==14.0.0
PyYAML==6.0.3
redis==8.1.0
referencing==0.37.0
repoze-lru==0.8
requests==2.34.2
retrying==1.4.2
rfc3986==2.0.0
rich==15.0.0
rich-argparse==1.8.0
Routes==2.5.1
rpds-py==2026.9.1
setproctitle==1.3.8
six==1.17.0
sortedcontainers==2.4.0
SQLAlchemy==2.1.9
statsd==4.0.1
stevedore==5.10.0
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
websockify==0.13.0
wrapt==2.5.2
yappi==1.7.6
EOF

echo "install-nova: pip install nova==$NOVA_VERSION into $NOVA_VENV" \
    "(about a minute)"
if ! "$NOVA_VENV/bin/pip" install -q --disable-pip-version-check \
        -c "$CONSTRAINTS" "nova==$NOVA_VERSION" > "$LOG" 2>&1; then
    tail -40 "$LOG"
    echo "install-nova: pip install failed (full log: $LOG)" >&2
    exit 1
fi
touch "$STAMP"
if ! check; then
    echo "install-nova: installed, but nova does not import in" \
        "$NOVA_VENV" >&2
    "$NOVA_VENV/bin/python" -c "$IMPORTS" 2>&1 | tail -20 || true
    exit 1
fi
echo "install-nova: ready ($NOVA_VENV)"
