"""A real Glance (v2 API under gunicorn, sqlite, file store, no auth) on
loopback, for integration tests and ``bench/glance.py``.

Glance lives in its own venv, installed by ``scripts/install-glance.sh``
(``$GLANCE_VENV``, default ``/opt/template-agent/glance-venv``); the fixtures
run that script when the venv is not ready. If Glance cannot be installed or
started, they *fail* with the reason and the tail of the log: real-peer tests
are never skipped.

Use::

    from tests.real_glance import real_glance   # noqa: F401 (a fixture)

    def test_x(real_glance):
        image = real_glance.create_image('name', path, disk_format='qcow2')
        real_glance.url                       # http://127.0.0.1:<port>

``real_glance`` is one server for the session. ``own_real_glance`` is a
server of the test's own, for tests that stop, kill or freeze it
(``.stop()``, ``.kill()``, ``.freeze()``, ``.thaw()``, ``.start()``). Both
stop gunicorn by its process group (master and workers) and remove their
files at the end. ``RealGlance`` works without pytest (the bench uses it).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SCRIPT = os.path.join(REPO, 'scripts', 'install-glance.sh')
DEFAULT_VENV = '/opt/template-agent/glance-venv'
START_TIMEOUT = 90.0
PATCH_TYPE = 'application/openstack-images-v2.1-json-patch'

GLANCE_API_CONF = """\
[DEFAULT]
bind_host = 127.0.0.1
enabled_backends = fs:file
[database]
connection = sqlite:///{dir}/glance.sqlite
[paste_deploy]
flavor =
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {dir}/images/
[os_glance_staging_store]
filesystem_store_datadir = {dir}/staging/
[os_glance_tasks_store]
filesystem_store_datadir = {dir}/tasks/
[oslo_policy]
enforce_new_defaults = false
policy_file = {dir}/policy.yaml
"""

# the no-auth context is no admin: let it make images public (as an admin
# would) and community
POLICY = """\
"publicize_image": ""
"communitize_image": ""
"""


# With the cinder store (``RealGlance.enable_cinder_store``): Glance
# accepts ``cinder://<volume-id>`` locations (glance_store's cinder driver
# asks Cinder for the volume) and shows them, as Cinder's create-from-image
# needs to clone an image volume. No cinder_volume_type: glance_store 5.7
# then asks Cinder for its types at start without a context and fails; a
# volume of Cinder's default type is the store's.
CINDER_STORE_BACKENDS = """\
enabled_backends = fs:file, cinder:cinder
show_multiple_locations = true
show_image_direct_url = true
"""
CINDER_STORE_CONF = """\
[cinder]
cinder_catalog_info = volumev3::publicURL
cinder_state_transition_timeout = 60
"""

# Stands in for keystonemiddleware's auth_token (there is no Keystone
# here): a token ``<user>:<project>`` (Cinder's noauth convention) makes an
# authenticated admin of <project> whose service catalog names the test
# Cinder, which glance_store's cinder driver needs to check a cinder://
# location; a request without a token gets Glance's no-auth context, as
# before.
TOKEN_CONTEXT = """\
import json

from glance.api.middleware import context

CINDER_URL = {cinder_url!r}


class TokenContextMiddleware(context.ContextMiddleware):
    def process_request(self, req):
        user, sep, project = (req.headers.get('X-Auth-Token') or
                              '').partition(':')
        if not sep:
            return context.UnauthenticatedContextMiddleware.process_request(
                self, req)
        req.headers['X-Identity-Status'] = 'Confirmed'
        req.headers['X-User-Id'] = user
        req.headers['X-Project-Id'] = project
        req.headers['X-Roles'] = 'admin,member,reader'
        req.headers['X-Service-Catalog'] = json.dumps([{{
            'type': 'volumev3', 'name': 'cinderv3', 'endpoints': [{{
                'publicURL': CINDER_URL % {{'project_id': project}}}}]}}])
        return super().process_request(req)
