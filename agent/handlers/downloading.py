"""The downloading handler: copy the image into ``_base``, verified, raw.

Stream into a new file in ``_base`` that has no name yet (hashing and
inspecting on the fly, sparse), refuse unsafe or mislabeled content before
``qemu-img`` sees it, convert to raw into a second nameless file when
``force_raw_images`` (``qemu-img`` gets both as open descriptors), fsync,
and only then give the result its name. Where the filesystem cannot make
nameless files, nova's temporary names (``.part``, ``.converted``) are
used, created exclusively, so either side cleans the other's leftovers
under the shared lock. See ``agent.files`` for why.

With ``[p2p] enabled`` (in the service), the bytes come from the agents'
swarm (``agent.p2p``) through the very same sequence: the swarm is only
another image source, so what it gives is inspected, hashed against the
image's hash from Glance and published by the same code, or not at all.
When that fails, for any reason, the image is downloaded again from
Glance alone.
"""

import logging
import os

from agent import errors, files, naming
from agent.cache.index import BaseImage
from agent.handlers.base import BaseTemplateImageHandler
from agent.images import download, inspection, qemu_img
from agent.metrics import REGISTRY

LOG = logging.getLogger(__name__)
#: errors a second, plain download would not cure
_FINAL = (errors.Cancelled, errors.InsufficientSpace, errors.ImageTooLarge)


class DownloadingTemplateImageHandler(BaseTemplateImageHandler):
    name = 'downloading'

    def can_serve(self, image, project_id=None):
        if image.disk_format not in inspection.SUPPORTED_FORMATS:
            return False, 'disk_format %s is not supported' % (
                image.disk_format)
        if image.container_format not in ('bare', None):
            return False, 'container_format %s is not supported' % (
                image.container_format)
        return True, None

    def _max_virtual_size(self):
        return self.conf.max_image_virtual_size_gb * 1024 ** 3

    def _check_space(self, image, needed, dir_fd):
        free = free_bytes('/proc/self/fd/%d' % dir_fd)
        if needed > free:
            raise errors.InsufficientSpace(path=self.context.base_dir,
                                           image_id=image.id, needed=needed,
                                           free=free)

    def fetch_image(self, image, path, progress=None, project_id=None):
        limit = self._max_virtual_size()
        if limit and image.virtual_size and image.virtual_size > limit:
            raise errors.ImageTooLarge(image_id=image.id,
                                       size=image.virtual_size,
                                       limit=self.conf.max_image_virtual_size_gb)
        glance = self.context.source
        swarm = self.context.swarm
        if swarm is None or not swarm.wants(image):
            return self._fetch(image, path, glance, progress)
        try:
            with swarm.share(image, glance) as source:
                return self._fetch(image, path, source,
                                   source.reporting(progress))
        except _FINAL:
            raise
        except errors.AgentError as exc:
            REGISTRY.inc('template_agent_p2p_fallbacks_total',
                         reason=type(exc).__name__)
            LOG.warning('image %s: the copy from the swarm failed (%s); '
                        'nothing of it was published; downloading it from '
                        'Glance alone', image.id, exc)
        return self._fetch(image, path, glance, progress)

    def _fetch(self, image, path, source, progress):
        """Download ``image`` from ``source``, verify, convert, publish."""
        will_convert = self.conf.force_raw_images and \
            image.disk_format not in ('raw', 'iso') + inspection.AMI_FORMATS
        name = os.path.basename(path)
        part_name, converted_name = naming.temp_filenames(name)
        made = []  # (fd, temp name or None)

        def new_file(temp_name):
            fd = files.new_anonymous(dir_fd)
            if fd is None:
                fd = files.new_named(temp_name, dir_fd)
            else:
                temp_name = None
            made.append((fd, temp_name))
            return fd, temp_name

        def make_raw(fmt, virtual_size):
            """Runs while the hash finishes; returns what to publish."""
            part = made[0]
            if not (self.conf.force_raw_images and fmt != 'raw'):
                # published as it is: nova's qemu reads its tables
                qemu_img.check(qemu_img.fd_path(part[0]), fmt, image.id,
                               pass_fds=(part[0],),
                               size=os.fstat(part[0]).st_size)
                os.fsync(part[0])
                return part
            self._check_space(image, virtual_size, dir_fd)
            converted = new_file(converted_name)
            os.ftruncate(converted[0], virtual_size)
            qemu_img.convert_to_raw(
                qemu_img.fd_path(part[0]), fmt,
                qemu_img.fd_path(converted[0]), image.id,
                existing_target=True, pass_fds=(part[0], converted[0]),
                virtual_size=virtual_size,
                source_size=os.fstat(part[0]).st_size)
            os.fsync(converted[0])
            return converted

        with self.context.base_dir_fd() as dir_fd:
            self._check_space(image, (image.size or 0) + (
                (image.virtual_size or 0) if will_convert else 0), dir_fd)
            for leftover in (part_name, converted_name):
                files.unlink_quietly(leftover, dir_fd=dir_fd)
            try:
                part_fd, _ = new_file(part_name)
                result, virtual_size, fmt, (fd, temp_name) = \
                    download.download_verified(
                        source, image, part_fd, then=make_raw,
                        limits=download.DownloadLimits.from_conf(self.conf),
                        progress=progress,
                        # a file converted, then discarded, is never fsynced
                        writeback=not will_convert)
                files.publish(fd, name, dir_fd, temp_name)
                size = os.fstat(fd).st_size
            except OSError as exc:
                if exc.errno in download.NO_SPACE_ERRNOS:
                    raise errors.InsufficientSpace(
                        path=self.context.base_dir, image_id=image.id,
                        needed=virtual_size_or_size(image),
                        free=free_bytes(self.context.base_dir))
                raise
            finally:
                for fd, temp_name in made:
                    os.close(fd)
                    if temp_name:
                        files.unlink_quietly(temp_name, dir_fd=dir_fd)
        return BaseImage(
            filename=name, image_id=image.id,
            handler=self.name, source=source.name,
            size_bytes=size, virtual_size=virtual_size,
            disk_format=image.disk_format, hash_algo=result.hash_algo,
            hash_value=result.hash_value, image_updated_at=image.updated_at)

    def remove_image(self, entry, path):
        with self.context.base_dir_fd() as dir_fd:
            remove_entry(dir_fd, os.path.basename(path))


def remove_entry(dir_fd, name):
    """Unlink ``name`` in ``dir_fd``: a file or a symlink itself (never its
    target); a directory is refused."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise errors.AgentError('%s is a directory; not removed' % name)


def free_bytes(path):
    """Bytes an unprivileged writer may still use on ``path``'s filesystem
    (what ``df`` shows as available)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def virtual_size_or_size(image):
    return image.virtual_size or image.size or 0
