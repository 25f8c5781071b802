"""Hosts on one machine: Linux network namespaces, veth pairs and a bridge,
with ``tc`` rate limits, for multi-host tests and benchmarks (as root).

``Network(n_hosts, glance_mbit, host_mbit)`` makes a namespace holding a
bridge, one for "Glance" and one per hypervisor, each with an address on
a private test range and a token bucket on both ends of its link. Use it as
a context manager: the namespaces (and with them every veth) are removed
on the way out, whatever happened. ``entered(namespace)`` runs a block
of this thread in a namespace: sockets made there stay in it (so a test
can run the Glance stand-in in the Glance namespace, in process).

``PeerAgents`` runs real agents (``template-agent serve``) in those
namespaces, each with its own instances_path, state and mTLS certificate,
and stops them by PID in ``finally``.
"""

import contextlib
import ctypes
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.conftest import REPO, AgentEnv

CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
AGENT_PORT = 9395


def _run(*args):
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError('%s failed: %s' % (' '.join(args), proc.stderr))


def _setns(fd):
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, 'setns: %s' % os.strerror(err))


@contextlib.contextmanager
def entered(namespace):
    """This thread in network namespace ``namespace`` for the block."""
    own = os.open('/proc/thread-self/ns/net', os.O_RDONLY)
    target = os.open('/run/netns/%s' % namespace, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


class Network:
    def __init__(self, n_hosts, glance_mbit=160, host_mbit=800):
        tag = 'p%d' % (os.getpid() % 10000)
        self.subnet = '10.213.%d' % (os.getpid() % 200 + 20)
        self.bridge_ns = tag + 'br'
        self.glance_ns = tag + 'g'
        self.glance_ip = self.subnet + '.1'
        self.hosts = ['%sh%d' % (tag, i) for i in range(1, n_hosts + 1)]
        self.ips = ['%s.%d' % (self.subnet, 10 + i)
                    for i in range(1, n_hosts + 1)]
        self.glance_mbit = glance_mbit
        self.host_mbit = host_mbit
        self.made = []

    def __enter__(self):
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc):
        self.down()

    def _up(self):
        br = self.bridge_ns
        _run('ip', 'netns', 'add', br)
        self.made.append(br)
        _run('ip', '-n', br, 'link', 'add', 'br0', 'type', 'bridge')
        _run('ip', '-n', br, 'link', 'set', 'br0', 'up')
        self._add(self.glance_ns, self.glance_ip, self.glance_mbit)
        for name, ip in zip(self.hosts, self.ips):
            self._add(name, ip, self.host_mbit)

    def _add(self, name, ip, mbit):
        br = self.bridge_ns
        _run('ip', 'netns', 'add', name)
        self.made.append(name)
        _run('ip', 'link', 'add', name + '-e', 'type', 'veth', 'peer',
             'name', name + '-b')
        _run('ip', 'link', 'set', name + '-e', 'netns', name)
        _run('ip', 'link', 'set', name + '-b', 'netns', br)
        _run('ip', '-n', br, 'link', 'set', name + '-b', 'master', 'br0')
        _run('ip', '-n', br, 'link', 'set', name + '-b', 'up')
        _run('ip', '-n', name, 'addr', 'add', ip + '/24', 'dev', name + '-e')
        _run('ip', '-n', name, 'link', 'set', name + '-e', 'up')
        _run('ip', '-n', name, 'link', 'set', 'lo', 'up')
        self.limit(name, mbit)

    def limit(self, name, mbit):
        """(Re)set the rate of ``name``'s link, both ways."""
        for ns, dev in ((name, name + '-e'), (self.bridge_ns, name + '-b')):
            subprocess.run(['ip', 'netns', 'exec', ns, 'tc', 'qdisc', 'del',
                            'dev', dev, 'root'], capture_output=True)
            _run('ip', 'netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', dev,
                 'root', 'tbf', 'rate', '%dmbit' % mbit, 'burst', '256kb',
                 'latency', '50ms')

    def down(self):
        failed = []
        for name in reversed(self.made):
            proc = subprocess.run(['ip', 'netns', 'del', name],
                                  capture_output=True, text=True)
            if proc.returncode:
                failed.append('%s: %s' % (name, proc.stderr.strip()))
        self.made = []
        if failed:
            raise RuntimeError('cannot remove namespaces: %s'
                               % '; '.join(failed))

    def exists(self):
        names = subprocess.run(['ip', 'netns', 'list'], capture_output=True,
                               text=True).stdout
        return any(n in names.split() for n in
                   [self.bridge_ns, self.glance_ns] + self.hosts)


