"""Instance disks under ``instances_path`` and their backing chains.

Backing names are read from the qcow2 header itself (``backing_file_offset``
and ``backing_file_size``, the first fields of every qcow2 version), not with
``qemu-img``: no process per disk, and nothing but the header of a regular
file is ever opened. Files are opened without blocking (a FIFO planted as a
disk or as a backing file cannot hang the scan) and their type is checked on
the descriptor.
"""

import collections
import errno
import os
import stat
import struct
import time

from agent import errors, files

QCOW2_MAGIC = b'QFI\xfb'
_HEADER = struct.Struct('>4sIQI')  # magic, version, backing offset, size
MAX_BACKING_NAME = 1023            # qemu's own limit
MAX_CHAIN_DEPTH = 64
#: nova keeps disks one level down ($instances_path/<uuid>/disk); deeper
#: trees are walked a little way, not without end
MAX_DIR_DEPTH = 8


def qcow2_backing_name(fd):
    """The backing file name recorded in the qcow2 image open on ``fd``;
    None when it is not qcow2 or has no backing file."""
    header = os.pread(fd, _HEADER.size, 0)
    if len(header) < _HEADER.size:
        return None
    magic, version, offset, size = _HEADER.unpack(header)
    if magic != QCOW2_MAGIC or version < 2 or not offset or not size or \
            size > MAX_BACKING_NAME:
        return None
    name = os.pread(fd, size, offset)
    return name.decode('utf-8', 'surrogateescape') if name else None


#: recorded backing names by what a file is and how it was last written:
#: (device, inode, mtime in ns, size) -> name or None. A disk is read again
#: only once it changed; rewriting a header (``qemu-img rebase``) changes
#: its mtime.
_RECORDED = {}
_RECORDED_MAX = 200000
_SETTLED_SECONDS = 2


