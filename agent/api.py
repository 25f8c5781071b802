"""The service's local API: HTTP with JSON bodies on a Unix socket.

Every peer is identified with SO_PEERCRED and must be root, the service's
own user, or a member of ``[api] allowed_groups`` (403 otherwise). Every
request is validated (400 with a message) and no request can take the
service down: a handler error becomes a JSON error answer.

Long operations (fetch, precache, volume create) run as jobs: the POST
answers 202 with the job, ``GET /v1/jobs/<id>?wait=<seconds>`` reports its
progress and, once done, its result or error. ``DELETE /v1/jobs/<id>``
cancels one: it stops at its next progress report, which a download makes
at least every half second even while its source sends nothing, and rolls
back (state ``cancelled``, nothing published).

No peer can starve the others (see the ``[api]`` options): the accept
loop reads SO_PEERCRED and caps the connections of each uid
(``max_connections_per_uid``) and of all unprivileged peers together
(``max_connections``) before a thread is spent on them; a connection over a
cap gets a 503 at once and is closed. Root and the service's own uid are
outside the total, so allowed groups cannot crowd them out. A connection
without a request for ``idle_timeout`` seconds is closed, and so is one
whose request line and headers take longer than ``header_timeout`` from
their first byte; a body late by ``body_timeout`` gets a 408.

Routes, parameters and results come from the declarations in
``agent.operations`` (the reference is docs/api.md, generated from them);
this module adds the service's own routes: health, metrics and jobs.
"""

import collections
import grp
import http.server
import io
import json
import logging
import os
import pwd
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
import uuid

from agent import errors, operations
from agent.metrics import REGISTRY

LOG = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
# socketserver listens with 5: a burst of clients would fail to connect
# (EAGAIN when the client has a timeout) instead of waiting to be accepted
LISTEN_BACKLOG = 1024
STATUS_OF = {
    errors.InvalidImageId: 400, errors.ConfigError: 400,
    errors.ImageNotFound: 404, errors.BaseImageNotFound: 404,
    errors.VolumeNotFound: 404, errors.CacheEntryNotFound: 404,
    errors.ImageNotAuthorized: 403,
    errors.BaseImageInUse: 409, errors.CacheEntryHeld: 409,
    errors.ImageNotActive: 409, errors.UnsafePath: 409,
    errors.ImageUnacceptable: 422, errors.InsufficientSpace: 507,
    errors.SourceUnavailable: 502, errors.DownloadFailed: 502,
    errors.UsageUnknown: 503, errors.BackendUnavailable: 503,
}


BadRequest = operations.BadRequest


class NotFound(errors.AgentError):
    message = 'no such path: %(method)s %(path)s (see docs/api.md)'
    http_status = 404


class MethodNotAllowed(errors.AgentError):
    message = '%(method)s is not allowed on %(path)s; use %(allow)s'
    http_status = 405


class RequestTimeout(errors.AgentError):
    message = ('the request body did not arrive within %(seconds)d s '
               '([api] body_timeout)')
    http_status = 408


def http_status(exc):
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return getattr(exc, 'http_status', 500)


def error_body(exc):
    return {'error': {'type': type(exc).__name__, 'message': str(exc),
                      'exit_code': getattr(exc, 'exit_code', 1)}}


# -- jobs ---------------------------------------------------------------------
class Job:
    def __init__(self, kind, target):
        self.id = str(uuid.uuid4())
        self.kind = kind
        self.target = target
        self.state = 'running'
        self.progress = {'done': 0, 'total': None}
        self.result = None
        self.error = None
        self.created = time.time()
        self.finished = None
        self.done = threading.Event()
        self.cancel_requested = threading.Event()

    def to_dict(self):
        return {'id': self.id, 'kind': self.kind, 'target': self.target,
                'state': self.state, 'progress': dict(self.progress),
                'result': self.result, 'error': self.error,
                'created': self.created, 'finished': self.finished}


