"""Instance disks under ``instances_path`` and their backing chains.

Backing names are read from the qcow2 header itself (``backing_file_offset``
and ``backing_file_size``, the first fields of every qcow2 version), not with
``qemu-img``: no process per disk, and nothing but the header of a regular
file is ever opened. Files are opened without blocking (a FIFO planted as a
disk or as a backing file cannot hang the scan) and their type is checked on
the descriptor.
"""

import os
import stat
import struct

from agent import errors, files

QCOW2_MAGIC = b'QFI\xfb'
_HEADER = struct.Struct('>4sIQI')  # magic, version, backing offset, size
MAX_BACKING_NAME = 1023            # qemu's own limit
MAX_CHAIN_DEPTH = 64


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


def _backing_of(path):
    try:
        fd, _ = files.open_existing(path, follow=True)
    except (OSError, errors.UnsafePath):
        return None  # gone, not a regular file (a device, a FIFO), denied
    try:
        name = qcow2_backing_name(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
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


def _dir_key(path):
    """(device, inode) of the real directory ``path``, else None."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def instance_disks(instances_path, skip_dirs):
    """Regular files under ``instances_path`` (symlinks to files included),
    outside ``skip_dirs``.

    Directories are told apart by what they are (device and inode), not
    by resolving their names: the owner may swap a directory for a
    symlink while the scan runs, and resolving a name that changes under
    ``os.path.realpath`` fails (EINVAL from readlink).
    """
    skip = {_dir_key(d) for d in skip_dirs} - {None}
    for root, dirs, names in os.walk(instances_path):
        dirs[:] = [d for d in dirs
                   if _dir_key(os.path.join(root, d)) not in skip]
        for name in names:
            path = os.path.join(root, name)
            try:
                if stat.S_ISREG(os.stat(path).st_mode):
                    yield path
            except OSError:
                continue