def _memo_key(st):
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def recorded_backing(st, opener):
    """The backing name recorded in the regular file whose ``stat`` is
    ``st`` (as written, relative or not); ``opener()`` opens it (``(fd,
    stat)``, may raise OSError or UnsafePath) and is called only when the
    file is not known in this state yet."""
    key = _memo_key(st)
    try:
        return _RECORDED[key]
    except KeyError:
        pass
    try:
        fd, fst = opener()
    except (OSError, errors.UnsafePath):
        return None  # gone, not a regular file (a device, a FIFO), denied
    try:
        name = qcow2_backing_name(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    # what was read is what was looked at, and not written in the last
    # moments: a write in the same clock tick as the one read keeps the
    # mtime, so a file that young is read again next time
    if _memo_key(fst) == key and \
            time.time() - fst.st_mtime > _SETTLED_SECONDS:
        if len(_RECORDED) >= _RECORDED_MAX:
            _RECORDED.clear()
        _RECORDED[key] = name
    return name


def _backing_of(path, st=None):
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            return None
    if not stat.S_ISREG(st.st_mode):
        return None
    name = recorded_backing(
        st, lambda: files.open_existing(path, follow=True))
    if name and not os.path.isabs(name):
        name = os.path.join(os.path.dirname(path), name)
    return name


def backing_chain(path):
    """Paths of the backing files below ``path`` (top first), [] if none.

    A name is reported even when its file cannot be opened (a linked base
    whose device is not attached yet): it is still a reference.
    """
    chain = []
    backing = _backing_of(path)
    while backing and len(chain) < MAX_CHAIN_DEPTH and backing not in chain:
        chain.append(backing)
        backing = _backing_of(backing)
    return chain


class Disk(collections.namedtuple('Disk', 'path key backing')):
    """An instance disk: its path as found under ``instances_path``, what
    it is (``agent.files.stat_key``: a file or a block device, whatever
    links lead there) and the backing name its qcow2 header records
    (absolute; None if none)."""


def instance_disks(instances_path, skip_dirs, problems):
    """Every disk under ``instances_path``: regular files and block
    devices, also through symlinks (to a file, to a device, or an instance
    directory that is a symlink), outside ``skip_dirs``.

    The walk works by directory descriptor. A symlinked directory is
    followed only when the owner of ``instances_path`` owns its target (nova
    cannot have written anywhere else), never into ``skip_dirs`` (``_base``,
    ``locks``) and never twice (loops end). A directory of that owner that
    cannot be read may hold a disk on any base: it is added to
    ``problems``, and the caller decides (a strict scan gives up).

    :returns: an iterator of ``Disk``
    """
    skip = set()
    for d in skip_dirs:
        try:
            st = os.stat(d)
        except OSError:
            continue
        skip.add((st.st_dev, st.st_ino))
    try:
        top = os.open(instances_path, os.O_RDONLY | os.O_DIRECTORY |
                      os.O_CLOEXEC)
    except OSError as exc:
        problems.append('instances_path %s cannot be read: %s'
                        % (instances_path, exc.strerror or exc))
        return
    try:
        st = os.fstat(top)
        walk = _Walk(st.st_uid, skip, problems)
        walk.visited.add((st.st_dev, st.st_ino))
        yield from walk.directory(top, instances_path, 0)
    finally:
        os.close(top)


class _Walk:
    def __init__(self, owner_uid, skip, problems):
        self.owner_uid = owner_uid
        self.skip = skip
        self.problems = problems
        self.visited = set()

    def directory(self, dir_fd, path, depth):
        try:
            names = sorted(os.listdir(dir_fd))
        except OSError as exc:
            self.problems.append('instance directory %s cannot be read: %s'
                                 % (path, exc.strerror or exc))
            return
        for name in names:
            sub = os.path.join(path, name)
            try:
                lst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            st = lst
            if stat.S_ISLNK(lst.st_mode):
                try:
                    st = os.stat(name, dir_fd=dir_fd)
                except OSError:
                    # leads nowhere (yet): a link to a linked base whose
                    # device is not attached still names that base
                    yield Disk(sub, None, None)
                    continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._subdirectory(dir_fd, name, sub, lst, st,
                                              depth)
            elif stat.S_ISREG(st.st_mode):
                yield Disk(sub, files.stat_key(st),
                           self._backing_name(name, dir_fd, path, sub, st))
            elif stat.S_ISBLK(st.st_mode):
                yield Disk(sub, files.stat_key(st), None)

    def _subdirectory(self, dir_fd, name, path, lst, st, depth):
        link = stat.S_ISLNK(lst.st_mode)
        if depth >= MAX_DIR_DEPTH or (st.st_dev, st.st_ino) in self.skip:
            return
        if link and st.st_uid != self.owner_uid:
            return  # not where nova keeps instances
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (
            0 if link else os.O_NOFOLLOW)
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return  # gone or swapped meanwhile
            if st.st_uid == self.owner_uid:
                self.problems.append(
                    'instance directory %s cannot be read: %s'
                    % (path, exc.strerror or exc))
            # another user's directory (lost+found, ...): nova cannot have
            # written there
            return
        try:
            # what was opened decides, not what was looked at before
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in self.skip or key in self.visited or (
                    link and st.st_uid != self.owner_uid):
                return
            self.visited.add(key)
            yield from self.directory(fd, path, depth + 1)
        finally:
            os.close(fd)


    def _backing_name(self, name, dir_fd, dir_path, path, st):
        """The absolute backing name of the qcow2 disk ``name`` in
        ``dir_fd`` (``st``: its stat), relative names resolved as QEMU
        does: against the directory the disk was named in.

        A file of the owner of ``instances_path`` that cannot be read may
        be an overlay on any base: a problem, as an unreadable directory.
        (Other users' files, such as the root-owned ``console.log``, are
        not nova's disks.)"""
        def opener():
            try:
                return files.open_existing(name, dir_fd=dir_fd, follow=True)
            except PermissionError as exc:
                if st.st_uid == self.owner_uid:
                    self.problems.append(
                        'instance disk %s cannot be read: %s'
                        % (path, exc.strerror or exc))
                raise

        backing = recorded_backing(st, opener)
        if backing and not os.path.isabs(backing):
            backing = os.path.join(dir_path, backing)
        return backing
