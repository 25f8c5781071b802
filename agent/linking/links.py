"""Atomic symlinks in ``_base``: a reader sees the old link or the new
one, never none. Every call works by name inside a directory descriptor
(``agent.files``)."""

import os
import stat

from agent import files, naming


def link_atomically(target, name, dir_fd):
    tmp = naming.temp_filenames(name)[0]
    files.unlink_quietly(tmp, dir_fd=dir_fd)
    os.symlink(target, tmp, dir_fd=dir_fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def link_target(name, dir_fd):
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def target_attached(name, dir_fd):
    """Whether ``name`` resolves to something usable: a regular file, or a
    block device that has a medium.

    A detached loop device keeps its ``/dev/loopN`` node (it exists, with
    size 0) after ``losetup -d`` and after a reboot, so ``os.path.exists``
    cannot tell a live link from a stale one. Opened without blocking, so
    a link to a FIFO cannot hang the caller.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return False
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISBLK(mode):
            return os.lseek(fd, 0, os.SEEK_END) > 0
        return stat.S_ISREG(mode)
    except OSError:
        return False
    finally:
        os.close(fd)
