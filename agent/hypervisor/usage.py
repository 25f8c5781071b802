"""Decide which base images are in use, and by whom.

A base is in use when a libvirt domain's disk or backing chain, an instance
disk's backing chain under ``instances_path``, or an open descriptor of any
process points at it. Paths are compared by what they are, not how they are
spelled: regular files by (device, inode), block devices by their device
number, so a symlink into ``_base``, a linked base pointing at ``/dev/loopN``
and a QEMU holding that device all resolve to the same base.
"""

import collections
import os
import stat

from agent import config, errors, identity
from agent.files import realpath_or_none, stat_key


def path_key(path):
    try:
        return stat_key(os.stat(path))
    except OSError:
        return None


class _Paths:
    """What one scan learnt about paths: each is stat'ed, and each chain
    read, once, however many domains and disks name it (a domain's disk is
    usually also an instance disk, and a thousand overlays share a few
    bases)."""

    def __init__(self):
        self._stats = {}
        self._chains = {}

    def stat(self, path):
        try:
            return self._stats[path]
        except KeyError:
            try:
                st = os.stat(path)
            except OSError:
                st = None
            self._stats[path] = st
            return st

    def key(self, path):
        st = self.stat(path)
        return stat_key(st) if st is not None else None

    def backing(self, path):
        from agent.hypervisor import instance_disks
        st = self.stat(path)
        if st is None:
            return None
        return instance_disks._backing_of(path, st)

    def chain(self, path, first=None):
        """The backing chain below ``path`` (top first); ``first``: its
        backing name when the caller read it already."""
        from agent.hypervisor import instance_disks
        if path in self._chains:
            return self._chains[path]
        chain = []
        backing = first if first is not None else self.backing(path)
        while backing and len(chain) < instance_disks.MAX_CHAIN_DEPTH \
                and backing not in chain:
            chain.append(backing)
            backing = self.backing(backing)
        self._chains[path] = chain
        return chain


class Usage:
    """What a scan found: ``users``, base path -> sorted list of users;
    ``warnings``, the sources of usage that could not be read."""

    __slots__ = ('users', 'warnings')

    def __init__(self, users, warnings=None):
        self.users = users
        self.warnings = [] if warnings is None else warnings

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.users, self.warnings) == (other.users, other.warnings)

    __hash__ = None

    def __repr__(self):
        return 'Usage(users=%r, warnings=%r)' % (self.users, self.warnings)

    def in_use(self, path):
        return bool(self.users.get(path))


class UsageScanner:
    def __init__(self, conf):
        self.conf = conf

    def _references(self, problems):
        """``(user, path, key)`` from libvirt and the instance disks;
        ``key`` is what ``path`` is (``stat_key``), None when it names
        nothing (yet). What cannot be read goes to ``problems``."""
        from agent.hypervisor import instance_disks, libvirt_domains
        refs = []
        paths = _Paths()

        def chain(user, path, first=None):
            for backing in paths.chain(path, first):
                refs.append((user, backing, paths.key(backing)))

        uri = self.conf.libvirt.connection_uri
        if uri:
            try:
                for name, path in libvirt_domains.domain_disk_paths(
                        uri, problems):
                    refs.append(('domain:%s' % name, path, paths.key(path)))
                    chain('domain:%s' % name, path)
            except errors.UsageUnknown as exc:
                problems.append(exc.kwargs.get('reason') or str(exc))
        skip = [config.base_dir(self.conf), config.lock_dir(self.conf)]
        if os.path.isdir(self.conf.instances_path):
            for disk in instance_disks.instance_disks(
                    self.conf.instances_path, skip, problems):
                user = 'disk:%s' % disk.path
                # a disk that is a base (a link, a hard link, its device)
                refs.append((user, disk.path, disk.key))
                if disk.backing:
                    chain(user, disk.path, disk.backing)
        return refs

    def scan(self, base_paths, strict=True):
        """Users of each of ``base_paths``.

        :param strict: raise UsageUnknown when a source of usage (libvirt,
            a storage pool, an instance directory) cannot be read; with
            False, report it in ``warnings`` instead. Anything that removes
            bases must scan strictly.
        """
        users = collections.defaultdict(set)
        problems = []
        # several names can be one base (hard links, two links to one
        # device): every name of what a user points at is in use
        by_key = collections.defaultdict(list)
        by_name = collections.defaultdict(list)
        real_dirs = {}
        for base in base_paths:
            try:
                lst = os.lstat(base)
            except OSError:
                lst = None
            link = lst is not None and stat.S_ISLNK(lst.st_mode)
            key = path_key(base) if link else (
                stat_key(lst) if lst is not None else None)
            if key:
                by_key[key].append(base)
            name = os.path.normpath(os.path.abspath(base))
            by_name[name].append(base)
            if link or lst is None:
                real = realpath_or_none(base)
                if real:
                    by_name[real].append(base)
            else:
                # a file in _base: only its directory can be spelt
                # otherwise, and all bases share one
                parent, leaf = os.path.split(name)
                if parent not in real_dirs:
                    real_dirs[parent] = realpath_or_none(parent)
                real = real_dirs[parent] and os.path.join(real_dirs[parent],
                                                          leaf)
                if real and real != name:
                    by_name[real].append(base)
        if base_paths:
            refs = self._references(problems)
            if problems and strict:
                raise errors.UsageUnknown(reason='; '.join(problems))
            for user, path, key in refs:
                # by what it is; by name only when it names nothing now (a
                # link to a device not attached yet)
                bases = by_key.get(key) if key else (
                    by_name.get(os.path.normpath(os.path.abspath(path))) or
                    by_name.get(realpath_or_none(path) or path))
                for base in bases or ():
                    users[base].add(user)
            for pid, name, key in _open_file_holders(by_key):
                for base in by_key.get(tuple(key), ()):
                    users[base].add('process:%d(%s)' % (pid, name))
        return Usage({b: sorted(users.get(b, ())) for b in base_paths},
                     problems)


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
