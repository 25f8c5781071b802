"""The downloading handler: copy the image into ``_base``, verified, raw.

Stream to ``<sha1>.part`` (hashing and inspecting on the fly, sparse),
refuse unsafe or mislabeled content before ``qemu-img`` sees it, convert to
raw into ``<sha1>.converted`` when ``force_raw_images``, fsync, and publish
with an atomic rename. Temporary names are nova's, so either side cleans the
other's leftovers under the shared lock.
"""

import os

import psutil

from agent import errors, naming
from agent.files import fsync_path, unlink_quietly
from agent.cache.index import BaseImage
from agent.handlers.base import BaseTemplateImageHandler
from agent.images import download, inspection, qemu_img


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

    def _check_space(self, image, needed):
        free = psutil.disk_usage(self.context.base_dir).free
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
        will_convert = self.conf.force_raw_images and \
            image.disk_format not in ('raw', 'iso') + inspection.AMI_FORMATS
        self._check_space(image, (image.size or 0) +
                          ((image.virtual_size or 0) if will_convert else 0))
        part, converted = naming.temp_filenames(path)
        for leftover in (part, converted):
            unlink_quietly(leftover)
        def make_raw(fmt, virtual_size):
            """Runs while the hash finishes; returns the file to publish."""
            published = part
            if self.conf.force_raw_images and fmt != 'raw':
                self._check_space(image, virtual_size)
                qemu_img.convert_to_raw(part, fmt, converted, image.id)
                unlink_quietly(part)
                published = converted
            fsync_path(published)
            return published

        try:
            result, virtual_size, fmt, published = \
                download.download_verified(
                    self.context.source, image, part, then=make_raw,
                    retries=self.conf.glance.num_retries,
                    max_virtual_size=limit, progress=progress)
            os.rename(published, path)
            fsync_path(os.path.dirname(path), directory=True)
        except OSError as exc:
            if exc.errno in download.NO_SPACE_ERRNOS:
                raise errors.InsufficientSpace(
                    path=self.context.base_dir, image_id=image.id,
                    needed=virtual_size_or_size(image),
                    free=psutil.disk_usage(self.context.base_dir).free)
            raise
        finally:
            for leftover in (part, converted):
                unlink_quietly(leftover)
        return BaseImage(
            filename=os.path.basename(path), image_id=image.id,
            handler=self.name, source=self.context.source.name,
            size_bytes=os.stat(path).st_size, virtual_size=virtual_size,
            disk_format=image.disk_format, hash_algo=result.hash_algo,
            hash_value=image.expected_hash[1] if image.expected_hash
            else None, image_updated_at=image.updated_at)

    def remove_image(self, entry, path):
        if os.path.isdir(path) and not os.path.islink(path):
            raise errors.AgentError('%s is a directory; not removed' % path)
        unlink_quietly(path)  # a symlink itself, never its target


def virtual_size_or_size(image):
    return image.virtual_size or image.size or 0
