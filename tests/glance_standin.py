"""A stand-in for the Glance v2 API subset the agent uses, on loopback.

Not Glance: a small threaded HTTP server that answers
``GET /v2/images/{id}`` (the image record) and ``GET /v2/images/{id}/file``
(the bits, with Range support, answering HEAD with 405 as Glance does), and
can misbehave on purpose: fail with a status, stall (before the headers or
mid-stream), drip one byte a second, cut a stream short, or answer Range
requests wrongly. Stalls and drips end when the server is closed. It counts
the data requests per image so tests can assert "one download".
Used by the tests and by ``bench/download.py``.
"""

import hashlib
import http.server
import json
import os
import re
import socket
import threading
import uuid

_RANGE = re.compile(r'^bytes=(\d+)-$')


def image_record(image_id, path, disk_format='raw', virtual_size=None,
                 owner=None, visibility='shared', updated_at=None, **extra):
    """A Glance-v2-shaped record for the file at ``path``, hashed as Glance
    does (md5 ``checksum``, sha512 multihash)."""
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            md5.update(chunk)
            sha512.update(chunk)
    record = {
        'id': image_id, 'name': image_id, 'status': 'active',
        'disk_format': disk_format, 'container_format': 'bare',
        'size': os.path.getsize(path), 'virtual_size': virtual_size,
        'checksum': md5.hexdigest(), 'os_hash_algo': 'sha512',
        'os_hash_value': sha512.hexdigest(), 'owner': owner,
        'visibility': visibility,
        'created_at': '2026-01-01T00:00:00Z',
        'updated_at': updated_at or '2026-01-01T00:00:00Z',
    }
    record.update(extra)
    return record


class GlanceStandIn:
    def __init__(self, host='127.0.0.1'):
        self.images = {}      # id -> (record, data path)
        self.faults = {}      # id -> dict, see fail()
        self.range_faults = {}  # id -> dict, see answer_ranges()
        self._closing = threading.Event()
        self.data_requests = {}
        self.bytes_served = {}  # id -> bytes of /file sent
        self._lock = threading.Lock()
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(405)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def do_GET(self):
                standin._serve(self)

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = 'http://%s:%d' % (host, self.server.server_port)
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, image_id=None, path=None, **record_fields):
        image_id = image_id or str(uuid.uuid4())
        self.images[image_id] = (image_record(image_id, path,
                                              **record_fields), path)
        return self.images[image_id][0]

    def fail(self, image_id, status=None, times=None, stall_after=None,
             truncate_after=None, stall_seconds=30, stall_headers=False,
             drip_after=None):
        """Misbehave on ``/file`` of ``image_id``: answer ``status``, or
        pause ``stall_seconds`` after ``stall_after`` bytes (then go on), or
        before sending any header (``stall_headers``), or send one byte a
        second after ``drip_after`` bytes, or close after
        ``truncate_after`` bytes; for the next ``times`` requests (None =
        always). Byte counts are from where the answer starts."""
        self.faults[image_id] = dict(status=status, times=times,
                                     stall_after=stall_after,
                                     truncate_after=truncate_after,
                                     stall_seconds=stall_seconds,
                                     stall_headers=stall_headers,
                                     drip_after=drip_after)

    def answer_ranges(self, image_id, mode, times=None):
        """Answer the next ``times`` Range requests (None = all) for
        ``/file`` of ``image_id`` wrongly: ``'ignore'`` (200 with the whole
        image), ``'wrong-offset'`` (206 with the bytes and Content-Range of
        a range starting 64 KiB before the one asked for), ``'missing'``
        (206 from the right byte, without Content-Range) or ``'malformed'``
        (206 from the right byte, with a Content-Range that says nothing)."""
        self.range_faults[image_id] = dict(mode=mode, times=times)

    def downloads(self, image_id):
        return self.data_requests.get(image_id, 0)

    def _take_fault(self, image_id, faults=None):
        with self._lock:
            fault = (self.faults if faults is None else faults).get(image_id)
            if not fault:
                return None
            if fault['times'] is not None:
                if fault['times'] <= 0:
                    return None
                fault['times'] -= 1
            return fault

    def _serve(self, req):
        parts = req.path.split('?')[0].strip('/').split('/')
        if len(parts) < 3 or parts[:2] != ['v2', 'images']:
            return self._reply(req, 404, b'{"message": "not found"}')
        image_id = parts[2]
        if image_id not in self.images:
            return self._reply(req, 404, b'{"message": "no such image"}')
        record, path = self.images[image_id]
        if len(parts) == 3:
            return self._reply(req, 200, json.dumps(record).encode())
        if len(parts) != 4 or parts[3] != 'file':
            return self._reply(req, 404, b'{"message": "not found"}')
        with self._lock:
            self.data_requests[image_id] = \
                self.data_requests.get(image_id, 0) + 1
        fault = self._take_fault(image_id)
        if fault and fault['stall_headers']:
            self._closing.wait(fault['stall_seconds'])
            req.close_connection = True
            return
        if fault and fault['status']:
            return self._reply(req, fault['status'], b'{"message": "fault"}')
        size = os.path.getsize(path)
        start = 0
        m = _RANGE.match(req.headers.get('Range', ''))
        wrong = m and self._take_fault(image_id, self.range_faults)
        if m and int(m.group(1)) < size and not (
                wrong and wrong['mode'] == 'ignore'):
            start = int(m.group(1))
            content_range = 'bytes %d-%d/%d' % (start, size - 1, size)
            if wrong and wrong['mode'] == 'wrong-offset':
                start = max(0, start - 64 * 1024)
                content_range = 'bytes %d-%d/%d' % (start, size - 1, size)
            elif wrong and wrong['mode'] == 'malformed':
                content_range = 'bytes whatever'
            req.send_response(206)
            if not (wrong and wrong['mode'] == 'missing'):
                req.send_header('Content-Range', content_range)
        else:
            req.send_response(200)
        req.send_header('Content-Type', 'application/octet-stream')
        req.send_header('Content-Length', str(size - start))
        req.end_headers()
        limit = size
        if fault and fault['truncate_after'] is not None:
            limit = min(size, start + fault['truncate_after'])
        stall_at = drip_at = None
        if fault and fault['stall_after'] is not None:
            stall_at = start + fault['stall_after']
        if fault and fault['drip_after'] is not None:
            drip_at = start + fault['drip_after']
        try:
            with open(path, 'rb') as f:
                offset = start
                while offset < limit:
                    end = min([limit] + [at for at in (stall_at, drip_at)
                                         if at is not None and at > offset])
                    if offset == stall_at:
                        if self._closing.wait(fault['stall_seconds']):
                            return
                        stall_at = None
                        continue
                    if drip_at is not None and offset >= drip_at:
                        req.connection.sendall(os.pread(f.fileno(), 1,
                                                        offset))
                        offset += 1
                        with self._lock:
                            self.bytes_served[image_id] = \
                                self.bytes_served.get(image_id, 0) + 1
                        if self._closing.wait(1):
                            return
                        continue
                    sent = os.sendfile(req.connection.fileno(), f.fileno(),
                                       offset, min(end - offset, 1 << 22))
                    if sent == 0:
                        break
                    offset += sent
                    with self._lock:
                        self.bytes_served[image_id] = \
                            self.bytes_served.get(image_id, 0) + sent
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < size:
            req.close_connection = True
            try:
                req.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _reply(self, req, status, body):
        req.send_response(status)
        req.send_header('Content-Type', 'application/json')
        req.send_header('Content-Length', str(len(body)))
        req.end_headers()
        req.wfile.write(body)
