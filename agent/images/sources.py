"""The image source interface and the factory for the configured one."""

import abc


def backoff_delays(retries, base=0.5, cap=8.0):
    """Delays before each retry: 0.5, 1, 2, 4, 8, 8, ... seconds."""
    return [min(cap, base * (2 ** n)) for n in range(retries)]


class DataStream:
    """Image bits from ``offset`` on, as an iterator of ``bytes`` chunks.

    ``offset`` is where the source actually starts: a source that cannot
    resume answers 0 whatever was asked, and the caller starts over.

    ``close()`` belongs to the thread that iterates; ``abort()`` may be
    called from any thread and makes a read blocked in the iteration return
    soon (with an error or the end of the stream).

    A source may also offer ``readinto``: ``readinto(buffer)`` fills the
    start of a writable ``buffer`` with what has arrived (at least one byte,
    waiting for it if needed) and returns how many bytes, 0 at the end, so
    the reader can receive into buffers it reuses instead of a new object
    per read. ``readinto`` is None where it does not.
    """

    def __init__(self, chunks, offset=0, close=None, abort=None,
                 readinto=None):
        self._chunks = chunks
        self.offset = offset
        self._close = close
        self._abort = abort
        self.readinto = readinto

    def __iter__(self):
        return iter(self._chunks)

    def close(self):
        if self._close:
            self._close()

    def abort(self):
        if self._abort:
            self._abort()


class TransientSourceError(Exception):
    """A failure worth retrying: connection reset, 5xx, stalled stream."""


class ImageSource(abc.ABC):
    #: short name shown in errors and recorded in the index
    name = 'source'

    @abc.abstractmethod
    def get(self, image_id):
        """Return the ``ImageMeta`` of ``image_id``.

        :raises ImageNotFound: unknown id
        :raises SourceUnavailable: the source cannot be reached
        """

    @abc.abstractmethod
    def open(self, image, offset=0):
        """Return a ``DataStream`` of the image bits from ``offset``.

        :raises TransientSourceError: worth a retry
        """


def from_config(conf, volume_opener=None):
    """The configured image source; ``volume_opener`` reads volume-backed
    images of the local catalog."""
    if conf.image_source.driver == 'glance':
        from agent.images.glance import GlanceImageSource
        return GlanceImageSource(conf)
    from agent.images.local_catalog import LocalCatalog
    return LocalCatalog(conf.image_source.local_path, volume_opener)
