"""The CLI's way to the service: the local API over its Unix socket.

``ServiceClient`` offers the calls of ``agent.core.TemplateAgent`` that the
CLI uses, with the same results, so the CLI formats both alike.
"""

import http.client
import json
import socket
import time
import urllib.parse

from agent import errors

WAIT_STEP = 1.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=300):
        super().__init__('localhost', timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


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

    def request(self, method, path, body=None):
        conn = _UnixConnection(self.socket_path)
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

    def _job(self, job, progress=None):
        """Follow a job until it ends; return its result or raise."""
        while job['state'] == 'running':
            if progress and job['progress']['done']:
                progress(job['progress']['done'], job['progress']['total'])
            job = self.request('GET', '/v1/jobs/%s?wait=%s' % (
                job['id'], WAIT_STEP))
        if job['state'] != 'succeeded':
            raise ServiceError(job['error'] or {})
        if progress and job['progress']['done']:
            progress(job['progress']['done'], job['progress']['total'])
        return job['result']

    @staticmethod
    def _id(image_id):
        return urllib.parse.quote(image_id, safe='')

    # -- the calls of TemplateAgent the CLI uses ---------------------------
    def fetch_image(self, image_id, handler=None, project_id=None,
                    progress=None):
        body = {k: v for k, v in (('handler', handler),
                                  ('project_id', project_id)) if v}
        job = self.request('POST', '/v1/images/%s/fetch' % self._id(image_id),
                           body)
        return self._job(job, progress)['path']

    def cancel_job(self, job_id):
        """Ask the service to cancel a job; returns the job's state."""
        return self.request('DELETE', '/v1/jobs/%s' % self._id(job_id))

    def list_images(self):
        payload = self.request('GET', '/v1/images')
        return payload['images'], payload['warnings']

    def show_image(self, image_id):
        return self.request('GET', '/v1/images/%s' % self._id(image_id))

    def remove_image(self, image_id):
        return self.request('DELETE', '/v1/images/%s' % self._id(image_id))

    def prune(self, dry_run=False, min_age=None):
        return self.request('POST', '/v1/prune', {'dry_run': dry_run,
                                                  'min_age': min_age})

    def init(self):
        return self.request('POST', '/v1/init', {})

    def precache(self, image_ids, progress=None):
        job = self.request('POST', '/v1/precache', {'image_ids': image_ids})
        return self._job(job, progress)['images']

    def create_volume(self, image_id, size_gb, project_id=None,
                      progress=None):
        job = self.request('POST', '/v1/volumes', {
            'image_id': image_id, 'size_gb': size_gb,
            'project_id': project_id})
        return self._job(job, progress)['volume_id']

    def list_volumes(self):
        return self.request('GET', '/v1/volumes')['volumes']

    def delete_volume(self, volume_id):
        return self.request('DELETE', '/v1/volumes/%s' % self._id(volume_id))

    def cache_list(self):
        return self.request('GET', '/v1/cache')['entries']

    def cache_evict(self, image_id):
        return self.request('DELETE',
                            '/v1/cache/%s' % self._id(image_id))['evicted']

    def status(self):
        return dict(self.request('GET', '/v1/status'), service=True)

    def metrics(self):
        return self.request('GET', '/metrics')

    def close(self):
        pass


def wait_for_service(path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service_answers(path):
            return True
        time.sleep(0.05)
    return False
