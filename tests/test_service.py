"""The service as systemd runs it: a subprocess with a real notify socket,
driven over its real Unix socket."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent import client
from tests.conftest import REPO, files_written, make_raw

MiB = 1024 * 1024


class NotifySocket:
    """A datagram socket standing where systemd's NOTIFY_SOCKET would."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().splitlines())

    def wait_for(self, prefix, timeout=60, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for m in self.messages if m.startswith(prefix)) >= count:
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


class Service:
    """``template-agent serve`` in a subprocess, stopped in ``finally``."""

    def __init__(self, env):
        self.env = env
        self.socket_path = env.sections['api']['socket_path']
        self.notify = NotifySocket(os.path.join(env.root, 'notify.sock'))
        self.proc = None
        self.stderr_path = os.path.join(env.root, 'serve.log')

    def start(self, watchdog_usec=400000):
        self.notify.messages.clear()
        environ = dict(os.environ, PYTHONPATH=REPO,
                       NOTIFY_SOCKET=self.notify.path,
                       WATCHDOG_USEC=str(watchdog_usec))
        environ.pop('WATCHDOG_PID', None)
        self.stderr = open(self.stderr_path, 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'agent.cli', '--config-file',
             self.env.conf_path, 'serve'], env=environ,
            stdout=subprocess.DEVNULL, stderr=self.stderr)
        assert self.notify.wait_for('READY=1'), self.log()
        return self

    def log(self):
        with open(self.stderr_path, errors='replace') as f:
            return f.read()[-3000:]

    def stop(self, sig=signal.SIGTERM, timeout=90):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.stderr.close()
        return self.proc.returncode if self.proc else None

    def close(self):
        """Fixture teardown: kill the service if a test left it running,
        close the notify socket."""
        self.stop(signal.SIGKILL)
        self.notify.close()

    def api(self):
        return client.ServiceClient(self.socket_path)

    def raw(self, method, path, body=None, headers=None):
        """One raw HTTP request; ``(status, parsed body)``."""
        conn = client._UnixConnection(self.socket_path, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data.decode())
        except ValueError:
            return resp.status, data.decode(errors='replace')


@pytest.fixture
def service(env):
    svc = Service(env)
    try:
        yield svc
    finally:
        svc.close()
        _release_loops(env)


