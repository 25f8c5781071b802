"""The manifests over HTTPS with client certificates (mutual TLS).

Server: ``GET /v1/p2p/images/<image id>/manifest?since=K&wait=S`` answers
the manifest document (``agent.p2p.manifest``) with the segments from
``K`` on, waiting up to ``S`` seconds (at most ``MAX_WAIT``) for one;
404 when this agent does not share that image yet but will (asking
started a fetch of it: see ``Swarm.on_demand``), 410 when it will not
(it has the base already, or is busy): the asker then looks for the next
seed in rendezvous order. Only clients whose certificate is signed by
``[p2p] ca_file`` complete the TLS handshake; anyone else is dropped
before a byte of HTTP is read. Every connection has a deadline for its
handshake and its request, and the number of connections is capped, as on
the local API.

Client: ``fetch_manifest`` presents this agent's certificate and checks
the server's against the same CA. Host names are not checked: the peers
are listed by address, and any certificate of the CA is an agent of the
peer set (sign none other with it).
"""

import http.client
import http.server
import json
import logging
import socket
import socketserver
import ssl
import threading
import urllib.parse

from agent import errors, naming

LOG = logging.getLogger(__name__)
#: longest long poll a client may ask for, seconds
MAX_WAIT = 10.0
#: seconds for a TLS handshake, a request line and headers
HANDSHAKE_TIMEOUT = 5.0
#: connections at once (each holds a thread while it long-polls)
MAX_CONNECTIONS = 64
#: the largest manifest document a client reads
MAX_DOCUMENT = 64 * 1024 * 1024


def tls_context(conf, server):
    """The mTLS context of ``[p2p]``: this agent's certificate, the CA,
    certificates required both ways, TLS 1.2 or later."""
    p2p = conf.p2p
    missing = [name for name in ('ca_file', 'cert_file', 'key_file')
               if not getattr(p2p, name)]
    if missing:
        raise errors.ConfigError(reason='[p2p] enabled needs %s' % ', '.join(
            '[p2p] %s' % name for name in missing))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server
                             else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=p2p.ca_file)
        context.load_cert_chain(p2p.cert_file, p2p.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(reason='[p2p] cannot load the CA, '
                                 'certificate or key: %s' % exc)
    return context


def split_address(value, what):
    """``(host, port)`` of ``host:port`` (``[v6]:port`` too)."""
    host, sep, port = (value or '').rpartition(':')
    host = host.strip('[]')
    if not sep or not host or not port.isdigit() or \
            not 0 < int(port) < 65535:
        raise errors.ConfigError(reason='%s: %r is not host:port (with a '
                                 'port below 65535)' % (what, value))
    return host, int(port)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, context):
        self.address_family = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, handler)
        self.context = context
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, sock, peer):
        if not self.slots.acquire(blocking=False):
            LOG.warning('p2p listener: %d connections open, refusing %s',
                        MAX_CONNECTIONS, peer[0])
            self.shutdown_request(sock)
            return
        super().process_request(sock, peer)

    def process_request_thread(self, sock, peer):
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            try:
                tls = self.context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                LOG.warning('p2p listener: refused %s: %s', peer[0], exc)
                from agent.metrics import REGISTRY
                REGISTRY.inc('template_agent_p2p_refused_total')
                self.shutdown_request(sock)
                return
            super().process_request_thread(tls, peer)
        finally:
            self.slots.release()

    def handle_error(self, request, peer):
        LOG.debug('p2p listener: error with %s', peer, exc_info=True)


class ManifestServer:
    """Serves ``manifests(image_id)`` (a ``Manifest`` or None) and asks
    ``on_demand(image_id)`` whether it will share an image it does not
    share yet."""

    def __init__(self, conf, manifests, on_demand=None):
        self.manifests = manifests
        self.on_demand = on_demand
        address = split_address(conf.p2p.listen, '[p2p] listen')
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'
            server_version = 'template-image-agent'
            sys_version = ''

            def log_message(self, fmt, *args):
                LOG.debug('p2p listener: %s ' + fmt, self.client_address[0],
                          *args)

            def do_GET(self):
                status, body = server.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = _Server(address, Handler, tls_context(conf, True))
        self.port = self.httpd.server_address[1]
        self._thread = None

    def answer(self, path):
        parts = urllib.parse.urlsplit(path)
        segments = parts.path.strip('/').split('/')
        if len(segments) != 5 or segments[:3] != ['v1', 'p2p', 'images'] \
                or segments[4] != 'manifest':
            return 404, {'error': 'not found'}
        try:
            image_id = naming.validate_image_id(
                urllib.parse.unquote(segments[3]))
            query = urllib.parse.parse_qs(parts.query)
            since = int(query.get('since', ['0'])[0])
            wait = min(MAX_WAIT, max(0.0, float(query.get('wait',
                                                          ['0'])[0])))
            if since < 0:
                raise ValueError('since < 0')
        except (errors.AgentError, ValueError) as exc:
            return 400, {'error': str(exc)}
        manifest = self.manifests(image_id)
        if manifest is None:
            if self.on_demand is not None and self.on_demand(image_id):
                return 404, {'error': 'image %s is not shared here yet'
                             % image_id}
            return 410, {'error': 'image %s is not shared here' % image_id}
        return 200, manifest.document(since, wait)

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name='p2p-listener', daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()


class PeerUnavailable(Exception):
    """A peer that cannot be reached, refused us, or answered nonsense."""


class NotShared(Exception):
    """The peer answered: it does not share the image yet, but will."""


class WillNotShare(Exception):
    """The peer answered: it does not share the image, and will not."""


def fetch_manifest(context, peer, image_id, since, wait):
    """The document of ``peer`` (``host:port``) for ``image_id``.

    :raises NotShared: it does not share the image yet
    :raises WillNotShare: it does not share the image, and will not
    :raises PeerUnavailable: anything else
    """
    host, port = split_address(peer, '[p2p] peers')
    conn = http.client.HTTPSConnection(host, port, context=context,
                                       timeout=HANDSHAKE_TIMEOUT + wait)
    try:
        conn.request('GET', '/v1/p2p/images/%s/manifest?since=%d&wait=%g' % (
            urllib.parse.quote(image_id, safe=''), since, wait))
        resp = conn.getresponse()
        body = resp.read(MAX_DOCUMENT + 1)
        if len(body) > MAX_DOCUMENT:
            raise PeerUnavailable('%s: a manifest over %d bytes'
                                  % (peer, MAX_DOCUMENT))
        if resp.status == 404:
            raise NotShared(peer)
        if resp.status == 410:
            raise WillNotShare(peer)
        if resp.status != 200:
            raise PeerUnavailable('%s: HTTP %d' % (peer, resp.status))
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise PeerUnavailable('%s: %s: %s' % (peer, type(exc).__name__, exc))
    finally:
        conn.close()
