"""Glance v2 image source: ``GET /v2/images/{id}`` and its ``/file``.

Servers in ``[glance] api_servers`` are tried in order; connection errors and
5xx answers move to the next one and are retried with backoff up to
``[glance] num_retries`` times. 4xx answers are final, and so is a redirect
(``api_servers`` should name the final address).

Plain ``http.client``, one connection per request: a fetch needs two
requests, and the agent's CLI stays small (no requests, urllib3 or
charset detection in memory). HTTPS verifies the server against the
system's trust store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` override it); the
``http_proxy``/``https_proxy``/``no_proxy`` environment variables are
honoured, HTTPS through a proxy by ``CONNECT``.

Every socket read has a timeout (``[glance] read_timeout``). A data stream
yields what arrives as it arrives (not only whole chunks), so a slow stream
shows as slow, and it can be aborted from another thread: the socket is
shut down, which wakes a read blocked on it.
"""

import base64
import http.client
import json
import os
import re
import socket
import time
import urllib.parse

from agent import errors
from agent.images import meta as image_meta
from agent.images.sources import (DataStream, ImageSource,
                                  TransientSourceError, backoff_delays)

CHUNK_SIZE = 1024 * 1024
PATCH_TYPE = 'application/openstack-images-v2.1-json-patch'
CONNECT_TIMEOUT = 10.0
USER_AGENT = 'template-image-agent'
_CONTENT_RANGE = re.compile(r'^bytes (\d+)-(\d+)/(\d+|\*)$')
#: what a failed connection or request raises: socket and TLS errors are
#: OSError, a malformed answer an HTTPException
_HTTP_ERRORS = (OSError, http.client.HTTPException)


class _Answer:
    """An answer whose headers have arrived: status, headers, the body to
    read; ``close()`` closes the connection with it."""

    def __init__(self, conn, resp, sock, server):
        self.conn = conn
        self.resp = resp
        self.sock = sock
        self.server = server
        self.status = resp.status
        self.headers = resp.headers

    def read(self):
        return self.resp.read()

    def close(self):
        self.resp.close()
        self.conn.close()


