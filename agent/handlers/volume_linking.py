"""The volume-linking handler: zero copy.

The base ``_base/<sha1>`` becomes an atomic symlink to the block device of a
volume that already holds the image (through a device link that vanishes at
reboot, see ``agent.linking.links``), attached read-only with os-brick:

(a) the image has a ``cinder://[<store>/]<volume-id>`` location, is raw and
    is owned by the requester (Cinder's rule) -> attach that volume;
(b) the image-volume cache has a fresh template -> attach it (a hit);
(c) otherwise the template is created and the image written into it once
    (a miss), then attached.

Any failure leaves no link and lets the next handler (e.g. downloading)
serve. ``init`` re-attaches every linked base after a restart or a reboot
(loop devices gone) and repairs its link atomically.
"""

import os
import stat

from agent import config, errors, files, locks
from agent.cache.index import BaseImage
from agent.handlers.base import BaseTemplateImageHandler
from agent.images import download
from agent.linking import attach, links


class VolumeLinkingTemplateImageHandler(BaseTemplateImageHandler):
    name = 'volume_linking'
    uses_volumes = True

    @property
    def backend(self):
        return self.context.volume_backend

    @property
    def cache(self):
        return self.context.image_volume_cache

    def _holder(self, path):
        return 'link:%s:%s' % (self.cache.host, path)

    def _location_allowed(self, image, project_id):
        if image.disk_format != 'raw':
            return False, ('volume location on a %s image (only raw images '
                           'can be linked)' % image.disk_format)
        if project_id is not None and image.owner != project_id:
            return False, ('volume location on an image owned by %s, not by '
                           'project %s' % (image.owner, project_id))
        return True, None

    def can_serve(self, image, project_id=None):
        ok, why = config.linked_bases_serve_nova(self.conf)
        if not ok:
            return False, why
        try:
            self.backend.capabilities()
        except errors.AgentError as exc:
            return False, str(exc)
        if image.volume_location:
            ok, why = self._location_allowed(image, project_id)
            if ok:
                return True, None
            if not self.conf.image_volume_cache.enabled:
                return False, why
        return self.cache.allowed(image, project_id)

    def fetch_image(self, image, path, progress=None, project_id=None):
        location = image.volume_location
        cache_entry = None
        holder = self._holder(path)
        volume = None
        if location and self._location_allowed(image, project_id)[0]:
            volume = self.backend.get(location)
            if volume.metadata.get('kind') == 'template':
                # a template the cache recorded on the image ([cinder]
                # glance_locations): held through the cache, as a hit
                volume = None
        if volume is not None:
            if image.size and volume.size_bytes < image.size:
                raise errors.VolumeTooSmall(volume_id=location,
                                            size=volume.size_bytes,
                                            image_id=image.id,
                                            needed=image.size)
            volume_id, origin = location, 'location'
            size, virtual_size = volume.size_bytes, image.size
        else:
            try:
                cache_entry = self.cache.acquire(
                    image, self.context.source, holder,
                    project_id=project_id, progress=progress)
            except (OSError, errors.InsufficientSpace) as exc:
                if isinstance(exc, OSError) and \
                        exc.errno not in download.NO_SPACE_ERRNOS:
                    raise
                # the volumes' filesystem is full: _base may not be
                raise errors.HandlerCannotServe(
                    handler=self.name, image_id=image.id,
                    reason='no room for its template volume: %s' % exc)
            volume_id, origin = cache_entry.volume_id, 'cache'
            size = virtual_size = cache_entry.size_bytes
        try:
            device = self._attach_and_link(volume_id, path)
        except BaseException:
            if cache_entry:
                self.cache.release(cache_entry, holder)
            raise
        return BaseImage(
            filename=os.path.basename(path), image_id=image.id,
            handler=self.name, source=self.context.source.name,
            size_bytes=size, virtual_size=virtual_size,
            disk_format=image.disk_format,
            hash_algo=(image.expected_hash or (None, None))[0],
            hash_value=(image.expected_hash or (None, None))[1],
            image_updated_at=image.updated_at, target=device,
            volume_id=volume_id, backend=self.backend.name, origin=origin)

    @property
    def devices_dir(self):
        return self.conf.volume_linking.device_links_path

    def _attach_and_link(self, volume_id, path):
        props = self.backend.connection_properties(volume_id, read_only=True)
        device = attach.connect(props)
        try:
            with self.context.base_dir_fd() as dir_fd:
                links.link_device(device, volume_id, os.path.basename(path),
                                  dir_fd, self.devices_dir)
        except BaseException:
            self._detach_if_unlinked(volume_id, exclude=path)
            raise
        return device

    def _detach_if_unlinked(self, volume_id, exclude):
        """Detach ``volume_id`` unless another base still links to it."""
        for other in self.context.index.all():
            if other.volume_id == volume_id and other.handler == self.name \
                    and os.path.join(self.context.base_dir,
                                     other.filename) != exclude:
                return
        links.unlink_device(volume_id, self.devices_dir)
        try:
            props = self.backend.connection_properties(volume_id)
            attach.disconnect(props)
        except errors.VolumeNotFound:
            return
        self.backend.release(volume_id)

    def remove_image(self, entry, path):
        with self.context.base_dir_fd() as dir_fd:
            try:
                st = os.stat(entry.filename, dir_fd=dir_fd,
                             follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISLNK(st.st_mode):
                    raise errors.AgentError('%s is not a link; not removed'
                                            % path)
                files.unlink_quietly(entry.filename, dir_fd=dir_fd)
        if entry.volume_id:
            self._detach_if_unlinked(entry.volume_id, exclude=path)
            if entry.origin == 'cache':
                for cache_entry in self.cache.entries(entry.image_id):
                    if cache_entry.volume_id == entry.volume_id:
                        self.cache.release(cache_entry, self._holder(path))

    def init(self):
        """Re-attach every linked base and repair its link."""
        report = {'restored': [], 'intact': [], 'failed': []}
        for entry in self.context.index.all():
            if entry.handler != self.name or not entry.volume_id:
                continue
            with locks.base_lock(self.conf, entry.filename), \
                    self.context.base_dir_fd() as dir_fd:
                try:
                    # before connecting: a link to a detached device (its
                    # node stays) must be reported restored, not intact
                    attached = links.target_attached(entry.filename, dir_fd)
                    props = self.backend.connection_properties(
                        entry.volume_id, read_only=True)
                    device = attach.connect(props)
                    if attached and links.device_link_target(
                            entry.volume_id, self.devices_dir) == device:
                        report['intact'].append(entry.filename)
                        continue
                    links.link_device(device, entry.volume_id,
                                      entry.filename, dir_fd,
                                      self.devices_dir)
                    entry.target = device
                    self.context.index.put(entry)
                    report['restored'].append(entry.filename)
                except errors.AgentError as exc:
                    report['failed'].append({'filename': entry.filename,
                                             'image_id': entry.image_id,
                                             'reason': str(exc)})
        return report