"""


class GlanceError(Exception):
    """Glance could not be installed, started or asked; with its log."""


def glance_venv():
    return os.environ.get('GLANCE_VENV', DEFAULT_VENV)


def ensure_installed(venv=None):
    """Run ``scripts/install-glance.sh`` (quick when already installed);
    return the venv path. Raises GlanceError with the script's output."""
    venv = venv or glance_venv()
    proc = subprocess.run(['bash', INSTALL_SCRIPT], capture_output=True,
                          text=True, env=dict(os.environ, GLANCE_VENV=venv))
    if proc.returncode != 0:
        raise GlanceError('scripts/install-glance.sh failed (exit %d):\n%s%s'
                          % (proc.returncode, _tail(proc.stdout, 30),
                             _tail(proc.stderr, 30)))
    return venv


def _tail(text, lines):
    return '\n'.join((text or '').splitlines()[-lines:]) + '\n'


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class RealGlance:
    """One Glance API server in ``workdir`` (made if None, removed by
    ``cleanup()``), on ``127.0.0.1:<port>``; the port is kept across
    ``stop()``/``start()`` so that agent configs stay valid."""

    def __init__(self, venv=None, workdir=None, port=None, workers=1,
                 threads=4):
        self.venv = venv or glance_venv()
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix='real-glance-')
        self.port = port or free_port()
        self.url = 'http://127.0.0.1:%d' % self.port
        self.workers = workers
        self.threads = threads
        self.log_path = os.path.join(self.workdir, 'glance-api.log')
        self.proc = None
        self.pgid = None
        self.frozen = False
        self.session = requests.Session()
        self._configured = False

    # -- lifecycle ------------------------------------------------------------
    def _bin(self, name):
        return os.path.join(self.venv, 'bin', name)

    def configure(self):
        """Write glance-api.conf, the paste ini and the policy, and create
        the database (once)."""
        if self._configured:
            return
        for sub in ('images', 'staging', 'tasks'):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        paste = os.path.join(self.venv, 'etc', 'glance',
                             'glance-api-paste.ini')
        if not os.path.isfile(paste):
            raise GlanceError('%s is missing: is Glance installed in %s? '
                              '(scripts/install-glance.sh)' % (paste,
                                                               self.venv))
        shutil.copy(paste, os.path.join(self.workdir,
                                        'glance-api-paste.ini'))
        self.conf_path = os.path.join(self.workdir, 'glance-api.conf')
        with open(self.conf_path, 'w') as f:
            f.write(GLANCE_API_CONF.format(dir=self.workdir))
        with open(os.path.join(self.workdir, 'policy.yaml'), 'w') as f:
            f.write(POLICY)
        proc = subprocess.run(
            [self._bin('glance-manage'), '--config-file', self.conf_path,
             'db_sync'], capture_output=True, text=True, cwd=self.workdir,
            env=self._env(), timeout=300)
        if proc.returncode != 0:
            raise GlanceError('glance-manage db_sync failed (exit %d):\n%s'
                              % (proc.returncode,
                                 _tail(proc.stdout + proc.stderr, 30)))
        self._configured = True

    def enable_cinder_store(self, cinder_url):
        """Restart with glance_store's cinder store and locations shown
        (``CINDER_STORE_CONF``) and the token stand-in (``TOKEN_CONTEXT``)
        whose catalog names ``cinder_url`` (``%(project_id)s`` in it is the
        token's project). Same port, same images."""
        self.configure()
        self.stop()
        with open(os.path.join(self.workdir, 'token_context.py'), 'w') as f:
            f.write(TOKEN_CONTEXT.format(cinder_url=cinder_url))
        paste = os.path.join(self.workdir, 'glance-api-paste.ini')
        with open(paste) as f:
            text = f.read()
        text = text.replace(' unauthenticated-context ', ' token-context ')
        text += ('\n[filter:token-context]\npaste.filter_factory = '
                 'token_context:TokenContextMiddleware.factory\n')
        with open(paste, 'w') as f:
            f.write(text)
        with open(self.conf_path) as f:
            text = f.read()
        text = text.replace('enabled_backends = fs:file\n',
                            CINDER_STORE_BACKENDS)
        with open(self.conf_path, 'w') as f:
            f.write(text + CINDER_STORE_CONF)
        self.cinder_store = True
        self.start()

    def _env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('OS_', 'PYTHON'))}
        if getattr(self, 'cinder_store', False):
            env['PYTHONPATH'] = self.workdir   # token_context.py
        env['OS_GLANCE_CONFIG_DIR'] = self.workdir
        env['PATH'] = os.path.join(self.venv, 'bin') + os.pathsep + \
            env.get('PATH', '/usr/bin:/bin')
        return env

    def start(self, timeout=START_TIMEOUT):
        """Start gunicorn in its own process group and wait until
        ``GET /v2/images`` answers from it."""
        if self.running:
            return self
        self.configure()
        log = open(self.log_path, 'ab')
        try:
            self.proc = subprocess.Popen(
                [self._bin('gunicorn'), '--no-control-socket',
                 '-w', str(self.workers), '--threads', str(self.threads),
                 '--timeout', '300', '--graceful-timeout', '5',
                 '-b', '127.0.0.1:%d' % self.port,
                 'glance.wsgi.api:application'],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.workdir, env=self._env(), start_new_session=True)
        finally:
            log.close()
        self.pgid = self.proc.pid
        self.frozen = False
        mark = 'Listening at: %s (%d)' % (self.url, self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise GlanceError('gunicorn exited with %s while starting:\n%s'
                                  % (self.proc.returncode, self.log_tail()))
            if mark in self._log_text():
                try:
                    resp = self.session.get(self.url + '/v2/images',
                                            timeout=5)
                    if resp.status_code == 200:
                        return self
                except requests.RequestException:
                    pass
            elif 'Connection in use' in self._log_text():
                self._kill_group()
                raise GlanceError('port %d is taken by another process:\n%s'
                                  % (self.port, self.log_tail()))
            if time.monotonic() > deadline:
                self._kill_group()
                raise GlanceError('Glance did not answer GET /v2/images '
                                  'within %.0f s:\n%s' % (timeout,
                                                          self.log_tail()))
            time.sleep(0.2)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=15):
        """Stop master and workers (SIGTERM to the group, SIGKILL after
        ``timeout``), by the process group of the master's PID."""
        if self.proc is None:
            return
        self.thaw()
        try:
            os.killpg(self.pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self._wait_group(timeout)
        self._kill_group()

    def kill(self):
        """Crash it: SIGKILL to master and workers at once."""
        if self.proc is None:
            return
        self._kill_group()

    def freeze(self):
        """SIGSTOP every process of the group: connections are accepted by
        the kernel but nothing answers (a hung Glance)."""
        if self.running:
            os.killpg(self.pgid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self):
        if self.frozen and self.pgid:
            try:
                os.killpg(self.pgid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.frozen = False

    def _kill_group(self):
        if self.pgid is None:
            return
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait_group(10)
        self.proc = None
        self.pgid = None
        self.frozen = False

    def _wait_group(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    continue
            if not _group_alive(self.pgid):
                return True
            time.sleep(0.05)
        return False

    def cleanup(self):
        """Stop it and remove its files (when it made its directory)."""
        try:
            self.stop()
        finally:
            self.session.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def _log_text(self):
        try:
            with open(self.log_path, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def log_tail(self, lines=40):
        return _tail(self._log_text(), lines)

    # -- the v2 API -----------------------------------------------------------
    def _check(self, resp, what):
        if resp.status_code >= 400:
            raise GlanceError('%s: HTTP %d: %s' % (
                what, resp.status_code, resp.text[-500:]))
        return resp

    def create_image(self, name, path=None, disk_format='raw',
                     container_format='bare', visibility=None, owner=None,
                     image_id=None, **properties):
        """``POST /v2/images`` and, with ``path``, ``PUT .../file``;
        returns the image record as Glance has it afterwards."""
        body = dict(properties, name=name, disk_format=disk_format,
                    container_format=container_format)
        if visibility:
            body['visibility'] = visibility
        if owner:
            body['owner'] = owner
        if image_id:
            body['id'] = image_id
        record = self._check(self.session.post(
            self.url + '/v2/images', json=body, timeout=30),
            'create image %s' % name).json()
        if path is not None:
            self.upload(record['id'], path)
            record = self.get(record['id'])
        return record

    def upload(self, image_id, path):
        with open(path, 'rb') as f:
            self._check(self.session.put(
                '%s/v2/images/%s/file' % (self.url, image_id), data=f,
                headers={'Content-Type': 'application/octet-stream'},
                timeout=600), 'upload %s' % image_id)

    def get(self, image_id):
        return self._check(self.session.get(
            '%s/v2/images/%s' % (self.url, image_id), timeout=30),
            'get image %s' % image_id).json()

    def images(self):
        return self._check(self.session.get(
            self.url + '/v2/images', timeout=30), 'list images').json()[
                'images']

    def patch(self, image_id, ops):
        return self._check(self.session.patch(
            '%s/v2/images/%s' % (self.url, image_id), data=json.dumps(ops),
            headers={'Content-Type': PATCH_TYPE}, timeout=30),
            'patch image %s' % image_id).json()

    def update(self, image_id, **properties):
        """Set properties (JSON-patch ``add``, which also replaces); Glance
        bumps ``updated_at`` (to the second)."""
        return self.patch(image_id, [
            {'op': 'add', 'path': '/' + k, 'value': v}
            for k, v in properties.items()])

    def set_visibility(self, image_id, visibility):
        return self.patch(image_id, [{'op': 'replace', 'path': '/visibility',
                                      'value': visibility}])

    def delete(self, image_id):
        self._check(self.session.delete(
            '%s/v2/images/%s' % (self.url, image_id), timeout=30),
            'delete image %s' % image_id)

    def file_url(self, image_id):
        return '%s/v2/images/%s/file' % (self.url, image_id)


def start_real_glance(workdir=None):
    """Install if needed and start one; GlanceError on any failure."""
    venv = ensure_installed()
    glance = RealGlance(venv=venv, workdir=workdir)
    try:
        glance.start()
    except BaseException:
        glance.cleanup()
        raise
    return glance


# -- pytest fixtures ----------------------------------------------------------
try:
    import pytest
except ImportError:  # the bench imports this module without pytest
    pytest = None

if pytest is not None:
    def _started(tmp_dir):
        try:
            return start_real_glance(workdir=str(tmp_dir))
        except GlanceError as exc:
            reason = str(exc)
        # outside the except block: one message, no chained traceback
        pytest.fail('real Glance cannot be installed or started: %s'
                    % reason, pytrace=False)

    def _finish(glance, tmp_dir):
        try:
            glance.stop()
        finally:
            glance.session.close()
            shutil.rmtree(str(tmp_dir), ignore_errors=True)

    @pytest.fixture(scope='session')
    def real_glance(tmp_path_factory):
        """A real Glance for the session (see the module docstring)."""
        tmp_dir = tmp_path_factory.mktemp('real-glance')
        glance = _started(tmp_dir)
        try:
            yield glance
        finally:
            _finish(glance, tmp_dir)

    @pytest.fixture
    def own_real_glance(tmp_path_factory):
        """A real Glance of the test's own, to stop, kill or freeze."""
        tmp_dir = tmp_path_factory.mktemp('own-real-glance')
        glance = _started(tmp_dir)
        try:
            yield glance
        finally:
            _finish(glance, tmp_dir)