class Relay:
    """A TCP relay from ``address:port`` in ``namespace`` (a free port) to
    ``target`` (``(host, port)`` in this process's own namespace), so
    that hosts in the namespaces reach a server that runs outside them
    (the real Glance) through the namespace's rate-limited link. Counts the
    bytes relayed towards the clients (``sent``). Only a wire: what
    crosses it is untouched. With ``namespace`` None it listens in this
    process's own namespace (a counting proxy on loopback). With ``rate``
    (bytes per second), what it sends towards the clients shares one link
    of that rate, first come first served (a server's uplink, without a
    namespace)."""

    def __init__(self, namespace, address, target, rate=None):
        self.target = target
        self.rate = rate
        self._free_at = 0.0  # when the capped link is free again
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets = []
        with entered(namespace) if namespace else contextlib.nullcontext():
            self.listener = socket.create_server((address, 0))
        self.url = 'http://%s:%d' % (address,
                                     self.listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stop.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._thread.join(10)

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for a, b, count in ((client, server, False),
                                (server, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, count),
                                 daemon=True).start()

    def _pipe(self, source, sink, count):
        try:
            while True:
                data = source.recv(1 << 20)
                if not data:
                    break
                if count and self.rate:
                    with self._lock:
                        start = max(time.monotonic(), self._free_at)
                        self._free_at = start + len(data) / self.rate
                    time.sleep(max(0.0, self._free_at - time.monotonic()))
                sink.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _run_on_a_terminal(command, environ, timeout):
    """Run ``command`` with its stderr on a pseudo-terminal; its return
    code and its stdout followed by what it wrote on the terminal. Only
    the command holds the terminal's other end, so its master is read
    until the kernel says that end is closed (EIO) and every byte written
    to it was delivered: no guess at how long the terminal may lag."""
    master, slave = pty.openpty()
    screen = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command's end closed, all read
                return
            if not data:
                return
            screen.append(data)
    reader = threading.Thread(target=drain, daemon=True)
    try:
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                    stderr=slave, env=environ)
        finally:
            os.close(slave)
        reader.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        # a child the command left behind may hold the terminal: bounded
        reader.join(30)
        assert not reader.is_alive(), \
            'something %s started still holds its terminal' % command[:3]
    finally:
        if not reader.is_alive():
            os.close(master)
    return proc.returncode, (out + b''.join(screen)).decode(
        errors='replace')


def make_certificates(directory):
    """A CA and an agent certificate signed by it (``ca.pem``,
    ``agent.pem``, ``agent.key``), and one from another CA
    (``rogue.pem``, ``rogue.key``)."""
    def openssl(*args):
        _run('openssl', *args)
    os.makedirs(directory, exist_ok=True)
    p = lambda name: os.path.join(directory, name)  # noqa: E731
    for ca in ('ca', 'otherca'):
        openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt',
                'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
                '-subj', '/CN=test %s' % ca, '-keyout', p(ca + '.key'),
                '-out', p(ca + '.pem'))
    for name, ca in (('agent', 'ca'), ('rogue', 'otherca')):
        openssl('req', '-newkey', 'ec', '-pkeyopt',
                'ec_paramgen_curve:prime256v1', '-nodes', '-subj',
                '/CN=%s' % name, '-keyout', p(name + '.key'), '-out',
                p(name + '.csr'))
        openssl('x509', '-req', '-in', p(name + '.csr'), '-CA', p(ca + '.pem'),
                '-CAkey', p(ca + '.key'), '-CAcreateserial', '-days', '2',
                '-out', p(name + '.pem'))
    return {name: p(name) for name in (
        'ca.pem', 'agent.pem', 'agent.key', 'rogue.pem', 'rogue.key')}


