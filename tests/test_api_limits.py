"""The local API stays available: connection caps with a reserve for root,
idle, header and body timeouts. A real service in a subprocess; hostile
peers are forked children running as unprivileged users."""

import collections
import grp
import http.client
import json
import os
import pwd
import resource
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from agent import client
from tests import test_service

NOBODY = pwd.getpwnam('nobody').pw_uid
NOGROUP = grp.getgrnam('nogroup').gr_gid
OTHER_UID = 65533  # no passwd entry; allowed through its group nogroup
HEALTH = b'GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n'
public_socket_dir = test_service.public_socket_dir


@pytest.fixture
def service(env, public_socket_dir):
    """A service that members of ``nogroup`` may use; configure ``env``
    further before ``service.start()``."""
    env.configure(api={'allowed_groups': 'nogroup',
                       'socket_path': os.path.join(public_socket_dir,
                                                   'agent.sock')})
    svc = test_service.Service(env)
    try:
        yield svc
    finally:
        svc.close()


class Peer:
    """``fn(held, *args)`` in a forked child running as ``uid`` in group
    nogroup. Its JSON result comes back through a pipe; the sockets it puts
    in ``held`` stay open until ``stop()`` (or until pytest dies)."""

    def __init__(self, uid, fn, *args):
        self._results, results_w = os.pipe()
        hold_r, self._hold = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            self._child(uid, results_w, hold_r, fn, args)
        os.close(results_w)
        os.close(hold_r)

    def _child(self, uid, results, hold, fn, args):
        """Never returns into pytest."""
        code = 1
        try:
            os.close(self._results)
            os.close(self._hold)
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (4096, max(hard, 4096)))
            os.setgroups([NOGROUP])
            os.setresgid(NOGROUP, NOGROUP, NOGROUP)
            os.setresuid(uid, uid, uid)
            held = []
            result = fn(held, *args)
            os.write(results, json.dumps(result).encode() + b'\n')
            os.read(hold, 1)  # returns when the parent lets go
            code = 0
        except BaseException as exc:
            os.write(results, json.dumps(
                {'child failed': repr(exc)}).encode() + b'\n')
        finally:
            os._exit(code)

    def result(self, timeout):
        data = b''
        deadline = time.monotonic() + timeout
        while not data.endswith(b'\n'):
            ready, _, _ = select.select(
                [self._results], [], [], max(0, deadline - time.monotonic()))
            assert ready, 'no result from the child in %d s' % timeout
            chunk = os.read(self._results, 65536)
            assert chunk, 'the child died without a result'
            data += chunk
        result = json.loads(data)
        assert 'child failed' not in result, result
        return result

    def stop(self):
        # later children hold copies of the pipe: its end is no signal
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._hold)
        os.close(self._results)


def _connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def _read_to_end(sock):
    data = b''
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except OSError:  # a reset after the answer is still a refusal
        return data


def _hold_idle(held, path, count, keep_open):
    """Open ``count`` connections that never send a request; once no more
    than ``keep_open`` are left open, report how the others ended."""
    for _ in range(count):
        held.append(_connect(path))
    by_fd = {sock.fileno(): sock for sock in held}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    ended, example = collections.Counter(), None

    def collect(timeout_ms):
        nonlocal example
        for fd, _ in poller.poll(timeout_ms):
            poller.unregister(fd)
            data = _read_to_end(by_fd.pop(fd))
            if data.startswith(b'HTTP/1.1 '):
                ended[data.split()[1].decode()] += 1
                example = data.partition(b'\r\n\r\n')[2].decode()
            else:
                ended['closed'] += 1

    deadline = time.monotonic() + 60
    while len(by_fd) > keep_open and time.monotonic() < deadline:
        collect(1000)
    collect(500)  # a refusal too many would show up here
    return {'open': len(by_fd), 'ended': dict(ended), 'example': example}


def _timed_get(service, path):
    start = time.monotonic()
    status = service.raw('GET', path)[0]
    return status, time.monotonic() - start


