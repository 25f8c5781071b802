"""The block storage side of the agent: its operations on volumes and on
the image-volume cache.

``VolumeSide`` is what ``TemplateAgent.volumes`` holds: the volume
operations of ``agent.operations`` (``part='volumes'``) are its methods,
and the core calls ``maintain``, ``reclaim``, ``status`` and ``gauges``
from its own pass, ``init``, ``status`` and metrics.

It is on (``VolumeSide.enabled``) when the configuration says volumes are
used: a handler of the chain works with volumes (``volume_linking``), or
the image-volume cache is enabled. Explicit volume operations (``volume
create``, ``volume list``...) work either way.
"""

import os
import uuid

from agent import errors, files, naming
from agent.handlers import registry
from agent.images import download


class VolumeSide:
    def __init__(self, conf, context, index):
        self.conf = conf
        self.context = context      # agent.handlers.base.HandlerContext
        self.index = index

    @property
    def enabled(self):
        return self.conf.image_volume_cache.enabled or any(
            registry.uses_volumes(name)
            for name in self.conf.template_image_handler)

    @property
    def backend(self):
        return self.context.volume_backend

    @property
    def cache(self):
        return self.context.image_volume_cache

    @property
    def source(self):
        return self.context.source

    # -- operations -----------------------------------------------------------
    def create_volume(self, image_id, size_gb, project_id=None,
                      progress=None):
        """A volume of ``size_gb`` GiB holding the image: a copy-on-write
        clone of its template in the image-volume cache (made on a miss), or,
        when the cache may not serve it, a volume written directly."""
        naming.validate_image_id(image_id)
        if not isinstance(size_gb, int) or size_gb <= 0:
            raise errors.AgentError('volume size must be a positive number '
                                    'of GiB, not %r' % (size_gb,))
        image = self.source.get(image_id)
        if image.status != 'active':
            raise errors.ImageNotActive(image_id=image_id,
                                        status=image.status)
        size = size_gb * 1024 ** 3
        metadata = {'kind': 'volume', 'image_id': image_id,
                    'project_id': project_id}
        if image.virtual_size:
            _check_volume_size(image_id, size, image.virtual_size)
        cache = self.cache
        if cache.allowed(image, project_id)[0]:
            holder = cache.clone_holder()
            entry = cache.acquire(image, self.source, holder,
                                  project_id=project_id, progress=progress)
            try:
                _check_volume_size(image_id, size, entry.size_bytes)
                return self.backend.clone(entry.volume_id, size, metadata)
            finally:
                cache.release(entry, holder)
        return self._write_new_volume(image, size, metadata, progress)

    def _write_new_volume(self, image, size, metadata, progress):
        backend = self.backend
        tmp = os.path.join(self.conf.state_path, 'tmp-%d-%s.part' % (
            os.getpid(), uuid.uuid4()))
        volume_id = None
        try:
            def write_volume(fmt, virtual_size):
                nonlocal volume_id
                _check_volume_size(image.id, size, virtual_size)
                volume_id = backend.create(size, metadata)
                backend.write_image(volume_id, tmp, fmt)

            tmp_fd = os.open(tmp, files.NEW_FLAGS, 0o600)
            try:
                download.download_verified(
                    self.source, image, tmp_fd, then=write_volume,
                    limits=download.DownloadLimits.from_conf(self.conf),
                    progress=progress)
            finally:
                os.close(tmp_fd)
            backend.mark_written(volume_id)  # verified
            return volume_id
        except BaseException:
            if volume_id:
                backend.delete(volume_id)
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def volume_writer(self, image_id):
        """For ``images import --volume-backed``: ``writer(path, size)``
        that stores a raw file in a new volume and returns its id."""
        backend = self.backend

        def writer(path, size):
            volume_id = backend.create(size, {'kind': 'image',
                                              'image_id': image_id})
            try:
                backend.write_image(volume_id, path, 'raw')
                backend.mark_written(volume_id)  # the catalog's own file
            except BaseException:
                backend.delete(volume_id)
                raise
            return volume_id
        return writer

    def list_volumes(self):
        return [v.to_dict() for v in self.backend.list()]

    def delete_volume(self, volume_id):
        backend = self.backend
        volume = backend.get(volume_id)
        linked = [e.filename for e in self.index.all()
                  if e.volume_id == volume_id]
        if linked:
            raise errors.AgentError(
                'volume %s is linked as base image %s; remove that base '
                'first' % (volume_id, ', '.join(linked)))
        if volume.metadata.get('kind') == 'template':
            raise errors.AgentError(
                'volume %s is the image-volume cache template of image %s; '
                'use cache evict instead' % (volume_id,
                                             volume.metadata.get('image_id')))
        backend.delete(volume_id)
        return volume.to_dict()

    def cache_list(self):
        cache = self.cache
        return [dict(e.to_dict(), holders=sorted(cache.holders(e)))
                for e in cache.entries()]

    def cache_evict(self, image_id):
        naming.validate_image_id(image_id)
        return self.cache.evict(image_id)

    # -- for the core ---------------------------------------------------------
    def maintain(self):
        """The volume part of the manager pass: retire stale templates,
        enforce the cache's limits, reclaim leftovers."""
        cache = self.cache
        return {'cache_retired': cache.refresh(self.source),
                'cache_evicted': [e.image_id
                                  for e in cache.enforce_limits()],
                'reclaimed': self.reclaim()}

    def reclaim(self, exports=False):
        """What killed processes left half made: orphan templates, volumes
        their creator never finished; with ``exports`` (``init``: nothing
        can be attaching meanwhile), also loop devices no base links."""
        try:
            report = {'templates': self.cache.reclaim()}
            in_use = {e.volume_id for e in self.index.all()
                      if e.volume_id} if exports else None
            report.update(self.backend.reclaim(in_use))
        except errors.BackendUnavailable as exc:
            report = {'error': str(exc)}
        return report

    def status(self):
        try:
            backend = self.backend
            status = {'volume_backend': backend.capabilities(),
                      'volumes': len(backend.list())}
            cache = self.cache
            entries = cache.entries()
            status['image_volume_cache'] = {
                'enabled': self.conf.image_volume_cache.enabled,
                'entries': len(entries),
                'bytes': sum(e.size_bytes for e in entries),
                'held': sum(1 for e in entries if e.holders),
                'stale': sum(1 for e in entries if e.state == 'stale'),
                'max_size_gb': self.conf.image_volume_cache.max_size_gb,
                'max_count': self.conf.image_volume_cache.max_count,
                'events': cache.counters()}
        except errors.BackendUnavailable as exc:
            status = {'volume_backend': {'available': False,
                                         'reason': str(exc)}}
        return status

    def gauges(self):
        try:
            counters = self.cache.counters()
        except errors.BackendUnavailable:
            counters = {}
        return [('template_agent_image_volume_cache_events_total',
                 {'event': event}, value)
                for event, value in counters.items()]


def _check_volume_size(image_id, size, needed):
    if size < needed:
        raise errors.AgentError(
            'a %d GiB volume is too small for image %s, whose virtual size '
            'is %d bytes' % (size // 1024 ** 3, image_id, needed))
