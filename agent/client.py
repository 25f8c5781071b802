"""The CLI's way to the service: the local API over its Unix socket.

``ServiceClient`` has a method for every operation of ``agent.operations``,
with the arguments and results of the core's method of that name, so the
CLI calls and formats both alike.

http.client (and the ssl module it loads) is imported by the first
request, not by the check whether a service answers: a CLI that finds
none works in process without it.
"""

import functools
import json
import socket
import urllib.parse

from agent import errors, operations

WAIT_STEP = 1.0


def _connection_class():
    """``_UnixConnection``, defined (http.client imported) on first use."""
    cls = globals().get('_UnixConnection')
    if cls is None:
        cls = globals()['_UnixConnection'] = _define_unix_connection()
    return cls


def _define_unix_connection():
    import http.client

    class _UnixConnection(http.client.HTTPConnection):
        """``HTTPConnection(path, timeout)`` to the Unix socket ``path``."""

        def __init__(self, path, timeout=300):
            super().__init__('localhost', timeout=timeout)
            self.unix_path = path

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(self.unix_path)

    return _UnixConnection


def __getattr__(name):
    if name == '_UnixConnection':
        return _connection_class()
    raise AttributeError('module %r has no attribute %r' % (__name__, name))


class ServiceError(errors.AgentError):
    """An error answered by the service, with its message and exit code."""

    def __init__(self, body):
        super().__init__(body.get('message') or 'the service failed')
        self.exit_code = body.get('exit_code', 1)
        self.type = body.get('type')


def service_answers(path):
    """Whether a service listens on ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class ServiceClient:
    def __init__(self, socket_path):
        self.socket_path = socket_path

    def __getattr__(self, name):
        op = operations.BY_NAME.get(name)
        if op is None:
            raise AttributeError(name)
        return functools.partial(self.call, op)

    def call(self, op, *args, progress=None, **kwargs):
        """Run ``op`` on the service; its result, as the core returns it."""
        payload = self.request(*op.request(args, kwargs))
        if op.job:
            payload = self._follow(payload, progress)
        return op.decode(payload)

    def request(self, method, path, body=None):
        conn = _connection_class()(self.socket_path)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={
                'Content-Type': 'application/json'} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as exc:
            raise errors.AgentError('the service on %s did not answer: %s'
                                    % (self.socket_path, exc))
        finally:
            conn.close()
        if resp.getheader('Content-Type', '').startswith('text/plain'):
            return raw.decode()
        payload = json.loads(raw.decode() or '{}')
        if resp.status >= 400:
            raise ServiceError(payload.get('error', {}))
        return payload

    def _follow(self, job, progress=None):
        """Follow a job until it ends; return its result or raise."""
        def report():
            done = job['progress']
            if progress and done['done']:
                progress(done['done'], done['total'],
                         sources=done.get('sources'))

        while job['state'] == 'running':
            report()
            job = self.request('GET', '/v1/jobs/%s?wait=%s' % (
                job['id'], WAIT_STEP))
        if job['state'] != 'succeeded':
            raise ServiceError(job['error'] or {})
        report()
        return job['result']

    def cancel_job(self, job_id):
        """Ask the service to cancel a job; returns the job's state."""
        return self.request('DELETE', '/v1/jobs/%s'
                            % urllib.parse.quote(job_id, safe=''))