class Jobs:
    """Runs jobs on threads; on stop, cancels them at their next progress
    report so their handlers roll back (nothing partial is published)."""

    KEEP_SECONDS = 3600

    def __init__(self):
        self._jobs = {}
        self._lock = threading.Lock()
        self.cancelling = threading.Event()

    def start(self, kind, target, fn):
        """Run ``fn(progress)`` on a thread; return the Job."""
        job = Job(kind, target)
        with self._lock:
            self._expire()
            self._jobs[job.id] = job

        def progress(done, total, sources=None):
            if self.cancelling.is_set():
                raise errors.Cancelled()
            if job.cancel_requested.is_set():
                raise errors.JobCancelled()
            job.progress = {'done': done, 'total': total}
            if sources is not None:
                job.progress['sources'] = dict(sources)

        def run():
            try:
                job.result = fn(progress)
                job.state = 'succeeded'
            except errors.AgentError as exc:
                job.error = error_body(exc)['error']
                job.state = 'cancelled' if isinstance(
                    exc, errors.Cancelled) else 'failed'
            except Exception as exc:  # reported, never kills the service
                LOG.exception('job %s (%s %s) failed', job.id, kind, target)
                job.error = {'type': type(exc).__name__, 'message': str(exc),
                             'exit_code': 1}
                job.state = 'failed'
            finally:
                job.finished = time.time()
                job.done.set()
        threading.Thread(target=run, name='job-' + kind, daemon=True).start()
        return job

    def get(self, job_id):
        return self._jobs.get(job_id)

    def cancel(self, job_id):
        """Ask a job to stop at its next progress report; the job, or None
        for an unknown id."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.cancel_requested.set()
        return job

    def running(self):
        return [j for j in list(self._jobs.values()) if not j.done.is_set()]

    def cancel_all(self, timeout):
        self.cancelling.set()
        deadline = time.monotonic() + timeout
        for job in self.running():
            job.done.wait(max(0, deadline - time.monotonic()))
        return not self.running()

    def _expire(self):
        cutoff = time.time() - self.KEEP_SECONDS
        for job_id, job in list(self._jobs.items()):
            if job.finished and job.finished < cutoff:
                del self._jobs[job_id]


# -- validation -----------------------------------------------------------
# -- the server -----------------------------------------------------------
def _peer(sock):
    """``(pid, uid, gid)`` of the process that connected ``sock``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                            struct.calcsize('3i'))
    return struct.unpack('3i', creds)


def _privileged(uid):
    return uid in (0, os.getuid())


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Accepts on one thread and refuses connections over the caps there,
    without a thread. Each admitted connection gets a thread, so the caps
    bound the threads: at most ``max_connections`` plus
    ``max_connections_per_uid`` for root and for the service's uid."""

    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, path, handler_class, limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._per_uid = collections.Counter()
        self._unprivileged = 0
        self._refused = 0
        self._next_warning = 0
        super().__init__(path, handler_class)

    def get_request(self):
        sock, _ = self.socket.accept()
        return sock, _peer(sock)  # the handlers' client_address

    def verify_request(self, sock, peer):
        refusal = self._admit(peer[1])
        if refusal:
            self._refuse(sock, peer, *refusal)
        return not refusal

    def _admit(self, uid):
        """Count a connection of ``uid`` in; or return ``(cap, why)`` if a
        cap is full."""
        limits = self.limits
        with self._lock:
            if self._per_uid[uid] >= limits.max_connections_per_uid:
                return 'max_connections_per_uid', (
                    'uid %d has %d connections open ([api] '
                    'max_connections_per_uid)' % (uid, self._per_uid[uid]))
            if not _privileged(uid) and \
                    self._unprivileged >= limits.max_connections:
                return 'max_connections', (
                    '%d connections are open ([api] max_connections)'
                    % self._unprivileged)
            self._per_uid[uid] += 1
            self._unprivileged += not _privileged(uid)
        return None

    def _release(self, uid):
        with self._lock:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]
            self._unprivileged -= not _privileged(uid)

    def _refuse(self, sock, peer, cap, why):
        body = json.dumps({'error': {
            'type': 'TooManyConnections', 'exit_code': 1,
            'message': why + '; retry later'}}).encode()
        sock.setblocking(False)  # the accept loop never waits for a peer
        try:
            sock.send(b'HTTP/1.1 503 Service Unavailable\r\n'
                      b'Content-Type: application/json\r\n'
                      b'Content-Length: %d\r\nConnection: close\r\n\r\n%s'
                      % (len(body), body))
        except OSError:
            pass  # gone already: closing is answer enough
        REGISTRY.inc('template_agent_api_connections_refused_total', cap=cap)
        # one line a minute, however hard a peer keeps knocking
        self._refused += 1
        if time.monotonic() >= self._next_warning:
            LOG.warning('refused %d API connection(s) in the last minute, '
                        'the latest of pid %d uid %d: %s', self._refused,
                        peer[0], peer[1], why)
            self._refused = 0
            self._next_warning = time.monotonic() + 60

    def process_request(self, sock, peer):
        try:
            super().process_request(sock, peer)
        except BaseException:  # no thread: the connection is not counted
            self._release(peer[1])
            raise

    def process_request_thread(self, sock, peer):
        try:
            super().process_request_thread(sock, peer)
        finally:
            self._release(peer[1])

    def handle_error(self, sock, peer):
        # socketserver would print a traceback on stderr, where logs are
        # JSON lines; a peer that hangs up mid-answer is no service error
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            LOG.info('api pid %d uid %d: connection lost: %s', peer[0],
                     peer[1], exc)
        else:
            LOG.exception('api pid %d uid %d: connection failed', peer[0],
                          peer[1])


