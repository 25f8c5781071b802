"""Atomic symlinks in ``_base``: a reader sees the old link or the new
one, never none."""

import os

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
