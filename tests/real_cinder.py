"""A real Cinder on a real Ceph, on loopback, for the Cinder tier of the
tests and ``bench/cinder.py``:

- Ceph: one mon, one mgr (Cinder's RBD driver needs its pool stats) and
  one OSD on memstore, ``auth = none``; a pool ``volumes``;
- RabbitMQ (Cinder's RPC) with its own epmd, and MariaDB (Cinder's
  database: sqlite locks up under concurrent requests);
- cinder-api, cinder-scheduler and cinder-volume with the RBD driver,
  ``auth_strategy = noauth``; a volume type ``ceph`` that allows
  multiattach (a template is attached by every host at once).

Everything lives in one work directory and runs in the foreground of
processes started here, each in its own session; ``stop()`` ends them by
those PIDs (process groups) and never by name. The packages and Cinder's
venv come from ``scripts/install-cinder.sh`` (run when not ready). If any
part cannot be installed or started, the fixtures *fail* with the reason
and the log's tail: this tier is never skipped.

Use::

    from tests.real_cinder import real_cinder   # noqa: F401 (a fixture)

    def test_x(real_cinder):
        real_cinder.endpoint        # http://127.0.0.1:<port>/v3/<project>
        real_cinder.agent_options() # the agent's [cinder] options
        real_cinder.rbd_images()    # what is in the pool

``real_cinder`` is one stack for the session; ``stop_cinder()`` and
``start_cinder()`` stop and restart only the Cinder services (to test
what the agent does when Cinder goes away mid-operation).
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from tests.real_glance import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SCRIPT = os.path.join(REPO, 'scripts', 'install-cinder.sh')
DEFAULT_VENV = '/opt/template-agent/cinder-venv'
START_TIMEOUT = 180.0
API_VERSION = 'volume 3.71'
RABBIT_BIN = '/usr/lib/rabbitmq/bin'
VOLUME_TYPE = 'ceph'

CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
public addr = 127.0.0.1
ms bind port min = {ms_min}
ms bind port max = {ms_max}
auth cluster required = none
auth service required = none
auth client required = none
run dir = {dir}/run
admin socket = {dir}/run/$cluster-$name.asok
log file = {dir}/log/$cluster-$name.log
pid file = {dir}/run/$cluster-$name.pid
crash dir = {dir}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
[mon]
mon data = {dir}/mon/$cluster-$id
[osd]
osd data = {dir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd max object name len = 256
osd max object namespace len = 64
[mgr]
mgr data = {dir}/mgr/$cluster-$id
"""

RABBIT_CONF = """\
listeners.tcp.default = 127.0.0.1:{port}
loopback_users = none
default_user = guest
default_pass = guest
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.2
log.console = false
log.file.level = warning
"""

MY_CNF = """\
[mysqld]
user = root
datadir = {dir}/data
socket = {dir}/mysqld.sock
pid-file = {dir}/mysqld.pid
tmpdir = {dir}/tmp
bind-address = 127.0.0.1
port = {port}
skip-name-resolve
log-error = {dir}/mysqld.err
innodb_buffer_pool_size = 64M
innodb_log_file_size = 16M
innodb_flush_log_at_trx_commit = 0
sync_binlog = 0
performance_schema = OFF
max_connections = 200
character-set-server = utf8mb4
collation-server = utf8mb4_general_ci
[client]
socket = {dir}/mysqld.sock
port = {port}
"""

