"""The ``local`` volume backend, the embedded default.

Volumes are sparse raw files ``volume-<id>`` in ``[local_volumes] path``
with their metadata beside them in ``volume-<id>.json``. A volume is exported
as a loop device (read-only for templates) that os-brick's LOCAL connector
opens. Clones use FICLONE (reflink) where the filesystem supports it (XFS
with reflink, btrfs), detected once; elsewhere a sparse copy that copies only
the data extents (SEEK_DATA/SEEK_HOLE).
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
import time
import uuid

import psutil
from oslo_concurrency import lockutils

from agent import errors, files
from agent.volumes.base import ImageWriter, Volume, VolumeBackend

FICLONE = 0x40049409
STALE_SECONDS = 300  # a metadata write takes milliseconds
_UUID = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                   r'[0-9a-f]{12}$')


def _privileged(call, *args):
    """Run a loop-device operation of ``agent.privileged.loop_devices``."""
    from agent.privileged import loop_devices
    try:
        return call(loop_devices)(*args)
    except (OSError, loop_devices.LoopDeviceRefused) as exc:
        raise errors.BackendUnavailable(backend='local', reason=str(exc))


def _sysfs(*parts):
    with open(os.path.join('/sys/block', *parts)) as f:
        return f.read().rstrip('\n')


def attached_loop_devices():
    """``[(device, backing file)]`` of every attached loop device, read
    from sysfs (no privilege needed)."""
    found = []
    for entry in sorted(os.listdir('/sys/block')):
        if entry.startswith('loop'):
            try:
                found.append(('/dev/' + entry,
                              _sysfs(entry, 'loop', 'backing_file')))
            except OSError:
                continue  # not attached, or detached while we looked
    return found


def loop_devices_of(path):
    """``[(device, read_only, autoclear)]`` of the loop devices backed by
    ``path``."""
    real = os.path.realpath(path)
    found = []
    for device, backing in attached_loop_devices():
        if backing != real:
            continue
        name = os.path.basename(device)
        try:
            found.append((device, _sysfs(name, 'ro') == '1',
                          _sysfs(name, 'loop', 'autoclear') == '1'))
        except OSError:
            continue
    return found


def reflink(src_path, dst_path):
    """Clone ``src_path`` to the new file ``dst_path`` with FICLONE."""
    with open(src_path, 'rb') as src, open(dst_path, 'wb') as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())


def sparse_copy(src_path, dst_path):
    """Copy only the data extents; holes stay holes."""
    with open(src_path, 'rb') as src, open(dst_path, 'wb') as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                copied = os.copy_file_range(src.fileno(), dst.fileno(),
                                            hole - pos, pos, pos)
                if copied == 0:
                    break
                pos += copied
            offset = hole
        dst.truncate(size)
        os.fsync(dst.fileno())


class LocalVolumeBackend(VolumeBackend):
    name = 'local'

    def __init__(self, conf):
        super().__init__(conf)
        self.path = conf.local_volumes.path
        self._reflink = None

    # -- files ----------------------------------------------------------------
    def _file(self, volume_id):
        if not isinstance(volume_id, str) or not _UUID.match(volume_id):
            raise errors.VolumeNotFound(volume_id=volume_id, backend='local')
        return os.path.join(self.path, 'volume-' + volume_id)

    def _meta_file(self, volume_id):
        return self._file(volume_id) + '.json'

    @contextlib.contextmanager
    def _lock(self, volume_id):
        with lockutils.lock('volume-' + volume_id, external=True,
                            lock_path=os.path.join(self.path, 'locks')):
            yield

    def _write_meta(self, volume_id, meta):
        # the writer's pid in the name: reclaim drops a dead writer's at once
        tmp = '%s.%d.tmp' % (self._meta_file(volume_id), os.getpid())
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._meta_file(volume_id))

    def _read_meta(self, volume_id):
        path = self._meta_file(volume_id)
        try:
            fd, _ = files.open_existing(path)  # never blocks on a FIFO
        except FileNotFoundError:
            raise errors.VolumeNotFound(volume_id=volume_id, backend='local')
        except OSError as exc:
            raise errors.UnsafePath(path=path, reason='it cannot be opened '
                                    'safely (%s)' % exc.strerror)
        with os.fdopen(fd, encoding='utf-8') as f:
            return json.load(f)

    # -- interface ------------------------------------------------------------
    def capabilities(self):
        os.makedirs(self.path, exist_ok=True)
        if self._reflink is None:
            self._reflink = self._probe_reflink()
        return {'backend': self.name, 'available': True, 'reason': None,
                'path': self.path, 'reflink': self._reflink,
                'clone': 'reflink' if self._reflink else 'sparse-copy',
                'export': 'loop device'}

    def _probe_reflink(self):
        with tempfile.TemporaryDirectory(dir=self.path,
                                         prefix='.probe-') as d:
            src, dst = os.path.join(d, 'a'), os.path.join(d, 'b')
            with open(src, 'wb') as f:
                f.write(b'\1' * 4096)
            try:
                reflink(src, dst)
                return True
            except OSError:
                return False

    def create(self, size_bytes, metadata, wait=True):
        os.makedirs(self.path, exist_ok=True)
        volume_id = str(uuid.uuid4())
        # the metadata first: a data file without it is always a leftover
        self._write_meta(volume_id, dict(metadata, created=time.time(),
                                         status='creating', pid=os.getpid()))
        with open(self._file(volume_id), 'xb') as f:
            f.truncate(size_bytes)
        return volume_id

    def get(self, volume_id):
        meta = self._read_meta(volume_id)
        path = self._file(volume_id)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise errors.VolumeNotFound(volume_id=volume_id, backend='local')
        if not stat.S_ISREG(st.st_mode):
            raise errors.UnsafePath(path=path, reason='it is not a regular '
                                    'file')
        return Volume(id=volume_id, size_bytes=st.st_size, metadata=meta)

    def list(self):
        if not os.path.isdir(self.path):
            return []
        volumes = []
        for name in sorted(os.listdir(self.path)):
            if name.startswith('volume-') and name.endswith('.json'):
                try:
                    volumes.append(self.get(name[7:-5]))
                except errors.VolumeNotFound:
                    continue
        return volumes

    def update_metadata(self, volume_id, **changes):
        with self._lock(volume_id):
            meta = self._read_meta(volume_id)
            meta.update(changes)
            self._write_meta(volume_id, meta)

    def delete(self, volume_id):
        with self._lock(volume_id):
            path = self._file(volume_id)
            self._detach_all(path)
            for p in (path, self._meta_file(volume_id)):
                files.unlink_quietly(p)

    def clone(self, volume_id, size_bytes, metadata):
        src = self._file(volume_id)
        source = self.get(volume_id)
        new_id = str(uuid.uuid4())
        dst = self._file(new_id)
        meta = dict(metadata, created=time.time(), source_volume=volume_id)
        try:
            self._write_meta(new_id, dict(meta, status='creating',
                                          pid=os.getpid()))
            if self.capabilities()['reflink']:
                reflink(src, dst)
            else:
                sparse_copy(src, dst)
            if size_bytes > source.size_bytes:
                os.truncate(dst, size_bytes)
            self._write_meta(new_id, dict(meta, status='available'))
        except BaseException:
            for p in (dst, self._meta_file(new_id)):
                files.unlink_quietly(p)
            raise
        return new_id

    def extend(self, volume_id, size_bytes):
        path = self._file(volume_id)
        if size_bytes > os.path.getsize(path):
            os.truncate(path, size_bytes)
            for device in self._devices(path):
                _privileged(lambda m: m.refresh_capacity, device)

    @contextlib.contextmanager
    def writing(self, volume_id):
        yield ImageWriter(self._file(volume_id), volume_id)
        with open(self._file(volume_id), 'rb+') as f:
            os.fsync(f.fileno())

    def reclaim(self, in_use_volume_ids=None):
        gone = {'volumes': [], 'exports': []}
        if not os.path.isdir(self.path):
            return gone
        names = set(os.listdir(self.path))
        for name in sorted(names):
            if not name.startswith('volume-'):
                continue
            if name.endswith('.json'):
                volume_id = name[7:-5]
                try:
                    meta = self._read_meta(volume_id)
                except (errors.VolumeNotFound, ValueError):
                    continue
                dead = meta.get('status') == 'creating' and not (
                    meta.get('pid') and psutil.pid_exists(meta['pid']))
                if dead or 'volume-' + volume_id not in names:
                    self.delete(volume_id)
                    gone['volumes'].append(volume_id)
            elif name.endswith('.tmp') and '.json.' in name:
                path = os.path.join(self.path, name)
                pid = name.rsplit('.', 2)[-2]
                with contextlib.suppress(OSError):
                    if not (pid.isdigit() and psutil.pid_exists(int(pid))) \
                            or time.time() - os.lstat(path).st_mtime > \
                            STALE_SECONDS:
                        os.unlink(path)
            elif _UUID.match(name[7:]) and name + '.json' not in names:
                self.delete(name[7:])  # data whose metadata never came
                gone['volumes'].append(name[7:])
        if in_use_volume_ids is not None:
            keep = {os.path.realpath(self._file(v))
                    for v in in_use_volume_ids}
            prefix = os.path.realpath(self.path) + '/volume-'
            for device, backing in attached_loop_devices():
                if backing.startswith(prefix) and backing not in keep:
                    _privileged(lambda m: m.detach, device)
                    gone['exports'].append(device)
        return gone

    def open_volume(self, volume_id):
        """The volume's file, opened for reading as ``agent.files`` opens
        what nova controls (the volumes are in the owner's state): a
        symlink is not followed and a FIFO cannot block.

        :raises VolumeNotFound: it is missing
        :raises UnsafePath: it is not a regular file or cannot be opened
        """
        path = self._file(volume_id)
        try:
            fd, _ = files.open_existing(path)
        except FileNotFoundError:
            raise errors.VolumeNotFound(volume_id=volume_id, backend='local')
        except OSError as exc:
            raise errors.UnsafePath(path=path, reason='it cannot be opened '
                                    'safely (%s)' % exc.strerror)
        return os.fdopen(fd, 'rb')

    def connection_properties(self, volume_id, read_only=True):
        path = self._file(volume_id)
        with self._lock(volume_id):
            if not os.path.exists(path):
                raise errors.VolumeNotFound(volume_id=volume_id,
                                            backend='local')
            devices = self._devices(path, read_only=read_only)
            if not devices and not read_only:
                raise errors.BackendUnavailable(
                    backend='local', reason='volumes are exported read-only')
            device = devices[0] if devices else _privileged(
                lambda m: m.attach_read_only, path)
        return {'driver_volume_type': 'local',
                'data': {'device_path': device, 'volume_id': volume_id,
                         'access_mode': 'ro' if read_only else 'rw'}}

    def release(self, volume_id):
        with self._lock(volume_id):
            self._detach_all(self._file(volume_id))

    # -- loop devices ---------------------------------------------------------
    def _devices(self, path, read_only=None):
        """Loop devices backed by ``path`` (optionally of one access mode).

        A device with autoclear set is being detached (``losetup -d`` while
        something, e.g. udev probing it, still had it open): it goes away
        on its own and must not be handed out again.
        """
        return [device for device, ro, autoclear in loop_devices_of(path)
                if not autoclear and (read_only is None or ro == read_only)]

    def _detach_all(self, path):
        for device in self._devices(path):
            _privileged(lambda m: m.detach, device)
