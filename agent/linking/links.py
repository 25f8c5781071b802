"""Links in ``_base`` to attached volumes, safe across a reboot.

A linked base is two symlinks::

    _base/<sha1>  ->  <device_links_path>/<volume-id>  ->  /dev/loopN

``device_links_path`` (``/run/template-agent/devices``) is on a tmpfs that
is empty after a reboot. After one, ``/dev/loopN`` may already be bound to
another file before the agent's ``init`` runs; the base then dangles (QEMU
and nova get "no such file") instead of resolving to the wrong disk, until
``init`` attaches the volume again and recreates the device link. Both
links are replaced atomically (a reader sees the old link or the new one,
never none), by name inside directory descriptors (``agent.files``).
"""

import contextlib
import os
import stat

from agent import files, naming


def link_atomically(target, name, dir_fd):
    tmp = naming.temp_filenames(name)[0]
    files.unlink_quietly(tmp, dir_fd=dir_fd)
    os.symlink(target, tmp, dir_fd=dir_fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def link_device(device, volume_id, name, dir_fd, devices_dir):
    """Point base ``name`` (in ``dir_fd``) at ``device`` through the
    device link of ``volume_id`` in ``devices_dir``."""
    with contextlib.suppress(OSError):  # else opened_dir says what fails
        os.makedirs(devices_dir, 0o755, exist_ok=True)
    with files.opened_dir(devices_dir, os.geteuid()) as run_fd:
        link_atomically(device, volume_id, run_fd)
    device_link = os.path.join(devices_dir, volume_id)
    if link_target(name, dir_fd) != device_link:
        link_atomically(device_link, name, dir_fd)


def device_link_target(volume_id, devices_dir):
    """The device the device link of ``volume_id`` names, or None."""
    return link_target(os.path.join(devices_dir, volume_id), None)


def unlink_device(volume_id, devices_dir):
    try:
        with files.opened_dir(devices_dir, os.geteuid()) as run_fd:
            files.unlink_quietly(volume_id, dir_fd=run_fd)
    except FileNotFoundError:
        pass


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
