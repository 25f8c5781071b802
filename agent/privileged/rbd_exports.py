"""Userspace exports of Ceph RBD volumes (context ``rbd_exports``:
CAP_SYS_ADMIN for the FUSE mount and the loop ioctls, CAP_DAC_READ_SEARCH
and CAP_KILL to stop the daemons it started).

Where the kernel has no ``rbd`` module, a volume Cinder attached is made a
regular file by a ``qemu-storage-daemon`` FUSE export of the RBD image,
built only from the attachment's connection info, and a loop device on
that file makes it a block device. Every export lives in one root-owned
directory (``[cinder] exports_path``): the mountpoint ``<key>.raw`` and
the daemon's ``<key>.pid``. The caller names a key and the RBD image; this
module builds the paths itself, checks every name it puts on a command
line, and stops only a daemon whose command line names that mountpoint.
"""

import contextlib
import os
import re
import signal
import stat
import subprocess
import time

from agent import privileged
from agent.privileged import loop_devices

_KEY = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                  r'[0-9a-f]{12}(\.[a-z0-9-]{1,40})?$')
_NAME = re.compile(r'^[A-Za-z0-9_.-]{1,128}$')
_HOST = re.compile(r'^[A-Za-z0-9_.:\[\]-]{1,255}$')


class ExportRefused(Exception):
    """Not an export this module may make, use or stop."""


