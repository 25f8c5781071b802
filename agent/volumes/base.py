"""The volume backend interface.

A backend stores volumes (template volumes of the image-volume cache and
volumes cloned from them) and exports them as block devices that os-brick
can open. One short module per backend, as os-brick's connectors.

Worked example with the ``local`` backend::

    backend = LocalVolumeBackend(conf)
    backend.capabilities()
    # -> {'backend': 'local', 'clone': 'reflink', 'reflink': True, ...}
    vid = backend.create(1073741824, {'kind': 'template', 'image_id': 'X'})
    backend.write_image(vid, '/tmp/X.part', 'qcow2')   # converted to raw
    backend.connection_properties(vid, read_only=True)
    # -> {'driver_volume_type': 'local', 'data': {'device_path':
    #     '/dev/loop3', 'volume_id': vid, 'access_mode': 'ro'}}
    clone = backend.clone(vid, 2147483648, {'kind': 'volume'})
    backend.release(vid)          # drop the export (loop device)
    backend.delete(clone)
"""

import abc
import dataclasses
import os


@dataclasses.dataclass
class Volume:
    id: str
    size_bytes: int
    metadata: dict

    def to_dict(self):
        return dataclasses.asdict(self)


class ImageWriter:
    """Writes an image into a volume being made (``VolumeBackend.writing``):
    whole, converted to raw, or a raw image range by range while it
    downloads. ``target``: what QEMU writes (a file, a block device or a
    protocol filename such as ``rbd:``)."""

    def __init__(self, target, volume_id):
        self.target = target
        self.volume_id = volume_id

    def write(self, path, fmt, zeroed=True):
        """The image file ``path`` (qemu-img format ``fmt``, inspected),
        as raw; with ``zeroed``, the volume reads as zeros so far (new)."""
        from agent.images import qemu_img
        qemu_img.convert_to_raw(path, fmt, self.target,
                                image_id=self.volume_id,
                                existing_target=True, zeroed=zeroed,
                                virtual_size=os.path.getsize(path))

    def copy(self, path, offset, length, pass_fds=()):
        """Bytes ``offset`` to ``offset + length`` of the raw image file
        ``path`` to the same place in the new volume."""
        from agent.images import qemu_img
        qemu_img.copy_range(path, self.target, offset, length,
                            image_id=self.volume_id, pass_fds=pass_fds)


class VolumeBackend(abc.ABC):
    #: short name, as in ``[volume_linking] backend``
    name = None
    #: whether other hosts' agents see the same volumes (then templates are
    #: found, elected and held across hosts: ``holders``)
    shared = False

    def __init__(self, conf):
        self.conf = conf

    @abc.abstractmethod
    def capabilities(self):
        """``{'backend': name, 'available': bool, 'reason': str or None,
        'clone': 'reflink'|'copy'|..., ...}``: what this host can do."""

    @abc.abstractmethod
    def create(self, size_bytes, metadata, wait=True):
        """Create an empty volume; return its id. Its metadata says
        ``status: creating`` (with this process's ``pid``) until
        ``write_image`` completes, so ``reclaim`` can tell a volume whose
        creator died from one still being written. With ``wait`` False, a
        backend whose volumes are made asynchronously may return as soon
        as the volume (and its metadata) exists; ``write_image``,
        ``extend`` and ``delete`` wait for it to be made."""

    @abc.abstractmethod
    def get(self, volume_id):
        """The ``Volume``; VolumeNotFound if there is none."""

    @abc.abstractmethod
    def list(self):
        """All ``Volume`` objects."""

    @abc.abstractmethod
    def update_metadata(self, volume_id, **changes):
        """Merge ``changes`` into the volume's metadata."""

    def holders(self, volume_id):
        """The hosts that have ``volume_id`` attached, for a ``shared``
        backend (this one included); none for a local one."""
        return []

    @abc.abstractmethod
    def delete(self, volume_id):
        """Release its exports and delete it."""

    @abc.abstractmethod
    def clone(self, volume_id, size_bytes, metadata):
        """A new volume with the content of ``volume_id`` (copy-on-write
        where the backend can), at least ``size_bytes`` large."""

    @abc.abstractmethod
    def extend(self, volume_id, size_bytes):
        """Grow a volume to ``size_bytes``."""

    @abc.abstractmethod
    def writing(self, volume_id):
        """A context manager giving an ``ImageWriter`` into the new volume
        ``volume_id`` (made ready to write, then durable and released on
        exit). The volume stays ``creating``: its image's hash may still be
        being verified."""

    def write_image(self, volume_id, path, fmt, zeroed=True):
        """Write the image file ``path`` (qemu-img format ``fmt``, already
        inspected) into the volume as raw (``download_verified`` runs it
        while the hash finishes: see ``writing``)."""
        with self.writing(volume_id) as writer:
            writer.write(path, fmt, zeroed=zeroed)

    def mark_written(self, volume_id):
        """The volume's bits are written and verified: ``available`` to
        every host (call only after the hash check passed)."""
        self.update_metadata(volume_id, status='available', pid=None)

    @abc.abstractmethod
    def open_volume(self, volume_id):
        """A binary file object reading the volume's raw bits (as Glance's
        cinder store serves a volume-backed image)."""

    @abc.abstractmethod
    def connection_properties(self, volume_id, read_only=True):
        """os-brick connection info ``{'driver_volume_type', 'data'}``;
        exports the volume (e.g. sets up a loop device) when needed."""

    def prepare_attach(self):
        """Load and work out ahead of time what attaching will need, while
        the caller waits anyway (for another host's template); nothing by
        default. Errors are left for the attach itself to raise."""
        return None

    def attach_ahead(self, volume_id):
        """On a shared backend whose attachments take turns, make this
        host's read-only attachment of ``volume_id`` while another host
        still writes it, without exposing its bits (no device, no
        export); linking it later takes that attachment, and ``release``
        drops it. True if made; False (the default) if not."""
        return False

    @abc.abstractmethod
    def release(self, volume_id):
        """Drop the exports of ``volume_id`` (idempotent)."""

    @abc.abstractmethod
    def reclaim(self, in_use_volume_ids=None):
        """Delete what a killed process left half made: volumes still
        ``creating`` whose creator is gone, data without metadata. With
        ``in_use_volume_ids``, also drop the exports of every other volume
        (only when nothing can be attaching concurrently, i.e. ``init``).

        :returns: ``{'volumes': [...], 'exports': [...]}`` what went"""
