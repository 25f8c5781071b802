"""File handling in directories an untrusted user can write.

``$instances_path`` and everything under it belong to the ``nova`` user, so
every name there is hostile input: it may be a symlink, a hard link, a FIFO
or a directory, and it may change between two system calls. The rules,
used by every module that touches those directories:

- a directory is opened once, without following a symlink, checked to be a
  real directory of the expected owner, and then used by descriptor
  (``*at`` calls), so swapping it for a symlink later changes nothing;
- nothing is opened by name twice: a file is opened once with
  ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot block the open), its type is
  checked on the descriptor, and the descriptor is what is read, hashed or
  handed to ``qemu-img``;
- new files are anonymous (``O_TMPFILE``) until they are complete and
  verified, then given their final name with ``linkat``; where the
  filesystem has no ``O_TMPFILE``, they are created ``O_EXCL | O_NOFOLLOW``
  and renamed only if the name still holds the same inode.
"""

import contextlib
import errno
import os
import stat

from agent import errors

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def stat_key(st):
    """What a path is, whatever its spelling: (device, inode) for a file,
    the device number for a block device; None for anything else."""
    if stat.S_ISBLK(st.st_mode):
        return ('blk', st.st_rdev)
    if stat.S_ISREG(st.st_mode):
        return ('file', st.st_dev, st.st_ino)
    return None


def realpath_or_none(path):
    """``os.path.realpath(path)``, or None when a name on the way changed
    while it was resolved (a symlink swapped for a directory makes
    ``readlink`` fail with EINVAL)."""
    try:
        return os.path.realpath(path)
    except OSError:
        return None


def fsync_path(path, directory=False):
    """fsync a file, or a directory (to make a rename or unlink durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path, dir_fd=None):
    """Unlink a name (never what a symlink points at); gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path, dir_fd=dir_fd)


def open_dir(path, owner_uid, create=False, mode=0o755):
    """Open the directory ``path`` by descriptor, refusing a symlink, a
    non-directory, or a directory that ``owner_uid`` does not own.

    :param create: make it (as the caller, so it is the caller's) if missing
    :raises UnsafePath: it is not a directory ``owner_uid`` owns
    """
    parent, name = os.path.split(os.path.normpath(path))
    parent_fd = os.open(parent or '/', os.O_RDONLY | os.O_DIRECTORY |
                        os.O_CLOEXEC)
    try:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=parent_fd)
            return open_dir(path, owner_uid)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise errors.UnsafePath(path=path, reason='it is a symlink or '
                                    'not a directory')
    finally:
        os.close(parent_fd)
    st = os.fstat(fd)
    if st.st_uid != owner_uid:
        os.close(fd)
        raise errors.UnsafePath(
            path=path, reason='it belongs to uid %d, but the agent works as '
            'uid %d, the owner of instances_path' % (st.st_uid, owner_uid))
    return fd


@contextlib.contextmanager
def opened_dir(path, owner_uid, create=False):
    fd = open_dir(path, owner_uid, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_existing(name, dir_fd=None, follow=False, kinds=(stat.S_ISREG,)):
    """Open a name nova controls for reading, without blocking on a FIFO
    and (unless ``follow``) without following a symlink.

    :returns: ``(fd, stat_result)``
    :raises UnsafePath: it is not of one of ``kinds``
    :raises OSError: it cannot be opened (missing, a symlink, denied)
    """
    flags = READ_FLAGS | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(name, flags, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not any(kind(st.st_mode) for kind in kinds):
        os.close(fd)
        raise errors.UnsafePath(path=name, reason='it is not a regular file')
    return fd, st


@contextlib.contextmanager
def _in_a_live_directory(dir_fd):
    """Refuse, as an UnsafePath, what fails because the directory
    ``dir_fd`` was removed while in use (whoever owns its parent can
    move its entries elsewhere and remove it): ext4 refuses a new file in
    it with EPERM, a name in it with ENOENT."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOENT) or \
                os.fstat(dir_fd).st_nlink:
            raise
        raise errors.UnsafePath(
            path=os.readlink('/proc/self/fd/%d' % dir_fd),
            reason='the directory was removed while in use') from exc


def new_anonymous(dir_fd, mode=0o644):
    """A new file in the directory ``dir_fd`` with no name yet, or None
    where the filesystem cannot make one (then use ``new_named``)."""
    try:
        with _in_a_live_directory(dir_fd):
            return os.open('.', os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC,
                           mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def new_named(name, dir_fd, mode=0o644):
    """Create ``name`` afresh: a leftover of that name (e.g. a symlink
    planted by someone else) is removed, never followed or reused."""
    unlink_quietly(name, dir_fd=dir_fd)
    with _in_a_live_directory(dir_fd):
        return os.open(name, NEW_FLAGS, mode, dir_fd=dir_fd)


def publish(fd, name, dir_fd, temp_name=None):
    """Give the complete file ``fd`` the final ``name`` in ``dir_fd`` and
    make that durable. Call it under the name's lock.

    An anonymous file is linked in under ``name`` (whatever held that name
    is unlinked first); a named one (``temp_name``) is renamed over
    ``name`` only while ``temp_name`` still holds the inode of ``fd``.
    """
    with _in_a_live_directory(dir_fd):
        if temp_name is None:
            unlink_quietly(name, dir_fd=dir_fd)
            os.link('/proc/self/fd/%d' % fd, name, dst_dir_fd=dir_fd,
                    follow_symlinks=True)
        else:
            mine = os.fstat(fd)
            there = os.stat(temp_name, dir_fd=dir_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                raise errors.UnsafePath(path=temp_name,
                                        reason='it was replaced while in use')
            os.rename(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
