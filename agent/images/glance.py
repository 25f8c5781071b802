"""Glance v2 image source: ``GET /v2/images/{id}`` and its ``/file``.

Servers in ``[glance] api_servers`` are tried in order; connection errors and
5xx answers move to the next one and are retried with backoff up to
``[glance] num_retries`` times. 4xx answers are final.

Every socket read has a timeout (``[glance] read_timeout``). A data stream
yields what arrives as it arrives (not only whole chunks), so a slow stream
shows as slow, and it can be aborted from another thread: the socket is
shut down, which wakes a read blocked on it.
"""

import re
import socket
import time
import urllib.parse

import requests

from agent import errors
from agent.images import meta as image_meta
from agent.images.sources import DataStream, ImageSource, TransientSourceError

CHUNK_SIZE = 1024 * 1024
CONNECT_TIMEOUT = 10.0
_CONTENT_RANGE = re.compile(r'^bytes (\d+)-(\d+)/(\d+|\*)$')


def backoff_delays(retries, base=0.5, cap=8.0):
    """Delays before each retry: 0.5, 1, 2, 4, 8, 8, ... seconds."""
    return [min(cap, base * (2 ** n)) for n in range(retries)]


class GlanceImageSource(ImageSource):
    name = 'glance'

    def __init__(self, conf):
        self.servers = [s.rstrip('/') for s in conf.glance.api_servers]
        if not self.servers:
            raise errors.ConfigError(reason='[glance] api_servers is empty')
        self.num_retries = conf.glance.num_retries
        self.read_timeout = conf.glance.read_timeout
        self.session = requests.Session()
        if conf.glance.auth_token:
            self.session.headers['X-Auth-Token'] = conf.glance.auth_token

    def _url(self, server, image_id, suffix=''):
        return '%s/v2/images/%s%s' % (
            server, urllib.parse.quote(image_id, safe=''), suffix)

    def _request(self, image_id, suffix='', headers=None, stream=False):
        """One pass over the servers; the first usable answer wins."""
        reasons = []
        for server in self.servers:
            try:
                resp = self.session.get(
                    self._url(server, image_id, suffix), headers=headers,
                    stream=stream,
                    timeout=(CONNECT_TIMEOUT, self.read_timeout))
            except requests.RequestException as exc:
                reasons.append('%s: %s' % (server, exc.__class__.__name__))
                continue
            if resp.status_code >= 500:
                reasons.append('%s: HTTP %d' % (server, resp.status_code))
                resp.close()
                continue
            if resp.status_code == 404:
                resp.close()
                raise errors.ImageNotFound(image_id=image_id,
                                           source='Glance at %s' % server)
            if resp.status_code in (401, 403):
                resp.close()
                raise errors.ImageNotAuthorized(
                    image_id=image_id, source='Glance at %s' % server,
                    status=resp.status_code)
            if resp.status_code >= 400:
                resp.close()
                raise errors.SourceUnavailable(
                    source='Glance at %s' % server,
                    reason='HTTP %d for image %s' % (resp.status_code,
                                                     image_id))
            return resp
        raise TransientSourceError('; '.join(reasons))

    def get(self, image_id):
        delays = backoff_delays(self.num_retries)
        while True:
            try:
                resp = self._request(image_id)
                break
            except TransientSourceError as exc:
                if not delays:
                    raise errors.SourceUnavailable(
                        source='Glance (%s)' % ', '.join(self.servers),
                        reason=str(exc))
                time.sleep(delays.pop(0))
        try:
            return image_meta.ImageMeta.from_glance(resp.json())
        except ValueError as exc:
            raise errors.SourceUnavailable(
                source='Glance', reason='malformed image record for %s: %s'
                % (image_id, exc))

    def open(self, image, offset=0):
        headers = {'Range': 'bytes=%d-' % offset} if offset else None
        try:
            resp = self._request(image.id, '/file', headers=headers,
                                 stream=True)
        except errors.SourceUnavailable as exc:
            raise TransientSourceError(str(exc))
        if resp.status_code == 204:
            resp.close()
            raise errors.ImageNotActive(image_id=image.id, status='empty')
        served = 0  # a 200 to a Range request: the whole image again
        if resp.status_code == 206:
            try:
                served = check_content_range(
                    resp.headers.get('Content-Range'), offset, image.size)
            except ValueError as exc:
                resp.close()
                raise TransientSourceError(
                    'Glance at %s answered a request for the bytes from %d '
                    'with %s; refused (does a proxy between this host and '
                    'Glance mishandle Range requests?)' % (
                        urllib.parse.urlsplit(resp.url).netloc, offset, exc))
        elif resp.status_code != 200:
            resp.close()
            raise TransientSourceError('Glance answered HTTP %d to a data '
                                       'request' % resp.status_code)
        sock = getattr(getattr(resp.raw, 'connection', None), 'sock', None)
        # what has arrived (urllib3 >= 2.3), else whole chunks
        read = getattr(resp.raw, 'read1', None) or resp.raw.read

        def chunks():
            try:
                while True:
                    piece = read(CHUNK_SIZE, decode_content=False)
                    if not piece:
                        return
                    yield piece
            except Exception as exc:  # urllib3 and socket errors alike
                raise TransientSourceError(
                    'stream from Glance broke: %s' % exc) from exc

        def abort():
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return DataStream(chunks(), served, resp.close, abort=abort)


def check_content_range(value, offset, size=None):
    """The first byte a 206 answer holds, which must be ``offset``.

    :raises ValueError: missing, malformed, or another range
    """
    m = _CONTENT_RANGE.match((value or '').strip())
    if not m:
        raise ValueError('a 206 whose Content-Range is %s' % (
            repr(value) if value else 'missing'))
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if first != offset or last < first:
        raise ValueError('a 206 for another range (Content-Range %r)'
                         % value)
    if total != '*' and size is not None and int(total) != size:
        raise ValueError('a 206 for an image of another size (Content-Range '
                         '%r, the image has %d bytes)' % (value, size))
    return first
