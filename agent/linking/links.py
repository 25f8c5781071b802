"""Atomic symlinks in ``_base``: a reader sees the old link or the new
one, never none."""

import os
import stat

from agent import files, naming


def link_atomically(target, link_path):
    tmp = naming.temp_filenames(link_path)[0]
    files.unlink_quietly(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link_path)
    files.fsync_path(os.path.dirname(link_path), directory=True)


def link_target(link_path):
    try:
        return os.readlink(link_path)
    except OSError:
        return None


def target_attached(link_path):
    """Whether ``link_path`` resolves to something usable: a file, or a
    block device that has a medium.

    A detached loop device keeps its ``/dev/loopN`` node (it exists, with
    size 0) after ``losetup -d`` and after a reboot, so ``os.path.exists``
    cannot tell a live link from a stale one.
    """
    try:
        fd = os.open(link_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISBLK(mode):
            return not stat.S_ISDIR(mode)
        return os.lseek(fd, 0, os.SEEK_END) > 0
    except OSError:
        return False
    finally:
        os.close(fd)
