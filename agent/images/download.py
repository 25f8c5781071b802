"""Stream image bits to a file: receive, inspect, write sparse, and hash.

Three threads share the work so it overlaps on two cores: one receives
chunks from the source, the caller's thread inspects the format and writes
them (all-zero blocks are left as holes, so a raw base takes only the disk
its data needs), and a hasher hashes the very chunks received, in memory,
handed over by reference once written, or reads back from the page cache
what it could not be handed while it was behind (the hash is of the bytes
as sent, zeros included). A source that can read into a buffer (Glance)
is received into a few reused buffers, each filled again only after it is
written and hashed or left to the read-back. hashlib, socket reads and file I/O
all release the GIL. The writer starts the writeback of what it wrote
every ``_WRITEBACK`` bytes, so the disk works while the download goes on
and the caller's final fsync has little left to do. The hash may finish
after the last byte is written: ``download_verified`` runs the caller's
next step (conversion, fsync) meanwhile and publishes nothing unless the
hash matches.

No unverified bytes: before anything is requested, ``hash_to_verify``
decides what the bits will be checked against. Only a strong multihash is
accepted unless the operator allows weak ones (``[glance]
allow_weak_hashes``); an algorithm the agent does not know is refused.

Bounded time: the receiver thread does all the waiting on the source
(connecting, headers, reads, backoff between attempts); the caller's thread
never waits for it longer than ``TICK`` seconds at a time, and at every
wake calls the caller's ``progress`` (which raises to cancel, e.g.
``Cancelled``), checks the overall deadline (``DownloadLimits.timeout``)
and the minimum rate over a window. On any way out the receiver is stopped
(its socket shut down) and the caller discards the output file.

Transient failures (a broken, stalled or too slow stream, 5xx answers)
resume where they stopped with a Range request, with exponential backoff,
at most ``retries`` times; a source that answers a Range request with the
whole image starts the file over.
"""

import dataclasses
import errno
import hashlib
import os
import queue
import logging
import threading
import time

from agent import errors
from agent.images import inspection
from agent.images.sources import TransientSourceError, backoff_delays
from agent.metrics import REGISTRY

LOG = logging.getLogger(__name__)

SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_QUEUE_DEPTH = 3         # chunks received, not yet written
_HASH_DEPTH = 3          # chunks written, not yet hashed (more: read back)
_CHUNK = 512 * 1024      # the receiver queues up to this much at once ...
_COALESCE = 0.25         # ... or what arrived within this many seconds
#: the writer starts the writeback of every this many bytes it wrote
_WRITEBACK = 32 * 1024 * 1024
#: sync_file_range errors meaning "not here": the final fsync does it all
_NO_WRITEBACK_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                        errno.ESPIPE)
#: longest wait of the caller's thread between two checks of cancellation,
#: deadline and rate
TICK = 0.5
_DONE = object()
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

#: os_hash_algo values (hashlib names, as Glance records its
#: hashing_algorithm) strong enough to vouch for the bits
STRONG_HASHES = ('sha256', 'sha384', 'sha512', 'sha3_256', 'sha3_384',
                 'sha3_512', 'blake2b', 'blake2s')
#: known and verifiable, but broken or short: only with allow_weak_hashes
WEAK_HASHES = ('md5', 'sha1', 'sha224', 'sha3_224')


@dataclasses.dataclass(frozen=True)
class DownloadLimits:
    """What a download may take and must prove; ``from_conf`` reads the
    options (``[glance]``, ``max_image_virtual_size_gb``), so every caller
    downloads under the same rules. The defaults are those of the
    options."""
    retries: int = 3
    allow_weak_hashes: bool = False
    timeout: float = 3600        # seconds for the whole download; 0: none
    min_rate: int = 64 * 1024    # bytes/s over rate_window; 0: none
    rate_window: float = 60
    max_virtual_size: int = 0    # bytes; 0: none

    @classmethod
    def from_conf(cls, conf):
        glance = conf.glance
        return cls(max_virtual_size=conf.max_image_virtual_size_gb * 1024 ** 3,
                   retries=glance.num_retries,
                   allow_weak_hashes=glance.allow_weak_hashes,
                   timeout=glance.download_timeout,
                   min_rate=glance.download_min_rate,
                   rate_window=glance.download_min_rate_window)


