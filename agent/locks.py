"""External file locks shared with nova-compute.

nova takes ``lockutils.synchronized(<sha1>, external=True,
lock_path=$instances_path/locks)`` with the ``nova-`` prefix before it writes
a base image; the agent and its CLI take the very same lock file, so none of
them ever races on one base.
"""

import contextlib

from oslo_concurrency import lockutils

from agent import config

LOCK_PREFIX = 'nova-'


@contextlib.contextmanager
def base_lock(conf, filename):
    """Hold nova's external lock for base ``filename`` (a sha1 name)."""
    with lockutils.lock(filename, lock_file_prefix=LOCK_PREFIX,
                        external=True, lock_path=config.lock_dir(conf)):
        yield
