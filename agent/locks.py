"""External file locks shared with nova-compute.

nova takes ``lockutils.synchronized(<sha1>, external=True,
lock_path=$instances_path/locks)`` with the ``nova-`` prefix before it writes
a base image: a POSIX record lock (``lockf``) on ``locks/nova-<sha1>``. The
agent and its CLI take the very same lock, so none of them ever races on
one base.

oslo.concurrency opens the lock file by name and follows a symlink there;
``locks/`` belongs to nova, so the agent opens it its own way: the
directory checked and by descriptor, the file ``O_NOFOLLOW | O_NONBLOCK``
and checked to be a regular file. Waiting polls, so a caller can give up
(``wait`` may raise, e.g. ``Cancelled``) instead of blocking for ever on a
lock somebody else holds.
"""

import collections
import contextlib
import fcntl
import os
import stat
import threading
import time

from agent import config, errors, files

LOCK_PREFIX = 'nova-'
POLL_SECONDS = 0.1

# lockf locks belong to the process: threads also take a per-name lock
_thread_locks = collections.defaultdict(threading.Lock)
_thread_locks_guard = threading.Lock()


def _thread_lock(name):
    with _thread_locks_guard:
        return _thread_locks[name]


def _acquire(lock, try_once, wait):
    while not try_once(lock):
        if wait is not None:
            wait()
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def base_lock(conf, filename, wait=None):
    """Hold nova's external lock for base ``filename`` (a sha1 name).

    :param wait: called while the lock is busy (may raise to give up)
    """
    name = LOCK_PREFIX + filename
    thread_lock = _thread_lock(name)
    _acquire(thread_lock, lambda lk: lk.acquire(blocking=False), wait)
    try:
        with files.opened_dir(config.lock_dir(conf), os.geteuid(),
                              create=True) as dir_fd:
            fd = _lock_file(conf, name, dir_fd, wait)
        try:
            yield
        finally:
            os.close(fd)  # releases the lockf lock
    finally:
        thread_lock.release()


def _lock_file(conf, name, dir_fd, wait):
    """Open ``name`` in ``dir_fd`` and take its lock; returns the fd.

    nova's cache manager deletes ``nova-<sha1>`` after it removed a base.
    A lock taken on a file that lost its name meanwhile guards nothing
    (the next taker creates a new file): the name is checked to still be
    the locked file, and the whole is tried again otherwise.
    """
    path = os.path.join(config.lock_dir(conf), name)
    while True:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW |
                         os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise errors.UnsafePath(
                path=path, reason='the lock file cannot be opened safely '
                '(%s)' % exc.strerror)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise errors.UnsafePath(
                    path=path, reason='the lock file is not a regular file')
            _acquire(fd, _try_lockf, wait)
            try:
                now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == \
                    (st.st_dev, st.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # unlinked or replaced while we waited: again


def _try_lockf(fd):
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: some systems say busy that way
        return False