@dataclasses.dataclass
class DownloadResult:
    size: int
    inspector: object
    hash_algo: str = None
    hash_value: str = None
    attempts: int = 1


def hash_to_verify(image, allow_weak=False):
    """``(hashlib name, hex digest)`` to verify ``image``'s bits against,
    or None when the image has no hash and ``allow_weak`` accepts that.

    Glance's multihash (``os_hash_algo``/``os_hash_value``) wins over the
    legacy md5 ``checksum``, as in glance_store and nova.

    :raises UnknownHashAlgorithm: an ``os_hash_algo`` the agent does not know
    :raises WeakImageHash: only a weak hash or none, and not ``allow_weak``
    :raises ImageUnacceptable: a hash value that cannot be a digest
    """
    algo = (image.os_hash_algo or '').strip().lower()
    if algo and image.os_hash_value:
        if algo in STRONG_HASHES:
            return algo, _hex_digest(image, algo, image.os_hash_value)
        if algo not in WEAK_HASHES:
            raise errors.UnknownHashAlgorithm(
                image_id=image.id, algo=image.os_hash_algo,
                accepted=', '.join(STRONG_HASHES))
        what = 'its multihash uses %s' % algo
        claimed = algo, image.os_hash_value
    elif image.checksum:
        what = 'it has only an md5 checksum'
        claimed = 'md5', image.checksum
    else:
        if not allow_weak:
            raise errors.WeakImageHash(image_id=image.id,
                                       what='it has no hash at all')
        LOG.warning('image %s has no hash: downloading it unverified, as '
                    '[glance] allow_weak_hashes = True allows', image.id)
        return None
    if not allow_weak:
        raise errors.WeakImageHash(image_id=image.id, what=what)
    LOG.warning('image %s: %s; verifying with it only, as [glance] '
                'allow_weak_hashes = True allows', image.id, what)
    return claimed[0], _hex_digest(image, *claimed)


def _hex_digest(image, algo, value):
    expected = hashlib.new(algo).digest_size * 2
    value = str(value).strip().lower()
    if len(value) != expected or value.strip('0123456789abcdef'):
        raise errors.ImageUnacceptable(
            image_id=image.id, reason='its %s hash %r is not a %d-digit hex '
            'digest; the image record is corrupt' % (algo, value, expected))
    return value


class _SourceRestarted(Exception):
    """The source could not resume and starts over at byte 0."""


class _RetriesExhausted(Exception):
    """The receiver gave up; ``args[0]`` is the last failure."""


class _TooSlow(Exception):
    """A stream abandoned for its rate; ``info`` as DownloadTooSlow takes."""

    def __init__(self, info):
        super().__init__('%(got)d bytes in %(window)d s, under the minimum '
                         'rate of %(min_rate)d bytes/s' % info)
        self.info = info


class _Opened:
    """Queued before the chunks of each stream: where it starts."""

    def __init__(self, offset, generation):
        self.offset = offset
        self.generation = generation


def _zero_block(data, pos, end):
    """Whether ``data[pos:end]`` is all zeros: a memcmp in place (no slice,
    no copy); it stops at the first non-zero byte."""
    if end - pos == SPARSE_BLOCK:
        return data.startswith(_ZERO_BLOCK, pos)
    return data.startswith(_ZERO_BLOCK[:end - pos], pos)


def _pwrite_sparse(fd, data, offset):
    """Write ``data`` (bytes) at ``offset``, leaving all-zero blocks as
    holes."""
    length = len(data)
    start = None  # start of the current run of non-zero blocks
    pos = 0
    while pos < length:
        end = min(pos + SPARSE_BLOCK, length)
        if _zero_block(data, pos, end):
            if start is not None:
                _pwrite_all(fd, data, start, pos, offset)
                start = None
        elif start is None:
            start = pos
        pos = end
    if start is not None:
        _pwrite_all(fd, data, start, length, offset)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback, do not wait