def _exports_dir(path):
    """Create (as root, 0755) and check the exports directory."""
    if not os.path.isabs(path):
        raise ExportRefused('%s is not an absolute path' % path)
    os.makedirs(path, 0o755, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or \
            st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ExportRefused('%s must be a directory only root can write'
                            % path)
    return path


def _paths(exports_path, key):
    if not isinstance(key, str) or not _KEY.match(key):
        raise ExportRefused('%r is not an export key' % (key,))
    d = _exports_dir(exports_path)
    return os.path.join(d, key + '.raw'), os.path.join(d, key + '.pid')


def fuse_mounted(mountpoint):
    """Whether a FUSE filesystem is mounted on ``mountpoint``."""
    escaped = mountpoint.replace(' ', '\\040')
    try:
        with open('/proc/self/mountinfo') as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == escaped and \
                        ' - fuse' in line:
                    return True
    except OSError:
        pass
    return False


def _exports(pid, mountpoint):
    """Whether ``pid`` is root's qemu-storage-daemon exporting
    ``mountpoint``."""
    try:
        if os.stat('/proc/%d' % pid).st_uid != 0:
            return False
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = f.read().decode(errors='replace').split('\0')
    except OSError:
        return False
    return os.path.basename(argv[0]) == 'qemu-storage-daemon' and any(
        'mountpoint=%s,' % mountpoint in a for a in argv)


def _daemon_pid(mountpoint, pidfile):
    """The PID in ``pidfile`` if that process is a qemu-storage-daemon
    exporting ``mountpoint``; else None."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if _exports(pid, mountpoint) else None


def _daemon_pids(mountpoint):
    """Every daemon exporting ``mountpoint``, also one still opening the
    RBD image (a daemon writes its pid file only once its export is up,
    so the file cannot name it)."""
    return {int(p) for p in os.listdir('/proc')
            if p.isdigit() and _exports(int(p), mountpoint)}


@privileged.rbd_exports_context.entrypoint
def status(exports_path, key):
    """``{'daemon': pid or None, 'mounted': bool, 'path': mountpoint}``."""
    mountpoint, pidfile = _paths(exports_path, key)
    return {'daemon': _daemon_pid(mountpoint, pidfile),
            'mounted': fuse_mounted(mountpoint), 'path': mountpoint}


@privileged.rbd_exports_context.entrypoint
def start(exports_path, key, pool, image, hosts, ports, user, ceph_conf,
          writable, timeout):
    """Start a ``qemu-storage-daemon`` exporting ``pool/image`` as the
    regular file ``<exports_path>/<key>.raw``; return its path once the
    export is mounted. Read-only unless ``writable``."""
    mountpoint, pidfile = _paths(exports_path, key)
    for name in [pool, image] + ([user] if user else []):
        if not isinstance(name, str) or not _NAME.match(name):
            raise ExportRefused('%r is not an RBD name' % (name,))
    if not hosts or len(hosts) != len(ports):
        raise ExportRefused('the connection info names no monitors')
    blockdev = ['driver=rbd', 'pool=' + pool, 'image=' + image,
                'node-name=n0', 'cache.direct=on']
    for i, (host, port) in enumerate(zip(hosts, ports)):
        if not _HOST.match(str(host)) or not str(port).isdigit():
            raise ExportRefused('%r:%r is not a monitor address'
                                % (host, port))
        blockdev += ['server.%d.host=%s' % (i, host),
                     'server.%d.port=%s' % (i, port)]
    if ceph_conf:
        if ',' in ceph_conf or not os.path.isfile(ceph_conf):
            raise ExportRefused('%r is not a Ceph configuration file'
                                % (ceph_conf,))
        blockdev.append('conf=' + ceph_conf)
    if user:
        blockdev.append('user=' + user)
    if not writable:
        blockdev.append('read-only=on')
    _stop(mountpoint, pidfile, timeout)
    fd = os.open(mountpoint, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                 os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    args = ['qemu-storage-daemon', '--blockdev', ','.join(blockdev),
            '--export', 'type=fuse,id=e0,node-name=n0,mountpoint=%s,'
            'writable=%s' % (mountpoint, 'on' if writable else 'off'),
            '--pidfile', pidfile, '--daemonize']
    try:
        # --daemonize: the parent exits once the export is up
        proc = subprocess.run(args, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        _stop(mountpoint, pidfile, timeout)
        # (its RBD client waits for the monitors and OSDs)
        raise TimeoutError('qemu-storage-daemon did not export %s/%s in '
                           '%d s' % (pool, image, timeout))
    if proc.returncode or not fuse_mounted(mountpoint):
        _stop(mountpoint, pidfile, timeout)
        raise OSError('qemu-storage-daemon could not export %s/%s: %s'
                      % (pool, image, (proc.stderr or '').strip()
                         or 'exit %d' % proc.returncode))
    return mountpoint


#: a daemon whose cluster is gone can hang in its RBD client's shutdown
STOP_GRACE_SECONDS = 10


def _stop(mountpoint, pidfile, timeout):
    pids = _daemon_pids(mountpoint)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + min(timeout, STOP_GRACE_SECONDS)
    while pids:
        pids = {pid for pid in pids if _exports(pid, mountpoint)}
        if pids and time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
            break
        time.sleep(0.05)
    if fuse_mounted(mountpoint):  # the daemon died without unmounting
        subprocess.run(['umount', '-l', mountpoint], capture_output=True,
                       timeout=timeout)
    for path in (mountpoint, pidfile):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@privileged.rbd_exports_context.entrypoint
def stop(exports_path, key, timeout):
    """Stop the export's daemon (the FUSE mount goes with it) and remove
    its files. Idempotent."""
    mountpoint, pidfile = _paths(exports_path, key)
    _stop(mountpoint, pidfile, timeout)


@privileged.rbd_exports_context.entrypoint
def attach_loop(exports_path, key, read_only, size_limit=0):
    """A loop device over the export's file (read-only unless told), of
    ``size_limit`` bytes when given; return its name."""
    mountpoint, _ = _paths(exports_path, key)
    if not fuse_mounted(mountpoint):
        raise ExportRefused('%s is not an export' % mountpoint)
    args = ['-f', '--show']
    if read_only:
        args.insert(0, '-r')
    if size_limit:
        args += ['--sizelimit', str(int(size_limit))]
    return loop_devices._losetup(args + [mountpoint])


@privileged.rbd_exports_context.entrypoint
def detach_loop(exports_path, device):
    """Detach ``device`` if it is a loop device over an export."""
    if not isinstance(device, str) or not loop_devices._LOOP.match(device):
        raise ExportRefused('%r is not a loop device' % (device,))
    try:
        with open('/sys/block/%s/loop/backing_file'
                  % os.path.basename(device)) as f:
            backing = f.read().rstrip('\n')
    except FileNotFoundError:
        return  # not attached (any more)
    d = _exports_dir(exports_path)
    if os.path.dirname(backing) != d:
        raise ExportRefused('%s is not backed by an export in %s'
                            % (device, d))
    loop_devices._losetup(['-d', device])