CINDER_CONF = """\
[DEFAULT]
host = cinder-test
my_ip = 127.0.0.1
state_path = {dir}/state
log_dir = {dir}/log
debug = true
auth_strategy = noauth
api_paste_config = {venv}/etc/cinder/api-paste.ini
rootwrap_config = {dir}/rootwrap.conf
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {port}
osapi_volume_workers = 1
transport_url = rabbit://guest:guest@127.0.0.1:{amqp_port}/
enabled_backends = ceph
default_volume_type = {volume_type}
cinder_internal_tenant_project_id = {internal_project}
cinder_internal_tenant_user_id = {internal_user}
glance_api_servers = {glance_url}
allowed_direct_url_schemes = cinder
report_interval = 2
periodic_interval = 5
service_down_time = 20
quota_volumes = -1
quota_snapshots = -1
quota_gigabytes = -1
quota_backups = -1
quota_backup_gigabytes = -1
quota_groups = -1
per_volume_size_limit = -1
[database]
connection = mysql+pymysql://cinder:cinder@127.0.0.1:{db_port}/cinder?charset=utf8mb4
max_pool_size = 10
max_overflow = 20
[oslo_concurrency]
lock_path = {dir}/lock
[coordination]
backend_url = file://{dir}/state/coordination
[ceph]
volume_driver = cinder.volume.drivers.rbd.RBDDriver
volume_backend_name = ceph
rbd_pool = volumes
rbd_ceph_conf = {ceph_conf}
rbd_flatten_volume_from_snapshot = false
image_volume_cache_enabled = true
image_volume_cache_max_size_gb = 0
image_volume_cache_max_count = 0
"""


class CinderStackError(Exception):
    """A part of the stack could not be installed, started or asked."""


def cinder_venv():
    return os.environ.get('CINDER_VENV', DEFAULT_VENV)


def ensure_installed(venv=None):
    venv = venv or cinder_venv()
    proc = subprocess.run(['bash', INSTALL_SCRIPT], capture_output=True,
                          text=True, env=dict(os.environ, CINDER_VENV=venv))
    if proc.returncode != 0:
        raise CinderStackError(
            'scripts/install-cinder.sh failed (exit %d):\n%s%s'
            % (proc.returncode, _tail(proc.stdout), _tail(proc.stderr)))
    return venv


def _tail(text, lines=30):
    return '\n'.join((text or '').splitlines()[-lines:]) + '\n'


def _file_tail(path, lines=30):
    try:
        with open(path, errors='replace') as f:
            return _tail(f.read(), lines)
    except OSError:
        return '(no log at %s)\n' % path