def _sync_file_range():
    """libc's ``sync_file_range`` through ctypes (Python's os module has
    none; ctypes releases the GIL during the call), or None where there is
    none."""
    try:
        import ctypes
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_uint)
    func.restype = ctypes.c_int

    def sync_file_range(fd, offset, length):
        if func(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    return sync_file_range


class _Writeback:
    """Starts the writeback of what was written, every ``_WRITEBACK``
    bytes, with ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: it does not
    wait for the disk and leaves the pages cached, so the disk works while
    the download goes on and the final fsync only waits for the tail.
    Where it is not supported it stops trying: the fsync still makes
    everything durable. Off (``enabled=False``) for a file that is not
    kept (converted, then discarded): writing it back would only cost."""

    def __init__(self, fd, enabled=True):
        self.fd = fd
        self.started = 0
        self.sync = _sync_file_range() if enabled else None

    def written(self, offset):
        if self.sync is None or offset - self.started < _WRITEBACK:
            return
        try:
            self.sync(self.fd, self.started, offset - self.started)
        except OSError as exc:
            if exc.errno not in _NO_WRITEBACK_ERRNOS:
                raise
            self.sync = None
        self.started = offset

    def restart(self):
        self.started = 0


def _pwrite_all(fd, data, start, end, offset):
    view = memoryview(data)[start:end]
    position = offset + start
    while len(view):
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


class _Buffers:
    """Receive buffers (``bytearray`` of ``_CHUNK`` bytes) used again and
    again: no allocation, no page faults per chunk, and a bounded peak.

    A full buffer travels receiver -> writer -> hasher; the last of them to
    use it gives it back (the hasher, after the writer: it is never filled
    again before it is both written and hashed). One that is dropped on the
    way (a restart, an error) is simply garbage; the queues bound how many
    are out at once."""

    def __init__(self, keep):
        self.keep = keep
        self.free = []

    def take(self):
        try:
            return self.free.pop()
        except IndexError:
            return bytearray(_CHUNK)

    def give(self, chunk):
        if type(chunk) is bytearray and len(self.free) < self.keep:
            self.free.append(chunk)


class _Hasher(threading.Thread):
    """Hashes what the writer wrote, in order, never holding the writer up.

    Each chunk just written is handed over by reference when the queue has
    room: ``bytes``, or a receive buffer that nobody fills again before it
    is hashed and given back here, so what is hashed is exactly what was
    received and written. When the queue is full (the hash is behind, or
    its core is busy) the writer goes on, and the hasher reads that range
    back from the file instead, through the page cache (holes read as
    zeros: the writer extends the file over trailing holes first). Either
    way the hash is of the bytes as sent, zeros included; the page cache
    absorbs the lag instead of the process's memory, and the writer and
    receiver run at the source's pace."""

    def __init__(self, fd, algo, buffers):
        super().__init__(daemon=True, name='image-hasher')
        self.hasher = hashlib.new(algo)
        self.fd = os.dup(fd)
        self.buffers = buffers
        self.queue = queue.Queue(_HASH_DEPTH)
        self.position = 0  # bytes hashed
        self.cancelled = False
        self.error = None

    def feed(self, offset, chunk):
        """Hand over ``chunk``, just written at ``offset``; False when there
        is no room: the caller extends the file to its end, and the hasher
        reads it back."""
        try:
            self.queue.put_nowait((offset, chunk))
            return True
        except queue.Full:
            return False

    def finish(self, size, check):
        """All ``size`` bytes are written; ``hexdigest()`` then waits for
        the hash. Waits at most ``TICK`` at a time for room (``check`` runs
        between waits)."""
        while True:
            try:
                self.queue.put((size, _DONE), timeout=TICK)
                return
            except queue.Full:
                check()

    def cancel(self):
        self.cancelled = True
        while True:  # the writer is the only producer: room is made here
            try:
                self.queue.put_nowait((0, _DONE))
                break
            except queue.Full:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass
        self.join()

    def run(self):
        update = self.hasher.update
        get = self.queue.get
        try:
            while True:
                offset, chunk = get()
                if self.cancelled:
                    return
                if offset != self.position:
                    self._read_back(offset)
                if chunk is _DONE:
                    return
                update(chunk)
                self.position += len(chunk)
                self.buffers.give(chunk)
        except BaseException as exc:  # reported by hexdigest()
            self.error = exc
        finally:
            os.close(self.fd)

    def _read_back(self, end):
        """Hash the file from ``position`` to ``end``."""
        if end < self.position:
            raise RuntimeError('the hasher is past byte %d at %d'
                               % (end, self.position))
        buffer = memoryview(bytearray(min(_CHUNK, end - self.position)))
        while self.position < end:
            want = buffer[:min(len(buffer), end - self.position)]
            got = os.preadv(self.fd, [want], self.position)
            if got <= 0:
                raise IOError('the file ends at byte %d, before byte %d '
                              'written' % (self.position, end))
            self.hasher.update(want[:got])
            self.position += got
        buffer.release()

    def hexdigest(self):
        self.join()
        if self.error:
            raise self.error
        return self.hasher.hexdigest()


class _Receiver(threading.Thread):
    """Does all the waiting on the source, so the caller's thread never
    blocks on it: opens the stream (again after a transient failure, from
    where it stopped, with backoff), reads it, and queues an ``_Opened``
    before each stream, what arrives (coalesced up to ``_CHUNK`` bytes or
    ``_COALESCE`` seconds), and at the end ``_DONE`` or the error.

    ``abandon()`` drops a stream (it is resumed as after a stall),
    ``stop()`` ends it all; both are called from the caller's thread.
    """

    def __init__(self, source, image, delays, buffers):
        super().__init__(daemon=True, name='image-receiver')
        self.source = source
        self.buffers = buffers
        self.image = image
        self.delays = delays
        self.attempts = 0
        self.queue = queue.Queue(_QUEUE_DEPTH)
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._stream = None
        self._generation = 0
        self._abandoned = None
        self._offset = 0

    def run(self):
        try:
            self._receive()
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def _receive(self):
        offset, last_error = 0, None
        size = self.image.size
        while not self.stopped.is_set():
            if self.attempts:
                if not self.delays:
                    raise _RetriesExhausted(last_error)
                if self.stopped.wait(self.delays.pop(0)):
                    return
            self.attempts += 1
            try:
                stream = self.source.open(self.image, offset)
            except TransientSourceError as exc:
                last_error = exc
                continue
            with self._lock:
                if self.stopped.is_set():
                    stream.close()
                    return
                self._stream = stream
                self._generation += 1
                generation = self._generation
            self._offset = offset
            try:
                if stream.offset not in (0, offset):
                    raise TransientSourceError(
                        'the source resumed at byte %d, not %d'
                        % (stream.offset, offset))
                offset = stream.offset
                self._put(_Opened(offset, generation))
                offset = self._pump(stream, offset)
                if size is None or offset >= size:
                    self._put(_DONE)
                    return
                last_error = 'stream ended at byte %d of %d' % (offset, size)
            except Exception as exc:
                # an abandoned stream may fail any way its abort makes it
                if not isinstance(exc, TransientSourceError) and \
                        self._abandoned is None:
                    raise
                last_error = exc
                offset = self._offset
            finally:
                with self._lock:
                    self._stream = None
                    abandoned, self._abandoned = self._abandoned, None
                stream.close()
            if abandoned is not None:
                last_error = abandoned

    def _pump(self, stream, offset):
        """Queue the stream's bytes; return the offset after them (also
        kept in ``_offset`` as they are queued)."""
        if stream.readinto is not None:
            return self._pump_into(stream, offset)
        self._offset = offset
        pending, pending_size, since = [], 0, None
        try:
            for piece in stream:
                pending.append(piece)
                pending_size += len(piece)
                now = time.monotonic()
                since = since or now
                if pending_size >= _CHUNK or now - since >= _COALESCE:
                    self._flush(pending, pending_size)
                    pending, pending_size, since = [], 0, None
                if self._abandoned is not None or self.stopped.is_set():
                    break
        finally:
            if pending:
                self._flush(pending, pending_size)
        return self._offset

    def _pump_into(self, stream, offset):
        """``_pump`` for a stream that reads into buffers: each is queued
        when full (then given back after it is written and hashed) or when
        the coalescing time is up (then its bytes are copied)."""
        self._offset = offset
        buffer, view, filled, since = None, None, 0, None
        try:
            while True:
                if buffer is None:
                    buffer = self.buffers.take()
                    view, filled = memoryview(buffer), 0
                got = stream.readinto(view[filled:])
                if not got:
                    break
                filled += got
                now = time.monotonic()
                since = since or now
                if filled == len(buffer) or now - since >= _COALESCE:
                    view.release()
                    self._flush_buffer(buffer, filled)
                    buffer, view, since = None, None, None
                if self._abandoned is not None or self.stopped.is_set():
                    break
        finally:
            if buffer is not None:
                view.release()
                if filled:
                    self._flush_buffer(buffer, filled)
        return self._offset

    def _flush_buffer(self, buffer, filled):
        if filled == len(buffer):
            self._put(buffer)
        else:
            self._put(bytes(memoryview(buffer)[:filled]))
            self.buffers.give(buffer)
        self._offset += filled

    def _flush(self, pending, size):
        self._put(pending[0] if len(pending) == 1 else b''.join(pending))
        self._offset += size

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def abandon(self, generation, reason):
        """Drop stream ``generation`` if it is still the current one; it is
        resumed as after a transient failure, ``reason`` being the failure."""
        with self._lock:
            if generation != self._generation or self._stream is None:
                return
            self._abandoned = reason
            stream = self._stream
        stream.abort()

    def stop(self):
        self.stopped.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.abort()


class _Watch:
    """The caller's side of the limits, checked at every chunk and at least
    every ``TICK`` seconds: cancellation (the caller's ``progress`` raises),
    the deadline, and the rate of the current stream over each window."""

    def __init__(self, image, limits, progress):
        self.image = image
        self.limits = limits
        self.progress = progress
        self.started = time.monotonic()
        self.window = None  # (stream generation, start time, start offset)

    def opened(self, generation, offset):
        self.window = (generation, time.monotonic(), offset)

    def check(self, offset, receiver):
        if self.progress:
            self.progress(offset, self.image.size)
        now = time.monotonic()
        limits = self.limits
        if limits.timeout and now - self.started > limits.timeout:
            raise errors.DownloadTimedOut(
                image_id=self.image.id, elapsed=now - self.started,
                limit=limits.timeout, done=offset,
                size=self.image.size if self.image.size is not None
                else 'an unknown number of')
        if limits.min_rate and self.window is not None:
            generation, start, start_offset = self.window
            span = now - start
            if span >= limits.rate_window:
                got = offset - start_offset
                if got < limits.min_rate * span:
                    self.window = None  # until the next stream opens
                    receiver.abandon(generation, _TooSlow(dict(
                        got=got, window=span, rate=got / span,
                        min_rate=limits.min_rate)))
                else:
                    self.window = (generation, now, offset)


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
        algo, expected = self.result.hash_algo, self.result.hash_value
        actual = self._hasher.hexdigest()
        if actual != expected:
            raise errors.ChecksumMismatch(image_id=self.image.id, algo=algo,
                                          actual=actual, expected=expected)

    def cancel(self):
        if self._hasher is not None:
            self._hasher.cancel()


def download(source, image, dest_fd, limits=None, progress=None,
             writeback=True):
    """Stream ``image`` from ``source`` into the new, empty file open on
    ``dest_fd`` (the caller's; it stays open).

    Returns a ``Download`` whose hash may still be running; the file is not
    fsynced. On an error the file holds partial bytes: discard it.

    :param limits: ``DownloadLimits`` (retries, hashes, time)
    :param progress: ``callable(done_bytes, total_bytes)``, called at every
        chunk and at least every ``TICK`` seconds; it may raise (e.g.
        ``Cancelled``) to stop the download
    :param writeback: start writing the file back to disk as it comes (for
        a file that will be fsynced; not for one converted, then discarded)
    :raises WeakImageHash, UnknownHashAlgorithm: before any request
    :raises DownloadFailed: transient failures outlasted the retries
        (DownloadTooSlow when the last one was the minimum rate)
    :raises DownloadTimedOut: over the deadline
    :raises InsufficientSpace: the filesystem filled up
    :raises ImageUnacceptable: the source sent more than the image's size
    """
    limits = limits or DownloadLimits()
    expected = hash_to_verify(image, limits.allow_weak_hashes)
    fd = dest_fd
    hasher = None
    watch = _Watch(image, limits, progress)
    buffers = _Buffers(_QUEUE_DEPTH + _HASH_DEPTH + 3)
    receiver = _Receiver(source, image, backoff_delays(limits.retries),
                         buffers)
    offset = 0

    def chunks():
        """The receiver's chunks; waits at most TICK between checks."""
        while True:
            try:
                item = receiver.queue.get(timeout=TICK)
            except queue.Empty:
                watch.check(offset, receiver)
                continue
            if item is _DONE:
                return
            if isinstance(item, _Opened):
                watch.opened(item.generation, item.offset)
                if item.offset == 0 and offset > 0:
                    raise _SourceRestarted()
                continue
            if isinstance(item, BaseException):
                raise item
            yield item

    def check():
        watch.check(offset, receiver)

    writeback = _Writeback(fd, writeback)
    receiver.start()
    try:
        while True:  # once, and again if the source restarts from byte 0
            hasher = _Hasher(fd, expected[0], buffers) if expected \
                else None
            if hasher:
                hasher.start()
            wrapper = inspection.new_stream_inspector(chunks())
            try:
                for chunk in wrapper:
                    end = offset + len(chunk)
                    if image.size is not None and end > image.size:
                        raise errors.ImageUnacceptable(
                            image_id=image.id, reason='the source sent more '
                            'than the %d bytes its metadata says' % image.size)
                    _pwrite_sparse(fd, chunk, offset)
                    # hashed while the next one is written (a receive
                    # buffer goes back after both), or read back
                    if hasher is None:
                        buffers.give(chunk)
                    elif not hasher.feed(offset, chunk):
                        os.ftruncate(fd, end)  # trailing holes read back
                        buffers.give(chunk)
                    offset = end
                    writeback.written(offset)
                    check()
            except _SourceRestarted:
                LOG.info('image %s: the source sent the whole image instead '
                         'of resuming at byte %d; starting over', image.id,
                         offset)
                if hasher:
                    hasher.cancel()
                os.ftruncate(fd, 0)
                offset = 0
                writeback.restart()
                continue
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise errors.InsufficientSpace(
                        path='the base image directory', image_id=image.id,
                        needed=image.size or offset, free=0)
                raise
            except _RetriesExhausted as exc:
                last = exc.args[0]
                if isinstance(last, _TooSlow):
                    raise errors.DownloadTooSlow(
                        image_id=image.id, attempts=receiver.attempts,
                        **last.info)
                raise errors.DownloadFailed(image_id=image.id,
                                            attempts=receiver.attempts,
                                            reason=str(last))
            break
        os.ftruncate(fd, offset)  # holes at the end
        if image.size is not None and offset != image.size:
            raise errors.DownloadFailed(
                image_id=image.id, attempts=receiver.attempts,
                reason='got %d bytes, the image has %d' % (offset, image.size))
        inspector = inspection.stream_result(wrapper, image.id)
        if hasher:
            hasher.finish(offset, check)
    except BaseException:
        if hasher:
            hasher.cancel()
        raise
    finally:
        receiver.stop()
        REGISTRY.inc('template_agent_downloaded_bytes_total', offset)
        REGISTRY.inc('template_agent_download_seconds_total',
                     time.monotonic() - watch.started)
    return Download(image, DownloadResult(
        size=offset, inspector=inspector,
        hash_algo=expected[0] if expected else None,
        hash_value=expected[1] if expected else None,
        attempts=receiver.attempts), hasher)


def download_verified(source, image, dest_fd, then=None, limits=None,
                      progress=None, writeback=True):
    """Download, check format and safety, run ``then``, verify the hash.

    ``then(qemu_format, virtual_size)`` (e.g. convert, or fsync) runs while
    the hash finishes; whatever it made must not be published until this
    returns: on a hash mismatch ChecksumMismatch is raised after it, and the
    caller's cleanup removes what it made.

    :returns: ``(DownloadResult, virtual_size, qemu_format, then's result)``
    """
    limits = limits or DownloadLimits()
    pending = download(source, image, dest_fd, limits=limits,
                       progress=progress, writeback=writeback)
    try:
        result = pending.result
        virtual_size = inspection.check_image(
            result.inspector, image.disk_format, image.id,
            limits.max_virtual_size)
        fmt = inspection.qemu_format(result.inspector)
        if fmt == 'raw':
            virtual_size = result.size
        made = then(fmt, virtual_size) if then else None
    except BaseException:
        pending.cancel()
        raise
    pending.verify()
    return result, virtual_size, fmt, made