def _open_connection(url, timeout):
    """``(connection, request target, extra headers)`` for ``url``,
    through the proxy the environment names for it, if any."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        port = parts.port or (443 if scheme == 'https' else 80)
    except ValueError as exc:  # a port out of range or not a number
        raise errors.ConfigError(
            reason='[glance] api_servers: %r: %s' % (url, exc))
    if scheme not in ('http', 'https') or not host:
        raise errors.ConfigError(
            reason='[glance] api_servers: %r is not an http(s) URL' % url)
    target = urllib.parse.urlunsplit(('', '', parts.path or '/',
                                      parts.query, ''))
    proxy = None
    # urllib.request (and what it imports) only when the environment may
    # name a proxy: getproxies_environment reads only *_proxy variables
    if any(name.lower().endswith('_proxy') for name in os.environ):
        from urllib import request
        if not request.proxy_bypass_environment(host):
            proxy = request.getproxies_environment().get(scheme)
    headers = {}
    if proxy:
        try:
            pparts = urllib.parse.urlsplit(
                proxy if '://' in proxy else 'http://' + proxy)
            phost = pparts.hostname
            pport = pparts.port or (
                443 if pparts.scheme.lower() == 'https' else 80)
        except ValueError as exc:
            raise errors.ConfigError(
                reason='the %s_proxy environment variable %r: %s'
                % (scheme, proxy, exc))
        if not phost:
            raise errors.ConfigError(
                reason='the %s_proxy environment variable %r names no host'
                % (scheme, proxy))
        if pparts.username:
            token = base64.b64encode(('%s:%s' % (
                urllib.parse.unquote(pparts.username),
                urllib.parse.unquote(pparts.password or ''))).encode())
            headers['Proxy-Authorization'] = 'Basic ' + token.decode()
    if scheme == 'https':
        import ssl  # only for https
        context = ssl.create_default_context()
        if proxy:
            conn = http.client.HTTPSConnection(phost, pport, timeout=timeout,
                                               context=context)
            conn.set_tunnel(host, port, headers=headers)
            headers = {}
        else:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=context)
    elif proxy:
        conn = http.client.HTTPConnection(phost, pport, timeout=timeout)
        target = url  # an absolute URL to the proxy
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    return conn, target, headers


class GlanceImageSource(ImageSource):
    name = 'glance'

    def __init__(self, conf):
        self.servers = [s.rstrip('/') for s in conf.glance.api_servers]
        if not self.servers:
            raise errors.ConfigError(reason='[glance] api_servers is empty')
        self.num_retries = conf.glance.num_retries
        self.read_timeout = conf.glance.read_timeout
        self.headers = {'User-Agent': USER_AGENT}
        if conf.glance.auth_token:
            self.headers['X-Auth-Token'] = conf.glance.auth_token

    def _url(self, server, image_id, suffix=''):
        return '%s/v2/images/%s%s' % (
            server, urllib.parse.quote(image_id, safe=''), suffix)

    def _get(self, server, url, headers):
        """One GET; the answer once its headers have arrived."""
        conn, target, extra = _open_connection(url, CONNECT_TIMEOUT)
        try:
            conn.connect()
            sock = conn.sock
            sock.settimeout(self.read_timeout)
            conn.request('GET', target, headers=dict(
                self.headers, **extra, **(headers or {})))
            return _Answer(conn, conn.getresponse(), sock, server)
        except BaseException:
            conn.close()
            raise

    def _request(self, image_id, suffix='', headers=None):
        """One pass over the servers; the first usable answer wins."""
        reasons = []
        for server in self.servers:
            try:
                resp = self._get(server, self._url(server, image_id, suffix),
                                 headers)
            except _HTTP_ERRORS as exc:
                reasons.append('%s: %s' % (server, _describe(exc)))
                continue
            if resp.status >= 500:
                reasons.append('%s: HTTP %d' % (server, resp.status))
                resp.close()
                continue
            if resp.status == 404:
                resp.close()
                raise errors.ImageNotFound(image_id=image_id,
                                           source='Glance at %s' % server)
            if resp.status in (401, 403):
                resp.close()
                raise errors.ImageNotAuthorized(
                    image_id=image_id, source='Glance at %s' % server,
                    status=resp.status)
            if resp.status >= 400:
                resp.close()
                raise errors.SourceUnavailable(
                    source='Glance at %s' % server,
                    reason='HTTP %d for image %s' % (resp.status, image_id))
            if resp.status >= 300:
                resp.close()
                raise errors.SourceUnavailable(
                    source='Glance at %s' % server,
                    reason='HTTP %d, a redirect to %s; set [glance] '
                    'api_servers to the address that answers' % (
                        resp.status, resp.headers.get('Location', '?')))
            return resp
        raise TransientSourceError('; '.join(reasons))

    def get(self, image_id):
        delays = backoff_delays(self.num_retries)
        while True:
            try:
                resp = self._request(image_id)
                try:
                    body = resp.read()
                except _HTTP_ERRORS as exc:
                    raise TransientSourceError('%s: %s' % (
                        resp.server, _describe(exc)))
                finally:
                    resp.close()
                break
            except TransientSourceError as exc:
                if not delays:
                    raise errors.SourceUnavailable(
                        source='Glance (%s)' % ', '.join(self.servers),
                        reason=str(exc))
                time.sleep(delays.pop(0))
        try:
            return image_meta.ImageMeta.from_glance(json.loads(body))
        except ValueError as exc:
            raise errors.SourceUnavailable(
                source='Glance', reason='malformed image record for %s: %s'
                % (image_id, exc))

    def open(self, image, offset=0):
        headers = {'Range': 'bytes=%d-' % offset} if offset else None
        try:
            resp = self._request(image.id, '/file', headers=headers)
        except errors.SourceUnavailable as exc:
            raise TransientSourceError(str(exc))
        if resp.status == 204:
            resp.close()
            raise errors.ImageNotActive(image_id=image.id, status='empty')
        served = 0  # a 200 to a Range request: the whole image again
        if resp.status == 206:
            try:
                served = check_content_range(
                    resp.headers.get('Content-Range'), offset, image.size)
            except ValueError as exc:
                resp.close()
                raise TransientSourceError(
                    'Glance at %s answered a request for the bytes from %d '
                    'with %s; refused (does a proxy between this host and '
                    'Glance mishandle Range requests?)' % (
                        urllib.parse.urlsplit(resp.server).netloc, offset,
                        exc))
        elif resp.status != 200:
            resp.close()
            raise TransientSourceError('Glance answered HTTP %d to a data '
                                       'request' % resp.status)
        sock, body = resp.sock, resp.resp

        def chunks():
            try:
                while True:
                    piece = body.read1(CHUNK_SIZE)  # what has arrived
                    if not piece:
                        return
                    yield piece
            except _HTTP_ERRORS as exc:  # socket errors, IncompleteRead
                raise TransientSourceError(
                    'stream from Glance broke: %s' % _describe(exc)) from exc

        def abort():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return DataStream(chunks(), served, resp.close, abort=abort,
                          readinto=_direct_reader(body))


    # -- locations (``[cinder] glance_locations``) ---------------------------
    def _patch(self, image_id, ops, what):
        """One ``PATCH /v2/images/{id}`` (a JSON patch), on the first
        server that answers: the image as it is now (Glance moved its
        ``updated_at``). SourceUnavailable with Glance's answer if none
        accepts it."""
        reasons = []
        body = json.dumps(ops).encode()
        for server in self.servers:
            url = self._url(server, image_id)
            try:
                conn, target, extra = _open_connection(url, CONNECT_TIMEOUT)
                try:
                    conn.connect()
                    conn.sock.settimeout(self.read_timeout)
                    conn.request('PATCH', target, body=body, headers=dict(
                        self.headers, **extra, **{
                            'Content-Type': PATCH_TYPE}))
                    resp = conn.getresponse()
                    text = resp.read()
                finally:
                    conn.close()
            except _HTTP_ERRORS as exc:
                reasons.append('%s: %s' % (server, _describe(exc)))
                continue
            if resp.status < 300:
                try:
                    return image_meta.ImageMeta.from_glance(json.loads(text))
                except ValueError as exc:
                    raise errors.SourceUnavailable(
                        source='Glance at %s' % server,
                        reason='malformed answer to %s: %s' % (what, exc))
            reason = 'HTTP %d: %s' % (resp.status, _glance_message(text))
            if resp.status < 500:
                raise errors.SourceUnavailable(
                    source='Glance at %s' % server,
                    reason='%s refused: %s' % (what, reason))
            reasons.append('%s: %s' % (server, reason))
        raise errors.SourceUnavailable(source='Glance (%s)' % ', '.join(
            self.servers), reason='%s: %s' % (what, '; '.join(reasons)))

    def add_location(self, image_id, url):
        """Add ``url`` to the image's locations (at the end: the image's
        own data stays its first location); the image as it is now."""
        return self._patch(image_id, [{'op': 'add', 'path': '/locations/-',
                                'value': {'url': url, 'metadata': {}}}],
                    'adding location %s to image %s' % (url, image_id))

    def remove_location(self, image_id, url):
        """Remove every location of the image that names the same volume
        as ``url`` (Glance may have rewritten ``cinder://<id>`` as
        ``cinder://<store>/<id>``). Glance deletes a removed location's
        data through its store: remove only a volume already deleted.
        ``(updated_at before, the image as it is now)``, or None when the
        image had no such location."""
        volume_id = url.rstrip('/').split('/')[-1]
        resp = self._request(image_id)
        try:
            record = json.loads(resp.read() or b'{}')
        finally:
            resp.close()
        urls = [loc.get('url') for loc in record.get('locations') or []]
        now = None
        for index in reversed(range(len(urls))):
            if (urls[index] or '').startswith('cinder://') and \
                    urls[index].rstrip('/').split('/')[-1] == volume_id:
                now = self._patch(image_id, [{
                    'op': 'remove', 'path': '/locations/%d' % index}],
                    'removing location %s from image %s' % (urls[index],
                                                             image_id))
        return (record.get('updated_at'), now) if now else None


def _glance_message(text):
    """The readable part of a Glance error body (HTML or JSON)."""
    text = re.sub(r'<[^>]+>', ' ', (text or b'').decode('utf-8', 'replace'))
    return ' '.join(text.split())[:300]


def _describe(exc):
    text = str(exc)
    return '%s: %s' % (exc.__class__.__name__, text) if text \
        else exc.__class__.__name__


def _direct_reader(resp):
    """``readinto(buffer)`` straight from the connection's buffered socket
    reader (one ``recv_into`` into the caller's buffer, after what the
    headers' read left buffered), or None when the body is not a plain
    run of ``Content-Length`` bytes (chunked, compressed): then the stream
    is read with ``read1``.

    The body's length is counted here, not by http.client: the connection
    cannot be reused afterwards, and ``close()`` closes it.
    """
    headers = resp.headers
    length = headers.get('Content-Length', '')
    reader = getattr(resp, 'fp', None)
    if not length.isdigit() or resp.chunked or \
            headers.get('Content-Encoding', 'identity') != 'identity' or \
            not hasattr(reader, 'readinto1'):
        return None
    remaining = int(length)

    def readinto(buffer):
        nonlocal remaining
        if remaining <= 0:
            return 0
        view = memoryview(buffer)
        if len(view) > remaining:
            view = view[:remaining]
        try:
            got = reader.readinto1(view)
        except (*_HTTP_ERRORS, ValueError) as exc:  # ValueError: closed
            raise TransientSourceError(
                'stream from Glance broke: %s' % _describe(exc)) from exc
        if not got:
            raise TransientSourceError(
                'stream from Glance ended %d bytes before its '
                'Content-Length' % remaining)
        remaining -= got
        return got
    return readinto


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
