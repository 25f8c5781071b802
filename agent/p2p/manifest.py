"""The manifest of an image in the swarm: its segments, in order, each
with the BitTorrent v2 torrent (SHA-256 Merkle roots) of its bytes.

The seed appends a segment as soon as it has downloaded it, so the others
start on segment 0 while it fetches segment 1. A manifest is ``complete``
when every segment is in it, ``failed`` when the seed gave up (its own
download failed or did not verify): then nobody should wait for more.

The document on the wire (JSON)::

    {"image_id": "...", "size": 33554432, "segment_size": 4194304,
     "segments": [{"index": 0, "offset": 0, "length": 4194304,
                   "torrent": "<base64 of the .torrent>"}, ...],
     "complete": false, "failed": false}

``segments`` holds those from ``since`` on (a query parameter). The
receiver checks every field against what it knows from Glance (the size)
and against the layout (contiguous, equal segments but the last); what a
segment's torrent promises is checked by libtorrent, piece by piece, and
the whole image by the download's hash: a manifest is a hint, never a
proof.
"""

import base64
import binascii
import dataclasses
import threading

#: more segments than this make a manifest suspect
MAX_SEGMENTS = 1024
#: a single-file v2 torrent of a segment is a few KiB
MAX_TORRENT_BYTES = 1024 * 1024


class BadManifest(Exception):
    """A manifest that does not describe the image asked for."""


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int
    offset: int
    length: int
    torrent: bytes

    @property
    def end(self):
        return self.offset + self.length


def segment_name(index):
    """The file name of segment ``index`` (in its torrent and on disk)."""
    return 'seg-%05d' % index


def layout(size, segment_size):
    """``[(offset, length), ...]`` of an image of ``size`` bytes."""
    return [(offset, min(segment_size, size - offset))
            for offset in range(0, size, segment_size)]


def segment_size_for(size, configured):
    """``configured``, doubled until an image of ``size`` bytes makes at
    most ``MAX_SEGMENTS`` segments."""
    segment_size = configured
    while -(-size // segment_size) > MAX_SEGMENTS:
        segment_size *= 2
    return segment_size


class Manifest:
    """The seed's manifest of one image, growing while it downloads;
    readers may wait for segments to come."""

    def __init__(self, image_id, size, segment_size):
        if -(-size // segment_size) > MAX_SEGMENTS:
            raise ValueError('%d bytes make more than %d segments of %d'
                             % (size, MAX_SEGMENTS, segment_size))
        self.image_id = image_id
        self.size = size
        self.segment_size = segment_size
        self.segments = []
        self.failed = False
        self._changed = threading.Condition()

    @property
    def complete(self):
        return len(self.segments) == len(layout(self.size,
                                                self.segment_size))

    def add(self, segment):
        with self._changed:
            if segment.index != len(self.segments):
                raise ValueError('segment %d after %d segments'
                                 % (segment.index, len(self.segments)))
            self.segments.append(segment)
            self._changed.notify_all()

    def fail(self):
        with self._changed:
            self.failed = True
            self._changed.notify_all()

    def document(self, since=0, wait=0.0):
        """The document with the segments from ``since``; waits up to
        ``wait`` seconds for one when there is none yet."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self.segments) > since or self.failed or
                self.complete, timeout=wait)
            segments = self.segments[since:]
            return {
                'image_id': self.image_id, 'size': self.size,
                'segment_size': self.segment_size,
                'segments': [{
                    'index': s.index, 'offset': s.offset,
                    'length': s.length,
                    'torrent': base64.b64encode(s.torrent).decode()}
                    for s in segments],
                'complete': self.complete, 'failed': self.failed}


def parse(doc, image_id, size, since):
    """Check a received document against what this agent knows: the
    image's id and size (from Glance), and the segments it already has
    (``since``). Returns ``(segments, complete, failed)``.

    :raises BadManifest: anything that does not fit
    """
    try:
        if doc['image_id'] != image_id:
            raise BadManifest('a manifest for image %r' % doc['image_id'])
        if doc['size'] != size:
            raise BadManifest('a manifest for %r bytes, the image has %d'
                              % (doc['size'], size))
        segment_size = doc['segment_size']
        if type(segment_size) is not int or segment_size <= 0 or \
                -(-size // segment_size) > MAX_SEGMENTS:
            raise BadManifest('segment size %r' % (segment_size,))
        expected = layout(size, segment_size)
        segments = []
        for position, item in enumerate(doc['segments']):
            index = since + position
            if index >= len(expected) or item['index'] != index or \
                    (item['offset'], item['length']) != expected[index]:
                raise BadManifest('segment %r at %r+%r does not fit the '
                                  'image\'s layout' % (
                                      item['index'], item['offset'],
                                      item['length']))
            encoded = item['torrent']
            if not isinstance(encoded, str) or \
                    len(encoded) > MAX_TORRENT_BYTES * 4 // 3 + 4:
                raise BadManifest('segment %d: no torrent, or too big'
                                  % index)
            segments.append(Segment(index, item['offset'], item['length'],
                                    base64.b64decode(encoded,
                                                     validate=True)))
        complete = doc['complete'] is True
        failed = doc['failed'] is True
        if complete and since + len(segments) != len(expected):
            raise BadManifest('complete with %d of %d segments' % (
                since + len(segments), len(expected)))
        return segments, complete, failed
    except (KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise BadManifest('malformed: %s: %s' % (type(exc).__name__, exc))