class _DeadlineReader(io.RawIOBase):
    """The reading side of a socket, where each recv only waits for what
    is left until ``deadline``: a per-recv timeout alone would let a peer
    stretch its request forever by trickling a byte at a time. Between
    reads, the socket's timeout is ``write_timeout`` (a peer that does not
    take its answer)."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = 0.0
        self.write_timeout = None

    def readable(self):
        return True

    def readinto(self, buf):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout('deadline passed')
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        finally:
            self.sock.settimeout(self.write_timeout)


class ApiServer:
    """Serves the API of ``service.agent`` (swapped on reload).

    ``conf`` is the ``[api]`` group; assign ``limits`` on reload to apply
    new timeouts and caps (``socket_path`` and ``allowed_groups`` need a
    restart)."""

    def __init__(self, service, conf):
        self.service = service
        self.jobs = Jobs()
        self.socket_path = conf.socket_path
        self.allowed_gids = set()
        for name in conf.allowed_groups:
            try:
                self.allowed_gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                LOG.warning('[api] allowed_groups: no group %r', name)
        self._prepare_socket_path()
        self.server = _Server(self.socket_path, self._handler_class(), conf)
        os.chmod(self.socket_path, 0o660)
        if self.allowed_gids:
            os.chown(self.socket_path, -1, sorted(self.allowed_gids)[0])
        self._precache_pool = None
        self._thread = threading.Thread(target=self.server.serve_forever,
                                         name='api', daemon=True)

    def _prepare_socket_path(self):
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755,
                    exist_ok=True)
        if os.path.exists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)  # stale, from a killed service
            else:
                raise errors.ConfigError(
                    reason='another service answers on %s' % self.socket_path)
            finally:
                probe.close()

    @property
    def limits(self):
        return self.server.limits

    @limits.setter
    def limits(self, conf):
        self.server.limits = conf

    def start(self):
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        except PermissionError:  # root's directory; the next start cleans
            LOG.info('leaving %s for the next start to remove',
                     self.socket_path)

    # -- authorization ------------------------------------------------------
    def authorized(self, pid, uid, gid):
        if uid in (0, os.getuid()) or gid in self.allowed_gids:
            return True
        groups = set()
        try:
            with open('/proc/%d/status' % pid) as f:
                for line in f:
                    if line.startswith('Groups:'):
                        groups = {int(g) for g in line.split()[1:]}
        except (OSError, ValueError):
            try:
                groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
            except KeyError:
                groups = set()
        return bool(groups & self.allowed_gids)

    # -- routes -------------------------------------------------------------
    def route(self, method, path, query, body):
        """Return ``(status, payload)``; payload is a dict or text."""
        parts = [urllib.parse.unquote(p) for p in path.strip('/').split('/')]
        if parts == ['metrics']:
            if method != 'GET':
                raise MethodNotAllowed(method=method, path=path, allow='GET')
            return 200, self.service.metrics_text()
        if parts[:1] != ['v1']:
            raise NotFound(method=method, path=path)
        stopping = self.jobs.cancelling.is_set()
        if method == 'GET' and parts == ['v1', 'health']:
            return 200, {'status': 'stopping' if stopping else 'ok',
                         'running_jobs': len(self.jobs.running())}
        if len(parts) == 3 and parts[1] == 'jobs':
            if method == 'GET':
                return self._job(parts[2], query)
            if method == 'DELETE':
                return self._cancel_job(parts[2])
            raise MethodNotAllowed(method=method, path=path,
                                   allow='GET, DELETE')
        if stopping and method != 'GET':
            raise errors.AgentError('the service is stopping; retry later')
        allowed = []
        for op in operations.OPERATIONS:
            values = op.match(parts)
            if values is None:
                continue
            if op.method == method:
                return self._call(op, op.bind(values, body))
            allowed.append(op.method)
        if allowed:
            raise MethodNotAllowed(method=method, path=path,
                                   allow=', '.join(allowed))
        raise NotFound(method=method, path=path)

    def _call(self, op, kwargs):
        call = op.implementation(self.service.agent)
        if not op.job:
            return 200, op.encode(call(**kwargs))
        job = self.jobs.start(op.job, op.describe(kwargs), lambda progress:
                              op.encode(call(progress=progress, **kwargs)))
        return 202, job.to_dict()

    def _job(self, job_id, query):
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {'error': {'type': 'JobNotFound', 'exit_code': 1,
                                   'message': 'no job %s' % job_id}}
        try:
            wait = min(float(query.get('wait', ['0'])[0]), 60.0)
        except ValueError:
            raise BadRequest(reason='wait must be a number of seconds')
        if wait > 0:
            job.done.wait(wait)
        return 200, job.to_dict()

    def _cancel_job(self, job_id):
        job = self.jobs.cancel(job_id)
        if job is None:
            return 404, {'error': {'type': 'JobNotFound', 'exit_code': 1,
                                   'message': 'no job %s' % job_id}}
        return (200 if job.done.is_set() else 202), job.to_dict()

    def _handler_class(api):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'
            server_version = 'template-agent'
            methods = ('GET', 'POST', 'DELETE')

            def setup(self):
                super().setup()
                self.rfile.close()
                self.reader = _DeadlineReader(self.connection)
                self.rfile = io.BufferedReader(self.reader)

            def address_string(self):
                return 'pid %s uid %s' % self.client_address[:2]

            def log_message(self, fmt, *args):
                LOG.debug('api %s: ' + fmt, self.address_string(), *args)

            def handle_one_request(self):
                limits = self.server.limits
                self.reader.write_timeout = limits.idle_timeout
                self.reader.deadline = time.monotonic() + limits.idle_timeout
                try:
                    if not self.rfile.peek(1):
                        self.close_connection = True
                        return
                except OSError:  # idle for too long, or gone
                    self.close_connection = True
                    return
                # from its first byte, the whole header has a deadline
                self.reader.deadline = (time.monotonic() +
                                        limits.header_timeout)
                super().handle_one_request()

            def parse_request(self):
                if not super().parse_request():
                    return False
                if self.command in self.methods:
                    return True
                self.close_connection = True
                try:
                    # a small body is taken, so the peer reads the answer
                    # instead of a broken pipe; a larger one stays unread
                    self._read_body()
                except (errors.AgentError, OSError):
                    pass
                self._send(405, {'error': {
                    'type': 'MethodNotAllowed', 'exit_code': 1,
                    'message': 'method %s is not supported; use %s' % (
                        self.command, ', '.join(self.methods))}},
                    allow=', '.join(self.methods))
                return False

            def _send(self, status, payload, allow=None):
                if isinstance(payload, str):
                    data = payload.encode('utf-8')
                    ctype = 'text/plain; version=0.0.4; charset=utf-8'
                else:
                    data = json.dumps(payload, default=str).encode('utf-8')
                    ctype = 'application/json'
                self.send_response(status)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(data)))
                if allow:
                    self.send_header('Allow', allow)
                if self.close_connection:
                    self.send_header('Connection', 'close')
                self.end_headers()
                self.wfile.write(data)
                REGISTRY.inc('template_agent_api_requests_total',
                             method=self.command, status=status)

            def _dispatch(self, method):
                # outside _answer: a peer that does not take its answer
                # is dropped by handle_one_request, not answered a 500
                self._send(*self._answer(method))

            def _answer(self, method):
                try:
                    if not api.authorized(*self.client_address):
                        return 403, {'error': {
                            'type': 'Forbidden', 'exit_code': 1,
                            'message': 'uid %d is neither root nor in '
                            '[api] allowed_groups' % self.client_address[1]}}
                    url = urllib.parse.urlsplit(self.path)
                    body = self._read_body()
                    return api.route(
                        method, url.path, urllib.parse.parse_qs(url.query),
                        body)
                except errors.AgentError as exc:
                    return http_status(exc), error_body(exc)
                except Exception as exc:  # never take the service down
                    LOG.exception('API request %s %s failed', method,
                                  self.path)
                    return 500, {'error': {
                        'type': type(exc).__name__, 'exit_code': 1,
                        'message': 'internal error: %s' % exc}}

            def _read_body(self):
                try:
                    length = int(self.headers.get('Content-Length') or 0)
                except ValueError:
                    raise BadRequest(reason='bad Content-Length')
                if length < 0 or length > MAX_BODY:
                    raise BadRequest(reason='body larger than %d bytes'
                                     % MAX_BODY)
                if not length:
                    return {}
                timeout = self.server.limits.body_timeout
                self.reader.deadline = time.monotonic() + timeout
                try:
                    raw = self.rfile.read(length)
                except socket.timeout:
                    self.close_connection = True  # the rest may still come
                    raise RequestTimeout(seconds=timeout)
                try:
                    return json.loads(raw.decode('utf-8'))
                except (UnicodeDecodeError, ValueError):
                    raise BadRequest(reason='the body is not JSON')

            def do_GET(self):
                self._dispatch('GET')

            def do_POST(self):
                self._dispatch('POST')

            def do_DELETE(self):
                self._dispatch('DELETE')

        return Handler
