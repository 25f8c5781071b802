"""Files and block devices held open by processes, from ``/proc/PID/fd``.

psutil's ``open_files()`` lists regular files only; a QEMU reading a linked
base holds a block device, so the descriptors are stat'ed directly.
"""

import os

import psutil


def open_file_keys(exclude_pids=()):
    """Yield ``(pid, process_name, file_key)`` for every open descriptor."""
    from agent.hypervisor.usage import stat_key
    for pid in psutil.pids():
        if pid in exclude_pids:
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
            if key is None:
                continue
            if name is None:
                try:
                    name = psutil.Process(pid).name()
                except psutil.Error:
                    name = '?'
            yield pid, name, key