def _release_loops(env):
    """Detach loop devices backed by this test's files (after a SIGKILL
    the service cannot)."""
    out = subprocess.run(['losetup', '-n', '-O', 'NAME,BACK-FILE', '-l'],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(env.root):
            subprocess.run(['losetup', '-d', parts[0]])


def _bound_loops():
    out = subprocess.run(['losetup', '-n', '-O', 'NAME', '-l'],
                         capture_output=True, text=True).stdout
    return set(out.split())


def test_systemd_protocol_ready_status_watchdog_stopping(service, env):
    service.start(watchdog_usec=400000)
    msgs = service.notify
    assert msgs.wait_for('STATUS='), msgs.messages
    assert msgs.wait_for('WATCHDOG=1', count=3, timeout=10), msgs.messages
    ready = msgs.messages.index('READY=1')
    assert any(m.startswith('STATUS=') for m in msgs.messages[:ready + 2])
    mode = os.stat(service.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    assert service.stop() == 0
    assert 'STOPPING=1' in msgs.messages
    assert not os.path.exists(service.socket_path)


def test_api_end_to_end(service, env, image_files):
    env.cli('images', 'import', image_files['disk.qcow2'], '--id', 'img')
    service.start()
    api = service.api()
    assert api.request('GET', '/v1/health')['status'] == 'ok'
    path = api.fetch_image('img')
    assert os.path.isfile(path)
    images, _ = api.list_images()
    assert [i['image_id'] for i in images] == ['img']
    result = api.precache(['img', 'missing', 'img'])
    assert result == {'img': 'existing', 'missing': 'error'}
    env.cli('images', 'import', image_files['disk.raw'], '--id', 'img2')
    assert api.precache(['img2']) == {'img2': 'cached'}
    report = api.prune(dry_run=True, min_age=0)
    assert {r['image_id'] for r in report['removed']} == {'img', 'img2'}
    assert os.path.exists(path)
    api.remove_image('img')
    assert not os.path.exists(path)
    metrics = api.request('GET', '/metrics')
    assert 'template_agent_fetches_total{handler="downloading",' \
        'result="prepared"} 2' in metrics
    assert 'template_agent_base_images{state="unused"}' in metrics
    assert '# TYPE template_agent_downloaded_bytes_total counter' in metrics


def test_cli_results_are_the_same_through_the_service_and_direct(
        service, env, image_files):
    env.cli('images', 'import', image_files['disk.raw'], '--id', 'img')
    env.cli('--direct', 'fetch', 'img')
    service.start()
    through = env.cli_json('list')
    direct = env.cli_json('--direct', 'list')
    assert through == direct and through[0]['image_id'] == 'img'
    assert env.cli_json('show', 'img') == env.cli_json('--direct', 'show',
                                                       'img')
    # a refused remove is refused alike, with the same exit code
    a = env.cli('remove', 'nope', check=False)
    b = env.cli('--direct', 'remove', 'nope', check=False)
    assert (a.returncode, a.stderr) == (b.returncode, b.stderr) and \
        a.returncode == 1
    # the path printed by fetch is the same
    assert env.cli('fetch', 'img').stdout == \
        env.cli('--direct', 'fetch', 'img').stdout


def _as_user(uid, gid):
    def demote():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return demote


def _probe_as(service, uid, gid):
    """GET /v1/status as another user, with curl (the venv's Python lives
    under /root, which other users cannot enter)."""
    proc = subprocess.run(
        ['curl', '-s', '-S', '-w', '\n%{http_code}', '--unix-socket',
         service.socket_path, 'http://localhost/v1/status'],
        capture_output=True, text=True, preexec_fn=_as_user(uid, gid),
        timeout=60)
    if proc.returncode != 0:
        return 'refused: ' + proc.stderr.strip()
    body, _, code = proc.stdout.rpartition('\n')
    if code != '200':
        return 'refused: HTTP %s %s' % (code, body)
    return json.loads(body)['handlers']


@pytest.fixture
def public_socket_dir():
    """A directory other users can enter (pytest's tmp dirs are 0700)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix='agent-sock-', dir='/tmp')
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_peers_outside_allowed_groups_are_refused(env, public_socket_dir):
    import grp
    import pwd
    nobody = pwd.getpwnam('nobody')
    nogroup = grp.getgrnam('nogroup').gr_gid
    env.configure(api={'allowed_groups': 'nogroup',
                       'socket_path': os.path.join(public_socket_dir,
                                                   'agent.sock')})
    service = Service(env)
    try:
        service.start()
        # the socket is root:nogroup 0660: nobody in group nogroup may talk
        assert _probe_as(service, nobody.pw_uid, nogroup) == ['downloading']
        # a uid outside the group cannot even connect ...
        assert str(_probe_as(service, nobody.pw_uid, nobody.pw_uid + 1)) \
            .startswith('refused')
        # ... and if the socket were opened up, SO_PEERCRED still says no
        os.chmod(service.socket_path, 0o666)
        out = _probe_as(service, nobody.pw_uid, nobody.pw_uid + 1)
        assert out.startswith('refused: HTTP 403') and 'allowed_groups' in out
        assert service.api().request('GET', '/v1/health')['status'] == 'ok'
    finally:
        service.stop()
        service.notify.close()


def test_sigterm_during_a_fetch_publishes_nothing_and_exits_0(
        service, glance_env, glance, tmp_path):
    src = make_raw(str(tmp_path / 'big.raw'), data_mib=16, total_mib=16)
    glance.add('slow', src)
    glance.fail('slow', stall_after=4 * MiB, stall_seconds=60, times=1)
    glance_env.configure(glance={'read_timeout': 60})
    service.start()
    job = service.api().request('POST', '/v1/images/slow/fetch', {})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not files_written(
            service.proc.pid, glance_env.base_dir):
        time.sleep(0.05)
    assert files_written(service.proc.pid, glance_env.base_dir), \
        service.log()
    assert job['state'] == 'running'
    assert service.stop() == 0
    assert 'STOPPING=1' in service.notify.messages
    assert glance_env.base_files() == []


def test_sigkill_and_reboot_then_init_restores_links(service, env,
                                                     image_files):
    env.configure(DEFAULT={'template_image_handler':
                           'volume_linking,downloading'})
    for image_id in ('a', 'b'):
        env.cli('images', 'import', image_files['disk.qcow2'], '--id',
                image_id)
    service.start()
    paths = [service.api().fetch_image(i) for i in ('a', 'b')]
    assert all(os.path.islink(p) for p in paths)
    assert service.stop(signal.SIGKILL) == -signal.SIGKILL
    _release_loops(env)  # the host reboots: every loop device is gone
    assert not any(os.path.realpath(p) in _bound_loops() for p in paths)
    service.start()
    for p in paths:
        assert stat.S_ISBLK(os.stat(p).st_mode), p
        assert os.path.realpath(p) in _bound_loops()
        out = subprocess.run(['qemu-img', 'compare', '-f', 'raw', p,
                              image_files['disk.raw']], capture_output=True)
        assert out.returncode == 0, out.stdout
    metrics = service.api().request('GET', '/metrics')
    assert 'template_agent_links_restored_total 2' in metrics
    for image_id in ('a', 'b'):
        service.api().remove_image(image_id)


def test_sighup_reloads_the_configuration(service, env):
    service.start()
    env.configure(DEFAULT={'template_image_handler': 'downloading,nope'})
    service.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    # a broken configuration is refused and the old one keeps serving
    assert service.api().status()['handlers'] == ['downloading']
    env.configure(DEFAULT={'template_image_handler':
                           'volume_linking,downloading'})
    service.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and \
            service.api().status()['handlers'] != ['volume_linking',
                                                   'downloading']:
        time.sleep(0.1)
    assert service.api().status()['handlers'] == ['volume_linking',
                                                  'downloading']
    assert 'reload failed' in service.log()


@pytest.mark.parametrize('method,path,body,status', [
    ('GET', '/v1/images/..%2Fetc', None, 400),
    ('POST', '/v1/images/x/fetch', b'{not json', 400),
    ('POST', '/v1/images/x/fetch', b'[]', 400),
    ('POST', '/v1/images/x/fetch', b'{"handler": 5}', 400),
    ('POST', '/v1/images/x/fetch', b'{"bogus": 1}', 400),
    ('POST', '/v1/images/x/fetch', b'{"handler": "magic"}', 400),
    ('POST', '/v1/volumes', b'{"image_id": "x", "size_gb": -1}', 400),
    ('POST', '/v1/volumes', b'{"image_id": "x", "size_gb": true}', 400),
    ('POST', '/v1/precache', b'{"image_ids": []}', 400),
    ('POST', '/v1/precache', b'{"image_ids": ["a/b"]}', 400),
    ('POST', '/v1/prune', b'{"min_age": "soon"}', 400),
    ('GET', '/v1/images/unknown', None, 404),
    ('DELETE', '/v1/cache/unknown', None, 404),
    ('GET', '/v1/jobs/nope', None, 404),
    ('GET', '/nowhere', None, 404),
])
def test_bad_requests_get_clear_errors(service, method, path, body, status):
    service.start()
    got, payload = service.raw(method, path, body)
    assert got == status, payload
    assert payload['error']['message']
    assert service.api().request('GET', '/v1/health')['status'] == 'ok'


def test_fuzzed_requests_never_crash_the_service(service):
    service.start()

    @settings(max_examples=150, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(['GET', 'POST', 'DELETE', 'PUT']),
           path=st.lists(st.sampled_from(
               ['v1', 'images', 'jobs', 'cache', 'volumes', 'prune',
                'precache', 'fetch', 'init', '..', '%00', 'x' * 300, '',
                'metrics', 'health']), max_size=4).map('/'.join),
           body=st.one_of(
               st.none(), st.binary(max_size=200),
               st.recursive(st.none() | st.booleans() | st.integers() |
                            st.text(max_size=20),
                            lambda c: st.lists(c, max_size=3) |
                            st.dictionaries(st.sampled_from(
                                ['image_ids', 'size_gb', 'image_id',
                                 'handler', 'dry_run', 'min_age',
                                 'project_id']), c, max_size=3),
                            max_leaves=8).map(
                                lambda v: json.dumps(v).encode())))
    def request(method, path, body):
        if method == 'POST' and path.strip('/') in ('v1/init', 'v1/prune'):
            return  # real work with side effects, tested elsewhere
        status, _ = service.raw(method, '/' + path, body)
        assert status < 500 or status in (502, 503, 507)

    request()
    # and a peer that speaks no HTTP at all
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(service.socket_path)
    sock.sendall(b'\x00\xff garbage \r\n\r\n')
    sock.recv(1024)
    sock.close()
    assert service.proc.poll() is None
    assert service.api().request('GET', '/v1/health')['status'] == 'ok'


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    unit = os.path.join(REPO, 'systemd', 'template-agent.service')
    with open(unit) as f:
        text = f.read()
    assert 'Type=notify' in text and 'WatchdogSec=' in text
    exe = os.path.join(os.path.dirname(sys.executable), 'template-agent')
    local = tmp_path / 'template-agent.service'
    local.write_text(text.replace('/usr/local/bin/template-agent', exe))
    proc = subprocess.run(['systemd-analyze', 'verify', str(local)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