class PeerAgents:
    """Agents (``template-agent serve``), one per host of ``net``, that
    share images peer to peer; ``glance_url`` is their image source."""

    def __init__(self, root, net, glance_url, certs, peers=None, agents=None,
                 **p2p):
        self.net = net
        self.root = str(root)
        self.procs = {}
        self.envs = []
        peers = peers or ['%s:%d' % (ip, AGENT_PORT) for ip in net.ips]
        self.peers = peers
        for i, (ns, ip) in enumerate(zip(net.hosts, net.ips)):
            settings = dict(enabled='true', peers=','.join(peers),
                            listen='%s:%d' % (ip, AGENT_PORT),
                            ca_file=certs['ca.pem'],
                            cert_file=certs['agent.pem'],
                            key_file=certs['agent.key'], segment_size_mb=4,
                            stall_timeout=10, seed_time=60)
            settings.update(p2p)
            env = AgentEnv(os.path.join(self.root, 'host%d' % (i + 1)),
                           DEFAULT={'host': ns},
                           image_source={'driver': 'glance'},
                           glance={'api_servers': glance_url,
                                   'num_retries': 3, 'read_timeout': 5},
                           image_cache={'manager_interval': -1},
                           p2p=settings)
            env.namespace = ns
            env.ip = ip
            env.peer = '%s:%d' % (ip, AGENT_PORT)
            self.envs.append(env)
        # hosts of the peer set without an agent (for a rogue one)
        self.others = [env for i, env in enumerate(self.envs)
                       if agents is not None and i not in agents]
        self.envs = [env for env in self.envs if env not in self.others]

    def __enter__(self):
        try:
            for env in self.envs:
                self.start(env)
            for env in self.envs:
                self.wait_ready(env)
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc):
        self.stop_all()

    def start(self, env):
        log = open(os.path.join(env.root, 'serve.log'), 'ab')
        self.procs[env.namespace] = subprocess.Popen(
            ['ip', 'netns', 'exec', env.namespace, sys.executable, '-m',
             'agent.cli', '--verbose', '--config-file', env.conf_path,
             'serve'],
            stdout=log, stderr=log, env=dict(os.environ, PYTHONPATH=REPO))
        log.close()

    def wait_ready(self, env, timeout=60):
        from agent import client
        deadline = time.monotonic() + timeout
        path = env.sections['api']['socket_path']
        while time.monotonic() < deadline:
            proc = self.procs[env.namespace]
            if proc.poll() is not None:
                raise AssertionError('agent in %s exited %d: %s' % (
                    env.namespace, proc.returncode, self.log(env, 40)))
            if client.service_answers(path):
                try:  # answers once init is done and the swarm listens
                    client.ServiceClient(path).request('GET', '/v1/health')
                    return
                except Exception:
                    pass
            time.sleep(0.1)
        raise AssertionError('agent in %s not ready in %d s: %s' % (
            env.namespace, timeout, self.log(env, 40)))

    def start_rogue(self, env, *args):
        """``tests/p2p_rogue.py`` in ``env``'s namespace; waits for it to
        serve."""
        log_path = os.path.join(env.root, 'rogue.log')
        log = open(log_path, 'ab')
        proc = subprocess.Popen(
            ['ip', 'netns', 'exec', env.namespace, sys.executable, '-m',
             'tests.p2p_rogue', '--config-file', env.conf_path] +
            list(args), stdout=subprocess.PIPE, stderr=log,
            env=dict(os.environ, PYTHONPATH=REPO))
        log.close()
        self.procs[env.namespace] = proc
        line = proc.stdout.readline()
        if line.strip() != b'ready':
            with open(log_path) as f:
                raise AssertionError('rogue did not start: %s'
                                     % f.read()[-3000:])
        return proc

    def log(self, env, tail=None):
        """``env``'s service log, or its last ``tail`` lines, without
        libtorrent's alerts (those are for debugging)."""
        try:
            with open(os.path.join(env.root, 'serve.log')) as f:
                lines = [line for line in f if '_alert: ' not in line]
        except OSError:
            return ''
        return ''.join(lines[-tail:] if tail else lines)

    def kill(self, env, sig=signal.SIGKILL):
        proc = self.procs.pop(env.namespace, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(30)

    def stop_all(self):
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in list(self.procs.values()):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs = {}

    def fetch_all(self, image_id, envs=None, timeout=300, terminal=False):
        """``fetch image_id`` on every host at once (the CLI, through each
        host's service); ``{namespace: (returncode, output, seconds)}``.
        With ``terminal``, each CLI's stderr is a pseudo-terminal, so it
        draws its progress bar as an operator would see it."""
        envs = envs if envs is not None else self.envs
        results = {}

        def one(env):
            started = time.monotonic()
            command = [sys.executable, '-m', 'agent.cli', '--config-file',
                       env.conf_path, 'fetch', image_id]
            environ = dict(os.environ, PYTHONPATH=REPO)
            if terminal:
                code, out = _run_on_a_terminal(command, environ, timeout)
            else:
                proc = subprocess.run(command, capture_output=True,
                                      text=True, timeout=timeout,
                                      env=environ)
                code, out = proc.returncode, proc.stdout + proc.stderr
            results[env.namespace] = (code, out,
                                      time.monotonic() - started)
        threads = [threading.Thread(target=one, args=(env,)) for env in envs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def status(self, env, fmt='json'):
        import json
        proc = subprocess.run(
            [sys.executable, '-m', 'agent.cli', '--config-file',
             env.conf_path, 'status', '--format', fmt],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if fmt == 'json' else proc.stdout
