#!/usr/bin/env bash
# Install a real Glance (its v2 API, run under gunicorn) and
# python-glanceclient into their own venv, outside the repository, for the
# real-peer tests (tests/real_glance.py) and bench/glance.py. Debian 12, as
# root. Safe to run again: a second run checks and exits in about a second.
#
#   GLANCE_VENV   where the venv goes (default /opt/template-agent/glance-venv)
#   GLANCE_PYTHON the interpreter it is made with (default /usr/bin/python3)
#
# The versions are pinned, with every dependency, to a set checked to work
# together (sqlite db_sync, file store, no-auth API, image upload/download,
# glance image-download): Glance 33.0.0, gunicorn 27.0.1,
# python-glanceclient 4.13.0.
set -euo pipefail

GLANCE_VENV=${GLANCE_VENV:-/opt/template-agent/glance-venv}
GLANCE_PYTHON=${GLANCE_PYTHON:-/usr/bin/python3}
GLANCE_VERSION=33.0.0
GUNICORN_VERSION=27.0.1
GLANCECLIENT_VERSION=4.13.0
STAMP="$GLANCE_VENV/.template-agent-glance-$GLANCE_VERSION-gunicorn-$GUNICORN_VERSION-glanceclient-$GLANCECLIENT_VERSION"

check() {
    [ -f "$STAMP" ] &&
        [ -x "$GLANCE_VENV/bin/gunicorn" ] &&
        [ -x "$GLANCE_VENV/bin/glance-manage" ] &&
        [ -x "$GLANCE_VENV/bin/glance" ] &&
        [ -f "$GLANCE_VENV/etc/glance/glance-api-paste.ini" ] &&
        "$GLANCE_VENV/bin/python" -c 'import glance.common.wsgi_app, glance_store, glanceclient' 2>/dev/null
}

if check; then
    echo "install-glance: ready ($GLANCE_VENV)"
    exit 0
fi

source "$(dirname "$0")/lib.sh"
apt_install_missing install-glance python3 python3-venv python3-dev gcc \
    ca-certificates curl

if [ ! -x "$GLANCE_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$GLANCE_VENV")"
    "$GLANCE_PYTHON" -m venv "$GLANCE_VENV"
fi
rm -f "$GLANCE_VENV"/.template-agent-glance-*

CONSTRAINTS=$(mktemp /tmp/glance-constraints.XXXXXX)
LOG="$GLANCE_VENV/pip-install.log"
trap 'rm -f "$CONSTRAINTS"' EXIT
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
defusedxml==0.7.1
dnspython==2.9.2
dogpile.cache==1.5.0
eventlet==0.41.3
fasteners==0.20
futurist==3.5.0
glance==33.0.0
glance_store==5.7.0
greenlet==3.5.6
gunicorn==27.0.1
httplib2==0.32.1
idna==3.20
importlib_metadata==10.2.0
iso8601==2.1.0
Jinja2==3.1.6
jmespath==1.1.0
jsonpatch==1.47
jsonpointer==3.12
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
keystoneauth1==5.18.1
keystonemiddleware==13.0.1
kombu==5.7.0
lazy-importer==0.1.0
Mako==1.4.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
msgpack==1.2.4
netaddr==1.3.0
networkx==3.6.1
openstacksdk==4.22.0
os-service-types==1.9.0
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
oslo.reports==3.9.0
oslo.serialization==5.11.0
oslo.service==4.8.0
oslo.upgradecheck==2.8.0
oslo.utils==10.2.0
osprofiler==4.4.0
packaging==26.3
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
pydot==4.0.1
Pygments==2.21.0
PyJWT==2.15.1
pyOpenSSL==26.4.0
pyparsing==3.3.3
pyperclip==1.11.0
python-barbicanclient==7.6.0
python-dateutil==4.0.0
python-glanceclient==4.13.0
python-keystoneclient==6.0.0
PyYAML==6.0.3
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
simplegeneric==0.8.1
six==1.17.0
SQLAlchemy==2.1.9
statsd==4.0.1
stevedore==5.10.0
taskflow==6.5.0
tenacity==9.2.1
testresources==2.1.2
testscenarios==0.7.0
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
vine==5.1.0
warlock==2.1.0
wcwidth==0.9.4
WebOb==1.8.11
wrapt==2.5.2
WSME==0.13.0
yappi==1.7.6
zipp==4.1.2
EOF

echo "install-glance: pip install glance==$GLANCE_VERSION" \
    "gunicorn==$GUNICORN_VERSION python-glanceclient==$GLANCECLIENT_VERSION" \
    "into $GLANCE_VENV (about a minute)"
if ! "$GLANCE_VENV/bin/pip" install -q --disable-pip-version-check \
        -c "$CONSTRAINTS" "glance==$GLANCE_VERSION" \
        "gunicorn==$GUNICORN_VERSION" \
        "python-glanceclient==$GLANCECLIENT_VERSION" > "$LOG" 2>&1; then
    grep -v 'is ignored: it is neither a file nor a directory' "$LOG" \
        | tail -40
    echo "install-glance: pip install failed (full log: $LOG)" >&2
    exit 1
fi
touch "$STAMP"
if ! check; then
    echo "install-glance: installed, but Glance does not import or a" \
        "command is missing in $GLANCE_VENV" >&2
    "$GLANCE_VENV/bin/python" -c 'import glance.common.wsgi_app, glance_store, glanceclient' || true
    exit 1
fi
echo "install-glance: ready ($GLANCE_VENV)"
