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
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW |
                             os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                             dir_fd=dir_fd)
            except OSError as exc:
                raise errors.UnsafePath(
                    path=os.path.join(config.lock_dir(conf), name),
                    reason='the lock file cannot be opened safely (%s)'
                    % exc.strerror)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise errors.UnsafePath(
                    path=os.path.join(config.lock_dir(conf), name),
                    reason='the lock file is not a regular file')
            _acquire(fd, _try_lockf, wait)
            yield
        finally:
            os.close(fd)  # releases the lockf lock
    finally:
        thread_lock.release()


def _try_lockf(fd):
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: some systems say busy that way
        return False
