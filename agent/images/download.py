"""Stream image bits to a file: receive, inspect, write sparse, and hash.

Three threads share the work so it overlaps on two cores: one receives
chunks from the source, the caller's thread inspects the format and writes
them (all-zero blocks are left as holes, so a raw base takes only the disk
its data needs), and a hasher reads back what was written from the page
cache. hashlib, socket reads and file I/O all release the GIL. The hash may
finish after the last byte is written: ``download_verified`` runs the
caller's next step (conversion, fsync) meanwhile and publishes nothing
unless the hash matches.

Transient failures resume where they stopped with a Range request, with
exponential backoff, at most ``retries`` times.
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
from agent.metrics import REGISTRY

SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_ZERO_CHUNK = bytes(4 * 1024 * 1024)
_HASH_READ = 4 * 1024 * 1024
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


def _is_zero(data):
    """Whether ``data`` (bytes) is all zeros; a memcmp, not a byte loop."""
    n = len(data)
    if n <= len(_ZERO_CHUNK):
        return data == _ZERO_CHUNK[:n] if n != SPARSE_BLOCK \
            else data == _ZERO_BLOCK
    return data.count(0) == n


def _pwrite_sparse(fd, data, offset):
    """Write ``data`` at ``offset``, leaving all-zero blocks as holes."""
    if _is_zero(data):
        return
    length = len(data)
    start = None  # start of the current run of non-zero blocks
    pos = 0
    while pos < length:
        end = min(pos + SPARSE_BLOCK, length)
        if _is_zero(data[pos:end]):
            if start is not None:
                _pwrite_all(fd, data, start, pos, offset)
                start = None
        elif start is None:
            start = pos
        pos = end
    if start is not None:
        _pwrite_all(fd, data, start, length, offset)


def _pwrite_all(fd, data, start, end, offset):
    view = memoryview(data)[start:end]
    position = offset + start
    while len(view):
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


class _FileHasher(threading.Thread):
    """Hashes a file as it is written, reading it back from the page cache
    (holes read as zeros: the hash is of the bytes as sent)."""

    def __init__(self, fd, algo):
        super().__init__(daemon=True, name='image-hasher')
        self.hasher = hashlib.new(algo)
        self.fd = os.dup(fd)
        self.cond = threading.Condition()
        self.written = 0
        self.finished = False
        self.cancelled = False
        self.error = None

    def advance(self, written, finished=False):
        with self.cond:
            self.written = written
            self.finished = finished
            self.cond.notify()

    def cancel(self):
        with self.cond:
            self.cancelled = True
            self.cond.notify()
        self.join()

    def run(self):
        position = 0
        try:
            while True:
                with self.cond:
                    while not (self.cancelled or self.written > position or
                               self.finished):
                        self.cond.wait()
                    if self.cancelled:
                        return
                    end, finished = self.written, self.finished
                while position < end:
                    data = os.pread(self.fd, min(_HASH_READ, end - position),
                                    position)
                    if not data:
                        raise IOError('file shrank under the hasher')
                    self.hasher.update(data)
                    position += len(data)
                if finished and position >= end:
                    return
        except BaseException as exc:  # reported by hexdigest()
            self.error = exc
        finally:
            os.close(self.fd)

    def hexdigest(self):
        self.join()
        if self.error:
            raise self.error
        return self.hasher.hexdigest()


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


class Download:
    """A download in progress: bytes written, the hash still running.

    ``verify()`` waits for the hash and raises ChecksumMismatch; ``cancel()``
    stops the hasher. Use ``download_verified``, which always does one.
    """

    def __init__(self, image, result, hasher):
        self.image = image
        self.result = result
        self._hasher = hasher

    def verify(self):
        if self._hasher is None:
            return
        algo, expected = self.image.expected_hash
        actual = self._hasher.hexdigest()
        if actual != expected:
            raise errors.ChecksumMismatch(image_id=self.image.id, algo=algo,
                                          actual=actual, expected=expected)

    def cancel(self):
        if self._hasher is not None:
            self._hasher.cancel()


def download(source, image, dest_fd, retries=3, progress=None):
    """Stream ``image`` from ``source`` into the new, empty file open on
    ``dest_fd`` (the caller's; it stays open).

    Returns a ``Download`` whose hash may still be running; the file is not
    fsynced.

    :raises DownloadFailed: transient failures outlasted the retries
    :raises InsufficientSpace: the filesystem filled up
    :raises ImageUnacceptable: the source sent more than the image's size
    """
    expected = image.expected_hash
    delays = backoff_delays(retries)
    fd = dest_fd
    hasher = None
    started, offset = time.monotonic(), 0
    try:
        while True:
            hasher = _FileHasher(fd, expected[0]) if expected else None
            if hasher:
                hasher.start()
            chunks = _resuming_chunks(source, image, delays)
            wrapper = inspection.new_stream_inspector(chunks)
            offset = 0
            try:
                for chunk in wrapper:
                    _pwrite_sparse(fd, chunk, offset)
                    offset += len(chunk)
                    if image.size is not None and offset > image.size:
                        raise errors.ImageUnacceptable(
                            image_id=image.id, reason='the source sent more '
                            'than the %d bytes its metadata says' % image.size)
                    if hasher:
                        os.ftruncate(fd, offset)  # holes at the end read back
                        hasher.advance(offset)
                    if progress:
                        progress(offset, image.size)
            except _SourceRestarted:
                if hasher:
                    hasher.cancel()
                os.ftruncate(fd, 0)
                continue
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise errors.InsufficientSpace(
                        path='the base image directory', image_id=image.id,
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
        if image.size is not None and offset != image.size:
            raise errors.DownloadFailed(
                image_id=image.id, attempts=retries + 1,
                reason='got %d bytes, the image has %d' % (offset, image.size))
        inspector = inspection.stream_result(wrapper, image.id)
        if hasher:
            hasher.advance(offset, finished=True)
    except BaseException:
        if hasher:
            hasher.cancel()
        raise
    finally:
        REGISTRY.inc('template_agent_downloaded_bytes_total', offset)
        REGISTRY.inc('template_agent_download_seconds_total',
                     time.monotonic() - started)
    return Download(image, DownloadResult(
        size=offset, inspector=inspector,
        hash_algo=expected[0] if expected else None,
        attempts=retries - len(delays) + 1), hasher)


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


def download_verified(source, image, dest_fd, then=None, retries=3,
                      max_virtual_size=0, progress=None):
    """Download, check format and safety, run ``then``, verify the hash.

    ``then(qemu_format, virtual_size)`` (e.g. convert, or fsync) runs while
    the hash finishes; whatever it made must not be published until this
    returns: on a hash mismatch ChecksumMismatch is raised after it, and the
    caller's cleanup removes what it made.

    :returns: ``(DownloadResult, virtual_size, qemu_format, then's result)``
    """
    pending = download(source, image, dest_fd, retries=retries,
                       progress=progress)
    try:
        result = pending.result
        virtual_size = inspection.check_image(
            result.inspector, image.disk_format, image.id, max_virtual_size)
        fmt = inspection.qemu_format(result.inspector)
        if fmt == 'raw':
            virtual_size = result.size
        made = then(fmt, virtual_size) if then else None
    except BaseException:
        pending.cancel()
        raise
    pending.verify()
    return result, virtual_size, fmt, made