def _eventually(fn, timeout=30):
    """``fn()``'s first true value, trying until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_root_is_served_while_peers_hold_2000_connections(service, env):
    per_uid, total = 64, 100
    env.configure(api={'max_connections': total,
                       'max_connections_per_uid': per_uid,
                       'idle_timeout': 600})
    service.start()
    peers = []
    try:
        # nobody fills its own cap, then another uid fills the total
        peers.append(Peer(NOBODY, _hold_idle, service.socket_path, 1000,
                          per_uid))
        first = peers[0].result(timeout=120)
        peers.append(Peer(OTHER_UID, _hold_idle, service.socket_path, 1000,
                          total - per_uid))
        second = peers[1].result(timeout=120)
        assert first['open'] == per_uid, first
        assert first['ended'] == {'503': 1000 - per_uid}, first
        assert second['open'] == total - per_uid, second
        assert second['ended'] == {'503': 1000 - total + per_uid}, second
        error = json.loads(first['example'])['error']
        assert error['type'] == 'TooManyConnections'
        assert error['exit_code'] == 1
        assert 'max_connections_per_uid' in error['message']
        message = json.loads(second['example'])['error']['message']
        assert 'max_connections)' in message
        # root's reserve: answered at once while the total is taken
        for path in ('/v1/health', '/v1/status'):
            status, seconds = _timed_get(service, path)
            assert status == 200 and seconds < 1.0, (path, seconds)
    finally:
        for peer in peers:
            peer.stop()
    assert service.raw('GET', '/v1/health')[0] == 200
    # the slots are given back when the peers' connections end
    assert _eventually(lambda: test_service._probe_as(
        service, NOBODY, NOGROUP) == ['downloading'])
    metrics = service.api().request('GET', '/metrics')
    for cap, count in (('max_connections_per_uid', 1000 - per_uid),
                       ('max_connections', 1000 - total + per_uid)):
        assert 'template_agent_api_connections_refused_total{cap="%s"} %d' \
            % (cap, count) in metrics


def _trickle(held, path, request):
    """Send ``request`` one byte a second until the service hangs up."""
    sock = _connect(path)
    held.append(sock)
    for sent in range(len(request)):
        try:
            sock.send(request[sent:sent + 1])
            if select.select([sock], [], [], 1)[0]:
                return {'sent': sent + 1, 'answer': _read_to_end(sock)
                        .decode(errors='replace')}
        except (BrokenPipeError, ConnectionResetError):
            # hung up between two bytes (after the wait above timed out)
            return {'sent': sent, 'answer': ''}
        except OSError as exc:
            return {'sent': sent, 'answer': repr(exc)}
    return {'sent': len(request), 'answer': _read_to_end(sock).decode()}


def test_a_slowloris_is_cut_off_by_the_header_timeout(service, env):
    env.configure(api={'header_timeout': 2, 'idle_timeout': 600})
    service.start()
    request = HEALTH.replace(b'\r\n\r\n', b'\r\nX-Padding: %s\r\n\r\n'
                             % (b'x' * 40))
    peer = Peer(NOBODY, _trickle, service.socket_path, request)
    try:
        result = peer.result(timeout=len(request) + 60)
    finally:
        peer.stop()
    assert result['sent'] < len(request), result
    assert result['answer'] == '', result  # hung up on, no answer
    assert service.raw('GET', '/v1/health')[0] == 200


def test_idle_connections_are_closed_after_idle_timeout(service, env):
    env.configure(api={'idle_timeout': 1})
    service.start()
    kept, silent = _connect(service.socket_path), \
        _connect(service.socket_path)
    try:
        kept.sendall(HEALTH)
        answer = http.client.HTTPResponse(kept)
        answer.begin()
        assert answer.status == 200 and not answer.will_close
        assert json.loads(answer.read())['status'] == 'ok'
        # the keep-alive connection and the one that never asked are
        # closed by the service (recv would raise after the socket's 30 s)
        assert kept.recv(1) == b''
        assert silent.recv(1) == b''
    finally:
        kept.close()
        silent.close()


def test_a_body_that_does_not_arrive_gets_408(service, env):
    env.configure(api={'body_timeout': 1})
    service.start()
    sock = _connect(service.socket_path)
    try:
        sock.sendall(b'POST /v1/prune HTTP/1.1\r\nHost: localhost\r\n'
                     b'Content-Length: 100\r\n\r\n{"dry_')
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 408 and answer.will_close
        error = json.loads(answer.read())['error']
        assert 'body_timeout' in error['message']
        assert sock.recv(1) == b''
    finally:
        sock.close()


def _clients(held, path, clients, requests):
    """``clients`` threads each sending ``requests`` requests; half of them
    on one keep-alive connection, half on a connection per request."""
    paths = ['/v1/health', '/v1/status', '/v1/images']
    statuses, failures = collections.Counter(), []
    lock = threading.Lock()

    def run(n):
        conn = None
        try:
            for i in range(requests):
                if conn is None or n % 2:
                    if conn is not None:
                        conn.close()
                    conn = client._UnixConnection(path, timeout=60)
                conn.request('GET', paths[(n + i) % len(paths)])
                answer = conn.getresponse()
                answer.read()
                with lock:
                    statuses[answer.status] += 1
        except Exception as exc:
            with lock:
                failures.append(repr(exc))
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=run, args=(n,))
               for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return {'statuses': {str(k): v for k, v in statuses.items()},
            'failures': failures[:5],
            'unfinished': sum(t.is_alive() for t in threads)}


def test_40_concurrent_clients_are_all_served(service, env):
    service.start()  # the default caps
    peer = Peer(NOBODY, _clients, service.socket_path, 40, 25)
    try:
        result = peer.result(timeout=300)
    finally:
        peer.stop()
    assert result == {'statuses': {'200': 1000}, 'failures': [],
                      'unfinished': 0}


def test_the_listen_backlog_takes_a_burst(service):
    service.start()
    listing = subprocess.run(
        ['ss', '-x', '-l', '-n', 'src', service.socket_path],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert int(listing[1].split()[3]) >= 128  # Send-Q: the backlog


def test_the_open_files_limit_is_raised_to_the_hard_limit(service):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        service.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open('/proc/%d/limits' % service.proc.pid) as f:
        limit = [line.split()[3:5] for line in f
                 if line.startswith('Max open files')][0]
    assert limit == [str(hard)] * 2


def test_unsupported_methods_get_a_json_405(service):
    service.start()
    status, payload = service.raw('PUT', '/v1/images/x', b'{}')
    assert status == 405 and 'PUT' in payload['error']['message']
