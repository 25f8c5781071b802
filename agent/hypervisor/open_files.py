"""Processes holding files or devices open, from ``/proc/PID/fd``.

psutil's ``open_files()`` lists regular files only; a QEMU reading a linked
base holds a block device, so the descriptors are stat'ed directly. Reading
other users' ``/proc/PID/fd`` takes a privilege: once the agent dropped
root, this runs in ``agent.privileged.process_files``'s daemon.
"""

import os

import psutil

from agent.files import stat_key


def holders(keys, exclude_pids=()):
    """``[(pid, process_name, key), ...]`` for every open descriptor of any
    process whose target is one of ``keys`` (``agent.files.stat_key``)."""
    wanted = {tuple(k) for k in keys}
    exclude = set(exclude_pids)
    found = []
    for pid in psutil.pids():
        if pid in exclude:
            continue
        fd_dir = '/proc/%d/fd' % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        name = None
        for fd in fds:
            try:
                key = stat_key(os.stat(os.path.join(fd_dir, fd)))
            except OSError:
                continue
            if key not in wanted:
                continue
            if name is None:
                try:
                    name = psutil.Process(pid).name()
                except psutil.Error:
                    name = '?'
            found.append((pid, name, key))
    return found
