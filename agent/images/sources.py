"""The image source interface and the factory for the configured one."""

import abc


class DataStream:
    """Image bits from ``offset`` on, as an iterator of ``bytes`` chunks.

    ``offset`` is where the source actually starts: a source that cannot
    resume answers 0 whatever was asked, and the caller starts over.

    ``close()`` belongs to the thread that iterates; ``abort()`` may be
    called from any thread and makes a read blocked in the iteration return
    soon (with an error or the end of the stream).
    """

    def __init__(self, chunks, offset=0, close=None, abort=None):
        self._chunks = chunks
        self.offset = offset
        self._close = close
        self._abort = abort

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
