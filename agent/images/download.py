"""Stream image bits to a file: hash, inspect and write sparse, in one pass.

One thread receives chunks from the source while the caller's thread hashes,
inspects and writes them, so the hash costs (almost) nothing on two cores:
hashlib, socket reads and file writes all release the GIL. All-zero blocks
are skipped (left as holes) so a raw base takes only the disk its data needs.
Transient failures resume where they stopped with a Range request (the hash
state carries over), with exponential backoff, at most ``retries`` times.
"""

import dataclasses
import errno
import hashlib
import os
import queue
import threading
import time

from agent import errors
from agent.images import inspection
from agent.images.glance import backoff_delays
from agent.images.sources import TransientSourceError

SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_QUEUE_DEPTH = 8
_DONE = object()
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclasses.dataclass
class DownloadResult:
    size: int
    inspector: object
    hash_algo: str = None
    attempts: int = 1


class _SourceRestarted(Exception):
    """The source could not resume and starts over at byte 0."""


def _pwrite_sparse(fd, data, offset):
    """Write ``data`` at ``offset``, leaving all-zero blocks as holes."""
    view = memoryview(data)
    length = len(view)
    start = None  # start of the current run of non-zero blocks
    pos = 0
    while pos < length:
        end = min(pos + SPARSE_BLOCK, length)
        block = view[pos:end]
        is_zero = (block == _ZERO_BLOCK) if end - pos == SPARSE_BLOCK \
            else not any(block)
        if is_zero:
            if start is not None:
                _pwrite_all(fd, view[start:pos], offset + start)
                start = None
        elif start is None:
            start = pos
        pos = end
    if start is not None:
        _pwrite_all(fd, view[start:length], offset + start)


def _pwrite_all(fd, view, offset):
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class _Receiver(threading.Thread):
    """Pulls chunks from a ``DataStream`` into a bounded queue."""

    def __init__(self, stream):
        super().__init__(daemon=True, name='image-receiver')
        self.stream = stream
        self.queue = queue.Queue(_QUEUE_DEPTH)
        self.stopped = threading.Event()

    def run(self):
        try:
            for chunk in self.stream:
                if self.stopped.is_set():
                    return
                self._put(chunk)
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def chunks(self):
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self):
        self.stopped.set()
        self.stream.close()


def download(source, image, dest, retries=3, progress=None):
    """Stream ``image`` from ``source`` into the new file ``dest``.

    Verifies the hash of the metadata (multihash first, else md5) and
    returns a DownloadResult with the detected format inspector. The file is
    not fsynced: the caller publishes it (or what it converts it into).

    :raises ChecksumMismatch: the bits do not hash to the metadata's value
    :raises DownloadFailed: transient failures outlasted the retries
    :raises InsufficientSpace: the filesystem filled up
    """
    expected = image.expected_hash
    delays = backoff_delays(retries)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            hasher = hashlib.new(expected[0]) if expected else None
            chunks = _resuming_chunks(source, image, delays)
            wrapper = inspection.new_stream_inspector(chunks)
            offset = 0
            try:
                for chunk in wrapper:
                    if hasher:
                        hasher.update(chunk)
                    _pwrite_sparse(fd, chunk, offset)
                    offset += len(chunk)
                    if image.size is not None and offset > image.size:
                        raise errors.ImageUnacceptable(
                            image_id=image.id, reason='the source sent more '
                            'than the %d bytes its metadata says' % image.size)
                    if progress:
                        progress(offset, image.size)
            except _SourceRestarted:
                os.ftruncate(fd, 0)
                continue
            except errors.AgentError:
                raise
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise errors.InsufficientSpace(
                        path=os.path.dirname(dest), image_id=image.id,
                        needed=image.size or offset, free=0)
                raise
            except _RetriesExhausted as exc:
                raise errors.DownloadFailed(image_id=image.id,
                                            attempts=retries + 1,
                                            reason=str(exc))
            finally:
                chunks.close()
            break
        os.ftruncate(fd, offset)
        inspector = inspection.stream_result(wrapper, image.id)
    finally:
        os.close(fd)
    if image.size is not None and offset != image.size:
        raise errors.DownloadFailed(
            image_id=image.id, attempts=retries + 1,
            reason='got %d bytes, the image has %d' % (offset, image.size))
    if hasher and hasher.hexdigest() != expected[1]:
        raise errors.ChecksumMismatch(image_id=image.id, algo=expected[0],
                                      actual=hasher.hexdigest(),
                                      expected=expected[1])
    return DownloadResult(size=offset, inspector=inspector,
                          hash_algo=expected[0] if expected else None,
                          attempts=retries - len(delays) + 1)


class _RetriesExhausted(Exception):
    pass


def _resuming_chunks(source, image, delays):
    """Chunks of the whole image, resuming after transient failures."""
    offset = 0
    last_error = None
    first = True
    while True:
        if not first:
            if not delays:
                raise _RetriesExhausted(last_error)
            time.sleep(delays.pop(0))
        first = False
        try:
            stream = source.open(image, offset)
        except TransientSourceError as exc:
            last_error = exc
            continue
        if stream.offset != offset:
            stream.close()
            raise _SourceRestarted()
        receiver = _Receiver(stream)
        receiver.start()
        try:
            for chunk in receiver.chunks():
                offset += len(chunk)
                yield chunk
            if image.size is not None and offset < image.size:
                last_error = 'stream ended at byte %d of %d' % (offset,
                                                               image.size)
                continue
            return
        except TransientSourceError as exc:
            last_error = exc
        finally:
            receiver.stop()


def download_verified(source, image, dest, retries=3, max_virtual_size=0,
                      progress=None):
    """``download`` and then the format and safety checks of
    ``inspection.check_image``.

    :returns: ``(DownloadResult, virtual_size, qemu_format)``
    """
    result = download(source, image, dest, retries=retries,
                      progress=progress)
    virtual_size = inspection.check_image(result.inspector, image.disk_format,
                                          image.id, max_virtual_size)
    if inspection.qemu_format(result.inspector) == 'raw':
        virtual_size = result.size
    return result, virtual_size, inspection.qemu_format(result.inspector)
