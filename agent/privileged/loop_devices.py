"""Loop devices over files the agent's own user owns (context
``loop_devices``: CAP_SYS_ADMIN for the loop ioctls, CAP_DAC_READ_SEARCH to
read the backing file).

A caller names a file; the daemon opens it itself without following a
symlink, checks that it is a regular file with a single name owned by
``TRUSTED_UID``, and hands ``losetup`` that open descriptor, so what is
attached is exactly what was checked. Exporting a file its owner can read
anyway gives that owner nothing. Detach and resize accept only devices
whose backing file passes the same check.
"""

import os
import re
import stat
import subprocess

from agent import privileged

_LOOP = re.compile(r'^/dev/loop[0-9]+$')
LOSETUP_TIMEOUT = 60


class LoopDeviceRefused(Exception):
    """The file or device is not one the agent may attach or detach."""


def _losetup(args, pass_fds=()):
    try:
        proc = subprocess.run(['losetup'] + args, capture_output=True,
                              text=True, timeout=LOSETUP_TIMEOUT,
                              pass_fds=pass_fds)
    except subprocess.TimeoutExpired:
        raise OSError('losetup %s did not finish in %d s'
                      % (' '.join(args), LOSETUP_TIMEOUT))
    if proc.returncode:
        raise OSError('losetup %s failed: %s' % (' '.join(args),
                                                 proc.stderr.strip()))
    return proc.stdout.strip()


def _check(st, what):
    if not stat.S_ISREG(st.st_mode):
        raise LoopDeviceRefused('%s is not a regular file' % what)
    if st.st_uid != privileged.TRUSTED_UID:
        raise LoopDeviceRefused('%s belongs to uid %d, not to the agent\'s '
                                'uid %d' % (what, st.st_uid,
                                            privileged.TRUSTED_UID))
    if st.st_nlink != 1:
        raise LoopDeviceRefused('%s has %d names' % (what, st.st_nlink))


@privileged.loop_context.entrypoint
def attach_read_only(path):
    """Attach ``path`` as a new read-only loop device; return its name."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK |
                 os.O_CLOEXEC)
    try:
        _check(os.fstat(fd), path)
        return _losetup(['-r', '-f', '--show', '/proc/self/fd/%d' % fd],
                        pass_fds=(fd,))
    finally:
        os.close(fd)


def _checked_device(device):
    if not isinstance(device, str) or not _LOOP.match(device):
        raise LoopDeviceRefused('%r is not a loop device' % (device,))
    name = os.path.basename(device)
    try:
        with open('/sys/block/%s/loop/backing_file' % name) as f:
            backing = f.read().rstrip('\n')
    except FileNotFoundError:
        return None  # not attached (any more)
    inode = _losetup(['-n', '-O', 'BACK-INO', device])
    try:
        st = os.lstat(backing)
    except OSError:
        raise LoopDeviceRefused('the backing file of %s (%s) cannot be '
                                'checked' % (device, backing))
    if str(st.st_ino) != inode.strip():
        raise LoopDeviceRefused('the backing file of %s was replaced'
                                % device)
    _check(st, 'the backing file of %s (%s)' % (device, backing))
    return device


@privileged.loop_context.entrypoint
def detach(device):
    """Detach ``device`` if its backing file is the agent's own."""
    if _checked_device(device):
        _losetup(['-d', device])


@privileged.loop_context.entrypoint
def refresh_capacity(device):
    """Make ``device`` see its backing file's new size."""
    if _checked_device(device):
        _losetup(['-c', device])