def _wait(what, check, timeout, log=None, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet, asked again
            pass
        if proc is not None and proc.poll() is not None:
            raise CinderStackError('%s: the process exited with %s:\n%s'
                                   % (what, proc.returncode,
                                      _file_tail(log) if log else ''))
        if time.monotonic() > deadline:
            raise CinderStackError('%s: not ready within %.0f s:\n%s'
                                   % (what, timeout,
                                      _file_tail(log) if log else ''))
        time.sleep(0.25)


class RealCinder:
    """The whole stack in ``workdir`` (a temp dir when None)."""

    def __init__(self, venv=None, workdir=None, glance_url=None,
                 memstore_bytes=2 * 1024 ** 3):
        self.venv = venv or cinder_venv()
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix='real-cinder-')
        self.glance_url = glance_url or 'http://127.0.0.1:9'
        self.memstore_bytes = memstore_bytes
        self.procs = {}        # name -> Popen, each its own process group
        self.project_id = uuid.uuid4().hex
        self.internal_project = uuid.uuid4().hex
        self.ports = {name: free_port() for name in (
            'mon_v1', 'mon_v2', 'amqp', 'amqp_dist', 'epmd', 'db', 'api')}
        # the OSD and mgr bind in a range: pick one clear of the others
        base = 20000 + (os.getpid() * 7) % 30000
        self.ports['ms_min'], self.ports['ms_max'] = base, base + 99
        self.ceph_dir = os.path.join(self.workdir, 'ceph')
        self.ceph_conf = os.path.join(self.ceph_dir, 'ceph.conf')
        self.cinder_dir = os.path.join(self.workdir, 'cinder')

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self.ports['api']

    @property
    def endpoint(self):
        return '%s/v3/%s' % (self.url, self.project_id)

    def agent_options(self):
        """The agent's ``[cinder]`` options for this Cinder (noauth)."""
        return {'auth_type': 'admin_token',
                'token': 'admin:%s' % self.project_id,
                'endpoint': self.endpoint,
                'volume_type': VOLUME_TYPE,
                'ceph_conf': self.ceph_conf}

    # -- processes ------------------------------------------------------------
    def _spawn(self, name, args, env=None, cwd=None):
        log_path = os.path.join(self.workdir, 'logs', name + '.log')
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, 'ab') as log:
            self.procs[name] = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=env, cwd=cwd or self.workdir, start_new_session=True)
        return self.procs[name], log_path

    def _stop(self, name, timeout=20):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # children left in the group (cinder's workers) go with it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return

    def _run(self, args, what, timeout=120, env=None, input=None):
        try:
            proc = subprocess.run(args, capture_output=True, text=True,
                                  timeout=timeout, env=env, input=input)
        except subprocess.TimeoutExpired:
            raise CinderStackError('%s: %s did not finish in %d s'
                                   % (what, ' '.join(args), timeout))
        if proc.returncode != 0:
            raise CinderStackError('%s: %s failed (exit %d):\n%s%s'
                                   % (what, ' '.join(args), proc.returncode,
                                      _tail(proc.stdout), _tail(proc.stderr)))
        return proc.stdout

    def ceph(self, *args, timeout=60):
        return self._run(['ceph', '-c', self.ceph_conf] + list(args),
                         'ceph', timeout=timeout)

    def rbd(self, *args, timeout=60):
        return self._run(['rbd', '-c', self.ceph_conf] + list(args),
                         'rbd', timeout=timeout)

    # -- ceph -----------------------------------------------------------------
    def _start_ceph(self):
        d = self.ceph_dir
        for sub in ('mon', 'osd', 'run', 'log', 'crash', 'mgr/ceph-x'):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        with open(self.ceph_conf, 'w') as f:
            f.write(CEPH_CONF.format(dir=d, fsid=fsid,
                                     memstore_bytes=self.memstore_bytes,
                                     **self.ports))
        c = ['-c', self.ceph_conf]
        monmap = os.path.join(d, 'monmap')
        self._run(['monmaptool', '--create', '--fsid', fsid, '--addv', 'a',
                   '[v2:127.0.0.1:%d,v1:127.0.0.1:%d]' % (
                       self.ports['mon_v2'], self.ports['mon_v1']), monmap],
                  'monmaptool')
        self._run(['ceph-mon'] + c + ['--mkfs', '-i', 'a', '--monmap',
                                      monmap], 'ceph-mon --mkfs')
        proc, log = self._spawn('ceph-mon', ['ceph-mon'] + c + ['-f', '-i',
                                                                'a'])
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph('osd', 'create', osd_uuid).strip()
        os.makedirs(os.path.join(d, 'osd', 'ceph-' + osd_id), exist_ok=True)
        self._run(['ceph-osd'] + c + ['-i', osd_id, '--mkfs', '--osd-uuid',
                                      osd_uuid],
                  'ceph-osd --mkfs')
        self.ceph('osd', 'crush', 'add-bucket', 'localhost', 'host')
        self.ceph('osd', 'crush', 'move', 'localhost', 'root=default')
        self.ceph('osd', 'crush', 'add', 'osd.' + osd_id, '1.0',
                  'host=localhost')
        self._spawn('ceph-osd', ['ceph-osd'] + c + ['-f', '-i', osd_id])
        self._spawn('ceph-mgr', ['ceph-mgr'] + c + ['-f', '-i', 'x'])
        # clone v2: Cinder clones without protected snapshots
        self.ceph('osd', 'set-require-min-compat-client', 'mimic')
        self.ceph('osd', 'pool', 'create', 'volumes', '8', '8')
        self.ceph('osd', 'pool', 'application', 'enable', 'volumes', 'rbd')
        self.rbd('pool', 'init', 'volumes', timeout=120)

        _wait('ceph (pool in ceph df, PGs active+clean)', self._ceph_ready,
              120, os.path.join(d, 'log', 'ceph-mgr.x.log'), proc)

    def stop_ceph(self):
        """Ceph stops answering: the monitor is killed (SIGKILL: its store
        is on disk) and the OSD frozen (SIGSTOP). A memstore OSD keeps its
        data only in memory, so a killed one would come back empty (every
        volume of the shared stack lost); frozen, it is as dead to its
        clients (no answer, no connection reset) and comes back whole."""
        mon = self.procs.pop('ceph-mon')
        os.killpg(mon.pid, signal.SIGKILL)
        mon.wait(timeout=30)
        os.killpg(self.procs['ceph-osd'].pid, signal.SIGSTOP)

    def start_ceph(self, timeout=120):
        """Undo ``stop_ceph``: the monitor restarted, the OSD thawed; wait
        until the pool's PGs are active+clean again.

        A PG whose read lease ran out while its OSD was frozen can stay
        ``laggy`` on this one-OSD cluster, every op on it blocked for good
        (seen in CI: Cinder's deletes and creates hung from then on). The
        OSD is marked down once, so that it rejoins and peers again, which
        renews the leases and requeues the blocked ops."""
        os.killpg(self.procs['ceph-osd'].pid, signal.SIGCONT)
        if 'ceph-mon' not in self.procs:
            proc, log = self._spawn('ceph-mon', [
                'ceph-mon', '-c', self.ceph_conf, '-f', '-i', 'a'])
        log = os.path.join(self.ceph_dir, 'log', 'ceph-mon.a.log')
        _wait('ceph monitor back', lambda: self.ceph(
            'osd', 'down', '0', timeout=15) is not None, timeout, log,
            self.procs['ceph-mon'])
        _wait('ceph back (PGs active+clean, no slow ops)', self._ceph_ready,
              timeout, log, self.procs['ceph-mon'])

    def _ceph_ready(self):
        df = json.loads(self.ceph('df', '--format', 'json', timeout=15))
        pgs = json.loads(self.ceph('pg', 'stat', '--format', 'json',
                                   timeout=15))
        states = pgs.get('pg_summary', pgs).get('num_pg_by_state', [])
        health = json.loads(self.ceph('health', '--format', 'json',
                                      timeout=15))
        osds = json.loads(self.ceph('osd', 'stat', '--format', 'json',
                                    timeout=15))
        return any(p['name'] == 'volumes' for p in df['pools']) and \
            all(s['name'] == 'active+clean' for s in states) and \
            'SLOW_OPS' not in health.get('checks', {}) and \
            osds.get('num_up_osds') == osds.get('num_osds') == 1

    # -- rabbitmq -------------------------------------------------------------
    def _rabbit_env(self):
        r = os.path.join(self.workdir, 'rabbit')
        env = dict(os.environ,
                   HOME=os.path.join(r, 'home'),
                   RABBITMQ_NODENAME='cindertest%d@localhost' % os.getpid(),
                   RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
                   RABBITMQ_NODE_PORT=str(self.ports['amqp']),
                   RABBITMQ_DIST_PORT=str(self.ports['amqp_dist']),
                   ERL_EPMD_PORT=str(self.ports['epmd']),
                   ERL_EPMD_ADDRESS='127.0.0.1',
                   RABBITMQ_MNESIA_BASE=os.path.join(r, 'mnesia'),
                   RABBITMQ_LOG_BASE=os.path.join(r, 'log'),
                   RABBITMQ_PID_FILE=os.path.join(r, 'rabbit.pid'),
                   RABBITMQ_CONFIG_FILE=os.path.join(r, 'rabbitmq'),
                   RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(
                       r, 'enabled_plugins'),
                   RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(
                       r, 'advanced.config'),
                   RABBITMQ_CONF_ENV_FILE=os.path.join(r, 'rabbitmq-env.conf'),
                   RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='+S 1:1 +A 4')
        return r, env

    def _start_rabbit(self):
        r, env = self._rabbit_env()
        for sub in ('home', 'mnesia', 'log'):
            os.makedirs(os.path.join(r, sub), exist_ok=True)
        for name, text in (('enabled_plugins', '[].\n'),
                           ('advanced.config', '[].\n'),
                           ('rabbitmq-env.conf', ''),
                           ('rabbitmq.conf', RABBIT_CONF.format(
                               port=self.ports['amqp']))):
            with open(os.path.join(r, name), 'w') as f:
                f.write(text)
        cookie = os.path.join(r, 'home', '.erlang.cookie')
        with open(os.open(cookie, os.O_WRONLY | os.O_CREAT, 0o400), 'w') as f:
            f.write(uuid.uuid4().hex)
        # our own epmd in the foreground: its PID is ours to stop
        self._spawn('epmd', ['epmd', '-port', str(self.ports['epmd']),
                             '-address', '127.0.0.1'], env=env)
        proc, log = self._spawn('rabbitmq', [os.path.join(
            RABBIT_BIN, 'rabbitmq-server')], env=env)
        self._run([os.path.join(RABBIT_BIN, 'rabbitmqctl'), 'wait',
                   '--timeout', '120', os.path.join(r, 'rabbit.pid')],
                  'rabbitmq', timeout=150, env=env)

    # -- mariadb --------------------------------------------------------------
    def _start_mariadb(self):
        m = os.path.join(self.workdir, 'mariadb')
        for sub in ('data', 'tmp'):
            os.makedirs(os.path.join(m, sub), exist_ok=True)
        cnf = os.path.join(m, 'my.cnf')
        with open(cnf, 'w') as f:
            f.write(MY_CNF.format(dir=m, port=self.ports['db']))
        self._run(['mariadb-install-db', '--defaults-file=' + cnf,
                   '--auth-root-authentication-method=normal',
                   '--skip-test-db'], 'mariadb-install-db', timeout=180)
        proc, log = self._spawn('mariadb', ['mariadbd',
                                            '--defaults-file=' + cnf])
        _wait('mariadb', lambda: subprocess.run(
            ['mariadb-admin', '--defaults-file=' + cnf, '-uroot', 'ping'],
            capture_output=True, timeout=10).returncode == 0, 60,
            os.path.join(m, 'mysqld.err'), proc)
        self._run(['mariadb', '--defaults-file=' + cnf, '-uroot', '-e',
                   "CREATE DATABASE cinder CHARACTER SET utf8mb4; "
                   "CREATE USER 'cinder'@'127.0.0.1' "
                   "IDENTIFIED BY 'cinder'; "
                   "GRANT ALL ON cinder.* TO 'cinder'@'127.0.0.1';"],
                  'mariadb')

    # -- cinder ---------------------------------------------------------------
    def _configure_cinder(self):
        d = self.cinder_dir
        for sub in ('state', 'log', 'lock', 'shim'):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        # cinder runs "sudo cinder-rootwrap ..." (qemu-img convert on
        # create-from-image); we are root already: run it directly
        shim = os.path.join(d, 'shim', 'sudo')
        with open(shim, 'w') as f:
            f.write('#!/bin/sh\nexec "$@"\n')
        os.chmod(shim, 0o755)
        with open(os.path.join(self.venv, 'etc', 'cinder',
                               'rootwrap.conf')) as f:
            rootwrap = f.read()
        lines = []
        for line in rootwrap.splitlines():
            if line.startswith('filters_path='):
                line = 'filters_path=%s/etc/cinder/rootwrap.d' % self.venv
            elif line.startswith('exec_dirs='):
                line = 'exec_dirs=%s/bin,/sbin,/usr/sbin,/bin,/usr/bin' \
                    % self.venv
            lines.append(line)
        with open(os.path.join(d, 'rootwrap.conf'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        self.cinder_conf = os.path.join(d, 'cinder.conf')
        with open(self.cinder_conf, 'w') as f:
            f.write(CINDER_CONF.format(
                dir=d, venv=self.venv, port=self.ports['api'],
                amqp_port=self.ports['amqp'], db_port=self.ports['db'],
                volume_type=VOLUME_TYPE, ceph_conf=self.ceph_conf,
                internal_project=self.internal_project,
                internal_user=uuid.uuid4().hex, glance_url=self.glance_url))
        self._run([os.path.join(self.venv, 'bin', 'cinder-manage'),
                   '--config-file', self.cinder_conf, 'db', 'sync'],
                  'cinder-manage db sync', timeout=300)

    def _cinder_env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('OS_', 'PYTHON'))}
        env['PATH'] = os.pathsep.join([
            os.path.join(self.cinder_dir, 'shim'),
            os.path.join(self.venv, 'bin'), env.get('PATH', '/usr/bin:/bin')])
        return env

    def start_cinder(self, timeout=START_TIMEOUT):
        """Start api, scheduler and volume; wait until the backend reports
        its pool to the scheduler (else the first create finds no valid
        backend)."""
        for svc in ('api', 'scheduler', 'volume'):
            self._spawn('cinder-' + svc, [
                os.path.join(self.venv, 'bin', 'cinder-' + svc),
                '--config-file', self.cinder_conf], env=self._cinder_env())
        api_log = os.path.join(self.workdir, 'logs', 'cinder-api.log')
        _wait('cinder-api', lambda: self.request('GET', '/', base=self.url,
                                                 ok=(300,)) is not None,
              timeout, api_log, self.procs['cinder-api'])

        def services_up():
            up = {s['binary'] for s in self.request(
                'GET', '/os-services')['services'] if s['state'] == 'up'}
            return {'cinder-scheduler', 'cinder-volume'} <= up
        volume_log = os.path.join(self.cinder_dir, 'log', 'cinder-volume.log')
        _wait('cinder scheduler and volume services', services_up, timeout,
              volume_log, self.procs['cinder-volume'])

        def pool_reported():
            pools = self.request('GET', '/scheduler-stats/get_pools'
                                 '?detail=true').get('pools', [])
            return pools and pools[0]['capabilities'].get(
                'free_capacity_gb') not in (None, 'unknown')
        _wait('cinder backend pool stats', pool_reported, timeout,
              volume_log, self.procs['cinder-volume'])
        self._ensure_volume_type()

    def stop_cinder(self):
        # the API first: from then on every request fails
        for svc in ('api', 'volume', 'scheduler'):
            self._stop('cinder-' + svc)

    def _ensure_volume_type(self):
        types = self.request('GET', '/types')['volume_types']
        if any(t['name'] == VOLUME_TYPE for t in types):
            return
        self.request('POST', '/types', {'volume_type': {
            'name': VOLUME_TYPE, 'extra_specs': {
                'volume_backend_name': 'ceph',
                'multiattach': '<is> True'}}})

    # -- whole stack ----------------------------------------------------------
    def start(self):
        t0 = time.monotonic()
        try:
            self._start_mariadb()
            self._start_rabbit()
            self._start_ceph()
            self._configure_cinder()
            self.start_cinder()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self):
        """Stop everything this object started, by PID, newest first."""
        self.stop_cinder()
        for name in ('ceph-mgr', 'ceph-osd', 'ceph-mon', 'mariadb'):
            self._stop(name)
        if 'rabbitmq' in self.procs:
            r, env = self._rabbit_env()
            try:
                subprocess.run([os.path.join(RABBIT_BIN, 'rabbitmqctl'),
                                'stop', os.path.join(r, 'rabbit.pid')],
                               capture_output=True, timeout=60, env=env)
            except subprocess.TimeoutExpired:
                pass
            self._stop('rabbitmq')
        for name in list(self.procs):
            self._stop(name)

    def cleanup(self):
        try:
            self.stop()
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def logs(self, lines=40):
        out = []
        for name in ('cinder-volume', 'cinder-api', 'cinder-scheduler'):
            out.append('== %s\n%s' % (name, _file_tail(os.path.join(
                self.cinder_dir, 'log', name + '.log'), lines)))
        return ''.join(out)

    # -- asking it ------------------------------------------------------------
    def request(self, method, path, body=None, base=None, ok=(200, 201,
                                                              202, 204),
                project=None):
        """A request as an admin of ``project`` (the agents' project when
        None)."""
        project = project or self.project_id
        url = (base or '%s/v3/%s' % (self.url, project)) + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, method=method, data=data, headers={
            'X-Auth-Token': 'admin:%s' % project,
            'Content-Type': 'application/json',
            'Accept': 'application/json',
            'OpenStack-API-Version': API_VERSION})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read(), exc.code
        if status not in ok:
            raise CinderStackError('%s %s -> %d: %s' % (
                method, path, status, text[:500]))
        return json.loads(text) if text else {}

    def volumes(self, all_projects=True):
        suffix = '?all_tenants=1' if all_projects else ''
        return self.request('GET', '/volumes/detail' + suffix)['volumes']

    def wait_volume(self, volume_id, statuses=('available',), timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            vol = self.request('GET', '/volumes/%s' % volume_id,
                               ok=(200, 404))
            vol = vol if vol and 'volume' in vol else None  # 404: gone
            if not vol and 'deleted' in statuses:
                return None
            if vol and vol['volume']['status'] in statuses:
                return vol['volume']
            if vol and vol['volume']['status'].startswith('error'):
                raise CinderStackError('volume %s: %s' % (
                    volume_id, vol['volume']['status']))
            time.sleep(0.25)
        raise CinderStackError('volume %s not %s in %d s' % (
            volume_id, statuses, timeout))

    def rbd_images(self):
        """``{name: provisioned bytes}`` of the images in the pool, and
        the bytes actually used (``rbd du``)."""
        out = json.loads(self.rbd('du', '--format', 'json', '-p',
                                  'volumes'))
        return {i['name'] + ('@' + i['snapshot'] if i.get('snapshot')
                             else ''): i['used_size']
                for i in out.get('images', [])}


def end_exports(exports_dirs):
    """Stop what agents left exported in ``exports_dirs`` (their
    ``[cinder] exports_path``): loop devices over the exports, then the
    ``qemu-storage-daemon`` processes, by the PIDs in their pid files.
    Returns what was left."""
    from agent.privileged import rbd_exports
    left = []
    for d in exports_dirs:
        if not os.path.isdir(d):
            continue
        out = subprocess.run(['losetup', '-l', '-n', '-O',
                              'NAME,BACK-FILE'], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            name, _, backing = line.partition(' ')
            if os.path.dirname(backing.strip()) == d:
                left.append(name)
                rbd_exports.detach_loop(d, name)
        for entry in sorted(os.listdir(d)):
            if entry.endswith('.pid'):
                if rbd_exports.status(d, entry[:-4])['daemon']:
                    left.append(os.path.join(d, entry))
                rbd_exports.stop(d, entry[:-4], 10)
    return left


def start_real_cinder(workdir=None, glance_url=None):
    venv = ensure_installed()
    stack = RealCinder(venv=venv, workdir=workdir, glance_url=glance_url)
    return stack.start()


# -- pytest fixtures ----------------------------------------------------------
try:
    import pytest
except ImportError:  # the bench imports this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope='session')
    def real_cinder(tmp_path_factory, real_glance):
        """One Ceph + RabbitMQ + MariaDB + Cinder for the session, whose
        Cinder knows the session's real Glance."""
        tmp_dir = tmp_path_factory.mktemp('real-cinder')
        reason = None
        try:
            stack = start_real_cinder(workdir=str(tmp_dir),
                                      glance_url=real_glance.url)
        except CinderStackError as exc:
            reason = str(exc)
        if not reason:
            try:
                # Glance's cinder store: cinder:// locations (templates
                # recorded by [cinder] glance_locations) for Cinder to clone
                real_glance.enable_cinder_store(
                    stack.url + '/v3/%(project_id)s')
            except Exception as exc:  # noqa: BLE001 - reported below
                stack.stop()
                reason = 'Glance with its cinder store: %s' % exc
        if reason:
            pytest.fail('real Cinder on Ceph cannot be installed or '
                        'started: %s' % reason, pytrace=False)
        try:
            yield stack
        finally:
            try:
                stack.stop()
            finally:
                shutil.rmtree(str(tmp_dir), ignore_errors=True)
