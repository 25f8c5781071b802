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

=======  ==============================  ====================================
method   path                            what
=======  ==============================  ====================================
GET      /v1/health                      liveness, whether stopping
GET      /metrics                        Prometheus text
GET      /v1/status                      handlers, backend, cache counts
GET      /v1/images                      base images with users
GET      /v1/images/<id>                 one base image
POST     /v1/images/<id>/fetch           job: prepare {handler, project_id}
DELETE   /v1/images/<id>                 remove a base (409 while in use)
POST     /v1/prune                       {dry_run, min_age}
POST     /v1/precache                    job: {image_ids: [...]}
POST     /v1/init                        re-prepare after a restart
GET      /v1/cache                       image-volume cache entries
DELETE   /v1/cache/<image_id>            evict (409 while held)
GET      /v1/volumes                     volumes
POST     /v1/volumes                     job: {image_id, size_gb, project_id}
DELETE   /v1/volumes/<id>                delete a volume
GET      /v1/jobs/<id>[?wait=seconds]    a job's state
DELETE   /v1/jobs/<id>                   cancel a running job (202)
=======  ==============================  ====================================
"""

import grp
import http.server
import json
import logging
import os
import pwd
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
import uuid

from agent import errors, naming
from agent.metrics import REGISTRY

LOG = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
MAX_PRECACHE = 1000
MAX_VOLUME_GB = 64 * 1024
STATUS_OF = {
    errors.InvalidImageId: 400, errors.ConfigError: 400,
    errors.ImageNotFound: 404, errors.BaseImageNotFound: 404,
    errors.VolumeNotFound: 404, errors.CacheEntryNotFound: 404,
    errors.ImageNotAuthorized: 403,
    errors.BaseImageInUse: 409, errors.CacheEntryHeld: 409,
    errors.ImageNotActive: 409,
    errors.ImageUnacceptable: 422, errors.InsufficientSpace: 507,
    errors.SourceUnavailable: 502, errors.DownloadFailed: 502,
    errors.UsageUnknown: 503, errors.BackendUnavailable: 503,
}


class BadRequest(errors.AgentError):
    message = 'Bad request: %(reason)s'
    exit_code = 2


def http_status(exc):
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    if isinstance(exc, BadRequest):
        return 400
    return 500


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

        def progress(done, total):
            if self.cancelling.is_set():
                raise errors.Cancelled()
            if job.cancel_requested.is_set():
                raise errors.JobCancelled()
            job.progress = {'done': done, 'total': total}

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
def _body_fields(body, allowed, required=()):
    if not isinstance(body, dict):
        raise BadRequest(reason='the body must be a JSON object')
    unknown = set(body) - set(allowed)
    if unknown:
        raise BadRequest(reason='unknown field(s): %s' %
                         ', '.join(sorted(map(str, unknown))))
    for name in required:
        if name not in body:
            raise BadRequest(reason='missing field %r' % name)
    for name, kind in allowed.items():
        if name in body and body[name] is not None and not (
                isinstance(body[name], kind) and
                not (kind is int and isinstance(body[name], bool))):
            raise BadRequest(reason='field %r must be %s' % (
                name, getattr(kind, '__name__', kind)))
    return body


def _project(body):
    project = body.get('project_id')
    if project is not None and not re.match(r'^[A-Za-z0-9_.-]{1,255}$',
                                            project):
        raise BadRequest(reason='invalid project_id')
    return project


# -- the server -----------------------------------------------------------
class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class ApiServer:
    """Serves the API of ``service.agent`` (swapped on reload)."""

    def __init__(self, service, socket_path, allowed_groups):
        self.service = service
        self.jobs = Jobs()
        self.socket_path = socket_path
        self.allowed_gids = set()
        for name in allowed_groups:
            try:
                self.allowed_gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                LOG.warning('[api] allowed_groups: no group %r', name)
        self._prepare_socket_path()
        self.server = _Server(socket_path, self._handler_class())
        os.chmod(socket_path, 0o660)
        if self.allowed_gids:
            os.chown(socket_path, -1, sorted(self.allowed_gids)[0])
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
        agent = self.service.agent
        parts = [urllib.parse.unquote(p) for p in path.strip('/').split('/')]
        if method == 'GET' and parts == ['metrics']:
            return 200, self.service.metrics_text()
        if not parts or parts[0] != 'v1':
            raise errors.AgentError('no such path: %s' % path)
        parts = parts[1:]
        stopping = self.jobs.cancelling.is_set()
        if method == 'GET' and parts == ['health']:
            return 200, {'status': 'stopping' if stopping else 'ok',
                         'running_jobs': len(self.jobs.running())}
        if stopping and method != 'GET':
            raise errors.AgentError('the service is stopping; retry later')
        if method == 'GET' and parts == ['status']:
            return 200, agent.status()
        if parts[:1] == ['images']:
            return self._images(agent, method, parts[1:], body)
        if method == 'POST' and parts == ['prune']:
            _body_fields(body, {'dry_run': bool, 'min_age': int})
            if body.get('min_age') is not None and body['min_age'] < 0:
                raise BadRequest(reason='min_age must be >= 0')
            return 200, agent.prune(dry_run=bool(body.get('dry_run')),
                                    min_age=body.get('min_age'))
        if method == 'POST' and parts == ['precache']:
            return self._precache(agent, body)
        if method == 'POST' and parts == ['init']:
            _body_fields(body, {})
            return 200, agent.init()
        if parts[:1] == ['cache']:
            if method == 'GET' and len(parts) == 1:
                return 200, {'entries': agent.cache_list()}
            if method == 'DELETE' and len(parts) == 2:
                return 200, {'evicted': agent.cache_evict(
                    naming.validate_image_id(parts[1]))}
        if parts[:1] == ['volumes']:
            return self._volumes(agent, method, parts[1:], body)
        if method == 'GET' and len(parts) == 2 and parts[0] == 'jobs':
            return self._job(parts[1], query)
        if method == 'DELETE' and len(parts) == 2 and parts[0] == 'jobs':
            return self._cancel_job(parts[1])
        raise errors.AgentError('no such path: %s %s' % (method, path))

    def _images(self, agent, method, rest, body):
        if method == 'GET' and not rest:
            rows, warnings = agent.list_images()
            return 200, {'images': rows, 'warnings': warnings}
        if not rest:
            raise BadRequest(reason='no image id')
        image_id = naming.validate_image_id(rest[0])
        if method == 'GET' and len(rest) == 1:
            return 200, agent.show_image(image_id)
        if method == 'DELETE' and len(rest) == 1:
            return 200, agent.remove_image(image_id)
        if method == 'POST' and rest[1:] == ['fetch']:
            _body_fields(body, {'handler': str, 'project_id': str})
            handler, project = body.get('handler'), _project(body)
            if handler is not None:
                from agent.handlers import registry
                registry.validate(handler)
            job = self.jobs.start('fetch', image_id, lambda progress: {
                'path': agent.fetch_image(image_id, handler=handler,
                                          project_id=project,
                                          progress=progress)})
            return 202, job.to_dict()
        raise errors.AgentError('no such path')

    def _precache(self, agent, body):
        _body_fields(body, {'image_ids': list}, required=('image_ids',))
        ids = body['image_ids']
        if not ids or len(ids) > MAX_PRECACHE:
            raise BadRequest(reason='image_ids must hold 1 to %d ids'
                             % MAX_PRECACHE)
        for image_id in ids:
            if not isinstance(image_id, str):
                raise BadRequest(reason='image ids must be strings')
            naming.validate_image_id(image_id)
        return 202, self.jobs.start(
            'precache', '%d images' % len(ids),
            lambda progress: {'images': agent.precache(ids, progress)}
        ).to_dict()

    def _volumes(self, agent, method, rest, body):
        if method == 'GET' and not rest:
            return 200, {'volumes': agent.list_volumes()}
        if method == 'DELETE' and len(rest) == 1:
            return 200, agent.delete_volume(rest[0])
        if method == 'POST' and not rest:
            _body_fields(body, {'image_id': str, 'size_gb': int,
                                'project_id': str},
                         required=('image_id', 'size_gb'))
            image_id = naming.validate_image_id(body['image_id'])
            size_gb, project = body['size_gb'], _project(body)
            if not 0 < size_gb <= MAX_VOLUME_GB:
                raise BadRequest(reason='size_gb must be 1 to %d'
                                 % MAX_VOLUME_GB)
            job = self.jobs.start('volume-create', image_id, lambda progress: {
                'volume_id': agent.create_volume(image_id, size_gb,
                                                 project_id=project,
                                                 progress=progress)})
            return 202, job.to_dict()
        raise errors.AgentError('no such path')

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

            def address_string(self):
                return 'pid %s uid %s' % getattr(self, 'peer', ('?',) * 3)[:2]

            def log_message(self, fmt, *args):
                LOG.debug('api %s: ' + fmt, self.address_string(), *args)

            def _peer(self):
                creds = self.request.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED,
                    struct.calcsize('3i'))
                return struct.unpack('3i', creds)

            def _send(self, status, payload):
                if isinstance(payload, str):
                    data = payload.encode('utf-8')
                    ctype = 'text/plain; version=0.0.4; charset=utf-8'
                else:
                    data = json.dumps(payload, default=str).encode('utf-8')
                    ctype = 'application/json'
                self.send_response(status)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                REGISTRY.inc('template_agent_api_requests_total',
                             method=self.command, status=status)

            def _dispatch(self, method):
                try:
                    self.peer = self._peer()
                    if not api.authorized(*self.peer):
                        return self._send(403, {'error': {
                            'type': 'Forbidden', 'exit_code': 1,
                            'message': 'uid %d is neither root nor in '
                            '[api] allowed_groups' % self.peer[1]}})
                    url = urllib.parse.urlsplit(self.path)
                    body = self._read_body()
                    status, payload = api.route(
                        method, url.path, urllib.parse.parse_qs(url.query),
                        body)
                    self._send(status, payload)
                except errors.AgentError as exc:
                    status = http_status(exc)
                    if status == 500 and str(exc).startswith('no such path'):
                        status = 404
                    self._send(status, error_body(exc))
                except Exception as exc:  # never take the service down
                    LOG.exception('API request %s %s failed', method,
                                  self.path)
                    self._send(500, {'error': {
                        'type': type(exc).__name__, 'exit_code': 1,
                        'message': 'internal error: %s' % exc}})

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
                raw = self.rfile.read(length)
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

            def do_PUT(self):
                self._dispatch('PUT')

        return Handler
