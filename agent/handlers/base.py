"""The interface every template image handler implements.

A handler prepares a base image in ``_base`` one way (downloading, volume
linking, ...). The agent core (``agent.core.TemplateAgent``) owns what is
common: it validates the id, takes nova's external lock ``nova-<sha1>``,
asks the image source for the metadata, tries the configured handlers in
order and records which one prepared the base in the index. A handler only
does its own part, always under that lock.

Worked example, downloading image ``cirros`` (sha1 ``cf23...``)::

    handler = DownloadingTemplateImageHandler(context)
    handler.can_serve(image)            # -> (True, None)
    entry = handler.fetch_image(image, '/var/lib/nova/instances/_base/cf23...')
    entry.handler                       # -> 'downloading'
    entry.size_bytes                    # -> 117440512 (raw, on disk sparse)
    handler.remove_image(entry, '/var/lib/nova/instances/_base/cf23...')

and a volume-linking handler would answer ``can_serve(image)`` with
``(False, 'image has no volume location and the cache is disabled')`` to let
the next handler serve.
"""

import abc
import os

from agent import files


class HandlerContext:
    """What a handler gets from the agent core; the volume backend and the
    image-volume cache are built on first use, once per agent."""

    def __init__(self, conf, source, index, base_dir):
        self.conf = conf            # oslo.config ConfigOpts
        self.source = source        # agent.images.sources.ImageSource
        self.index = index          # agent.cache.index.BaseImageIndex
        self.base_dir = base_dir    # $instances_path/_base
        self.swarm = None           # agent.p2p.swarm.Swarm, in the service
        self._volume_backend = None
        self._image_volume_cache = None

    def base_dir_fd(self):
        """``_base``, opened and checked (``agent.files.open_dir``), as a
        context manager yielding the descriptor: handlers work in it by
        descriptor only."""
        return files.opened_dir(self.base_dir, os.geteuid(), create=True)

    @property
    def volume_backend(self):
        """The ``[volume_linking] backend``; BackendUnavailable if none."""
        if self._volume_backend is None:
            from agent import volumes
            self._volume_backend = volumes.from_config(self.conf)
        return self._volume_backend

    @property
    def image_volume_cache(self):
        if self._image_volume_cache is None:
            from agent.cache.image_volume_cache import ImageVolumeCache
            self._image_volume_cache = ImageVolumeCache(self.conf,
                                                        self.volume_backend)
        return self._image_volume_cache

    def close(self):
        if self._image_volume_cache is not None:
            self._image_volume_cache.close()


class BaseTemplateImageHandler(abc.ABC):
    #: short name, as written in ``template_image_handler``
    name = None
    #: whether it works with volumes (then the agent maintains the volume
    #: side: the image-volume cache, leftovers of killed processes)
    uses_volumes = False

    def __init__(self, context):
        self.context = context
        self.conf = context.conf

    def can_serve(self, image, project_id=None):
        """Whether this handler can prepare ``image`` on this host.

        :param image: ``agent.images.meta.ImageMeta``
        :param project_id: the requesting project, for sharing rules
        :returns: ``(True, None)`` or ``(False, 'why not')``; a handler that
            cannot work on this host at all (no backend, no privileges) says
            so here instead of failing in ``fetch_image``.
        """
        return True, None

    @abc.abstractmethod
    def fetch_image(self, image, path, progress=None, project_id=None):
        """Prepare the base image of ``image`` at ``path``.

        Called under the image's lock, only when nothing exists at ``path``.
        Must leave nothing under ``path`` when it fails, and only publish a
        complete, verified base (atomic rename or atomic symlink).

        :param image: ``ImageMeta`` from the image source
        :param path: ``$instances_path/_base/<sha1(image.id)>``
        :param progress: optional ``callable(done_bytes, total_bytes)``
        :param project_id: the requesting project, for sharing rules
        :returns: ``agent.cache.index.BaseImage`` describing the new base
        :raises agent.errors.AgentError: what failed; errors whose
            ``falls_through`` is True let the next handler try
        """

    @abc.abstractmethod
    def remove_image(self, entry, path):
        """Remove the base at ``path`` (and detach what it attached).

        Called under the image's lock, after the core checked that nothing
        uses the base. Never follows a symlink out of ``_base``.
        """

    def init(self):
        """Re-prepare this handler's bases after a restart of the agent or
        the host: clean half-written files, re-attach, repair links.

        :returns: a dict report, e.g. ``{'cleaned': [...], 'failed': [...]}``
        """
        return {}
