"""Decide which base images are in use, and by whom.

A base is in use when a libvirt domain's disk or backing chain, an instance
disk's backing chain under ``instances_path``, or an open descriptor of any
process points at it. Paths are compared by what they are, not how they are
spelled: regular files by (device, inode), block devices by their device
number, so a symlink into ``_base``, a linked base pointing at ``/dev/loopN``
and a QEMU holding that device all resolve to the same base.
"""

import collections
import dataclasses
import os

from agent import config, errors, identity
from agent.files import realpath_or_none, stat_key
from agent.hypervisor import instance_disks, libvirt_domains


def path_key(path):
    try:
        return stat_key(os.stat(path))
    except OSError:
        return None


@dataclasses.dataclass
class Usage:
    users: dict                      # base path -> sorted list of users
    warnings: list = dataclasses.field(default_factory=list)

    def in_use(self, path):
        return bool(self.users.get(path))


class UsageScanner:
    def __init__(self, conf):
        self.conf = conf

    def _references(self, warnings, strict):
        """``(user, path)`` pairs from libvirt and the instance disks."""
        refs = []
        uri = self.conf.libvirt.connection_uri
        if uri:
            try:
                for name, path in libvirt_domains.domain_disk_paths(uri):
                    refs.append(('domain:%s' % name, path))
                    for backing in instance_disks.backing_chain(path):
                        refs.append(('domain:%s' % name, backing))
            except errors.UsageUnknown as exc:
                if strict:
                    raise
                warnings.append(str(exc))
        skip = [config.base_dir(self.conf), config.lock_dir(self.conf)]
        if os.path.isdir(self.conf.instances_path):
            for disk in instance_disks.instance_disks(
                    self.conf.instances_path, skip):
                refs.append(('disk:%s' % disk, disk))  # a disk that is a base
                for backing in instance_disks.backing_chain(disk):
                    refs.append(('disk:%s' % disk, backing))
        return refs

    def scan(self, base_paths, strict=True):
        """Users of each of ``base_paths``.

        :param strict: raise UsageUnknown when a source of usage (libvirt)
            cannot be asked; with False, report it in ``warnings`` instead.
            Anything that removes bases must scan strictly.
        """
        users = collections.defaultdict(set)
        warnings = []
        # several names can be one base (hard links, two links to one
        # device): every name of what a user points at is in use
        by_key = collections.defaultdict(list)
        by_name = collections.defaultdict(list)
        for base in base_paths:
            key = path_key(base)
            if key:
                by_key[key].append(base)
            by_name[os.path.normpath(os.path.abspath(base))].append(base)
            real = realpath_or_none(base)
            if real:
                by_name[real].append(base)
        if base_paths:
            for user, path in self._references(warnings, strict):
                bases = by_key.get(path_key(path)) or by_name.get(
                    os.path.normpath(os.path.abspath(path)), ())
                for base in bases:
                    users[base].add(user)
            for pid, name, key in _open_file_holders(by_key):
                for base in by_key.get(tuple(key), ()):
                    users[base].add('process:%d(%s)' % (pid, name))
        return Usage({b: sorted(users.get(b, ())) for b in base_paths},
                     warnings)


def _open_file_holders(by_key):
    """Processes holding any of the bases open (privileged: other users'
    ``/proc/PID/fd``)."""
    if not by_key:
        return []
    if identity.dropped():
        from agent.privileged.process_files import holders
    else:  # this process may read them itself (no privsep import)
        from agent.hypervisor.open_files import holders
    return holders(sorted(by_key), exclude_pids=[os.getpid()])
