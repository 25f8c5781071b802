"""The embedded local catalog: a directory of images with Glance-v2 records.

``<id>.json`` holds the image record (as ``GET /v2/images/{id}`` answers),
``<id>.data`` the bits. ``import_image`` computes what Glance would: size,
virtual size, md5 ``checksum`` and sha512 ``os_hash_value``, and refuses a
file whose content does not match the claimed ``disk_format``.

The catalog is in ``state_path``, which belongs to the owner of
``instances_path`` once the agent dropped root: its files are opened as
``agent.files`` says for files nova controls (no symlink followed, a FIFO
never waited on, regular files only), and whatever cannot be read is the
source being unavailable, not a crash or a hang. Every fetch inspects and
verifies the bits anyway.
"""

import datetime
import hashlib
import json
import os

from agent import errors, files, naming
from agent.images import inspection
from agent.images.meta import ImageMeta
from agent.images.sources import DataStream, ImageSource

CHUNK_SIZE = 1024 * 1024


def utcnow_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        '%Y-%m-%dT%H:%M:%SZ')


class LocalCatalog(ImageSource):
    name = 'local'

    def __init__(self, path, volume_opener=None):
        """:param volume_opener: ``callable(volume_id) -> file`` that reads
            the bits of volume-backed images (``cinder://`` locations)."""
        self.path = path
        self.volume_opener = volume_opener

    def _paths(self, image_id):
        naming.validate_image_id(image_id)
        return (os.path.join(self.path, image_id + '.json'),
                os.path.join(self.path, image_id + '.data'))

    def _unreadable(self, path, exc):
        return errors.SourceUnavailable(
            source='local catalog %s' % self.path,
            reason='cannot read %s: %s' % (path, exc))

    def _open_file(self, path):
        """``path`` opened for reading, as a file object.

        :raises FileNotFoundError: it is missing
        :raises SourceUnavailable: it is not a regular file (a symlink, a
            FIFO) or cannot be read
        """
        try:
            fd, _ = files.open_existing(path)
        except FileNotFoundError:
            raise
        except (OSError, errors.UnsafePath) as exc:
            raise self._unreadable(path, exc)
        return os.fdopen(fd, 'rb')

    def get(self, image_id):
        meta_path, _ = self._paths(image_id)
        try:
            with self._open_file(meta_path) as f:
                record = json.loads(f.read().decode('utf-8'))
        except FileNotFoundError:
            raise errors.ImageNotFound(image_id=image_id,
                                       source='local catalog %s' % self.path)
        except (OSError, ValueError) as exc:
            raise self._unreadable(meta_path, exc)
        try:
            image = ImageMeta.from_glance(record)
        except ValueError as exc:
            raise errors.SourceUnavailable(
                source='local catalog %s' % self.path,
                reason='malformed record %s: %s' % (meta_path, exc))
        if image.id != image_id:
            raise errors.SourceUnavailable(
                source='local catalog %s' % self.path,
                reason='%s describes image %r' % (meta_path, image.id))
        return image

    def list(self):
        images = []
        if not os.path.isdir(self.path):
            return images
        for name in sorted(os.listdir(self.path)):
            if name.endswith('.json'):
                try:
                    images.append(self.get(name[:-5]))
                except errors.AgentError:
                    continue
        return images

    def data_path(self, image_id):
        return self._paths(image_id)[1]

    def open(self, image, offset=0):
        data_path = self.data_path(image.id)
        if not os.path.lexists(data_path) and image.volume_location and \
                self.volume_opener:
            f = self.volume_opener(image.volume_location)
        else:
            try:
                f = self._open_file(data_path)
            except FileNotFoundError as exc:
                raise self._unreadable(data_path, exc)
        f.seek(offset)
        end = image.size if image.size is not None else float('inf')

        def chunks():
            position = offset
            while position < end:  # a volume may be larger than its image
                chunk = f.read(int(min(CHUNK_SIZE, end - position)))
                if not chunk:
                    return
                position += len(chunk)
                yield chunk
        return DataStream(chunks(), offset, f.close)

    def import_image(self, file_path, image_id, name=None, disk_format=None,
                     visibility='shared', owner=None, container_format='bare',
                     properties=None, volume_writer=None):
        """Copy ``file_path`` into the catalog; return its ``ImageMeta``.

        :param volume_writer: ``callable(file_path, size) -> volume_id``;
            when given, the bits go into that new volume instead of the
            catalog and the image gets a ``cinder://<volume_id>`` location,
            as Glance's cinder store does (raw images only).
        """
        meta_path, data_path = self._paths(image_id)
        if not os.path.isfile(file_path):
            raise errors.AgentError('%s is not a file' % file_path)
        detected = inspection.inspect_file(file_path)
        if disk_format is None:
            disk_format = inspection.glance_format(detected)
        inspection.check_image(detected, disk_format, image_id)
        if volume_writer and inspection.qemu_format(detected) != 'raw':
            raise errors.ImageUnacceptable(
                image_id=image_id, reason='only raw images can be '
                'volume-backed; this one is %s' % disk_format)
        os.makedirs(self.path, exist_ok=True)
        md5, sha512 = hashlib.md5(), hashlib.sha512()
        tmp = data_path + '.part'
        size = 0
        try:
            with open(file_path, 'rb') as src, \
                    (open(os.devnull, 'wb') if volume_writer
                     else _new_file(tmp)) as dst:
                while True:
                    chunk = src.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    md5.update(chunk)
                    sha512.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                if not volume_writer:
                    os.fsync(dst.fileno())
            locations = []
            if volume_writer:
                locations = ['cinder://%s' % volume_writer(file_path, size)]
            now = utcnow_iso()
            image = ImageMeta(
                id=image_id, name=name or os.path.basename(file_path),
                status='active', disk_format=disk_format,
                container_format=container_format, size=size,
                virtual_size=size if inspection.qemu_format(detected) == 'raw'
                else detected.virtual_size, checksum=md5.hexdigest(),
                os_hash_algo='sha512', os_hash_value=sha512.hexdigest(),
                owner=owner, visibility=visibility, created_at=now,
                updated_at=now, properties=dict(properties or {}),
                locations=locations)
            if volume_writer:
                if os.path.exists(data_path):
                    os.unlink(data_path)
            else:
                os.replace(tmp, data_path)
            meta_tmp = meta_path + '.part'
            with _new_file(meta_tmp, 'w', encoding='utf-8') as f:
                json.dump(image.to_glance(), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, meta_path)
        except BaseException:
            for path in (tmp, meta_path + '.part'):
                if os.path.exists(path):
                    os.unlink(path)
            raise
        return image


def _new_file(path, mode='wb', **kwargs):
    """A new file at ``path``, replacing (never following or waiting on)
    whatever was planted under that temporary name."""
    files.unlink_quietly(path)
    return os.fdopen(os.open(path, files.NEW_FLAGS, 0o644), mode, **kwargs)
