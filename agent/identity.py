"""Who the agent works as: the owner of ``instances_path``, never root.

On a hypervisor ``$instances_path`` belongs to the unprivileged ``nova``
user, and so does everything the agent does there. Started as root (by
systemd, or an operator's ``sudo template-agent --direct ...``), the agent:

1. checks that nobody but root and that owner can swap ``instances_path``
   or any directory above it (otherwise the "owner" could be chosen by
   whoever can write there);
2. makes its own ``state_path`` belong to that owner;
3. forks the privsep daemons of the contexts it will need
   (``agent.privileged``), each keeping only its capabilities;
4. drops, for good, to the owner's uid, primary gid and supplementary
   groups, with no capabilities and not dumpable (so the owner cannot
   ptrace it either).

From then on the kernel itself refuses any write, read or delete that the
owner could not do. Started by any other user, nothing is dropped, and the
agent works only if that user owns ``instances_path``.
"""

import logging
import os
import pwd
import stat

from agent import errors

LOG = logging.getLogger(__name__)
PR_SET_DUMPABLE = 4


class Owner:
    """The user the agent works as (a plain class: see ``BaseImage``)."""

    def __init__(self, uid, gid, groups, name):
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.name = name

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.uid, self.gid, self.groups, self.name) == \
            (other.uid, other.gid, other.groups, other.name)

    __hash__ = None

    def __repr__(self):
        return 'Owner(uid=%r, gid=%r, groups=%r, name=%r)' % (
            self.uid, self.gid, self.groups, self.name)


def _untrusted_writer(st, owner_uid):
    """Why a directory with ``st`` could be swapped by someone other than
    root and ``owner_uid``, or None."""
    if st.st_uid not in (0, owner_uid):
        return 'it belongs to uid %d' % st.st_uid
    sticky = st.st_mode & stat.S_ISVTX
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
        return 'it is writable by its group or by everyone'
    return None


def _chain(path):
    """Every directory whose entries decide what ``path`` resolves to:
    the ancestors of its real path and of every symlink on the way."""
    dirs = set()
    current = '/'
    for part in os.path.normpath(os.path.abspath(path)).split('/')[1:]:
        candidate = os.path.join(current, part)
        dirs.add(current)
        if os.path.islink(candidate):
            candidate = os.path.realpath(candidate)
            real_parent = os.path.dirname(candidate)
            while real_parent not in dirs and real_parent != '/':
                dirs.add(real_parent)
                real_parent = os.path.dirname(real_parent)
        current = candidate
    return sorted(dirs), current


def instances_owner(conf):
    """The owner of ``instances_path``, after checking that only root and
    that owner can change what the path names.

    :raises ConfigError: it is missing, or someone else could swap it
    """
    path = conf.instances_path
    try:
        dirs, real = _chain(path)
        st = os.stat(real)
    except OSError as exc:
        raise errors.ConfigError(reason='instances_path %s: %s' % (
            path, exc.strerror or exc))
    if not stat.S_ISDIR(st.st_mode):
        raise errors.ConfigError(reason='instances_path %s is not a '
                                 'directory' % path)
    for directory in dirs:
        why = _untrusted_writer(os.stat(directory), st.st_uid)
        if why:
            raise errors.ConfigError(
                reason='instances_path %s is not safe: %s can be changed by '
                'others (%s); only root and its owner (uid %d) may write the '
                'directories above it' % (path, directory, why, st.st_uid))
    try:
        entry = pwd.getpwuid(st.st_uid)
        name, gid = entry.pw_name, entry.pw_gid
        groups = os.getgrouplist(name, gid)
    except KeyError:
        name, gid, groups = str(st.st_uid), st.st_gid, [st.st_gid]
    return Owner(uid=st.st_uid, gid=gid, groups=sorted(set(groups)),
                 name=name)


def _give_state_to(path, owner):
    """Make ``state_path`` (root's until now, or new) the owner's; it
    must not be under a directory others can write."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chmod(path, 0o700)
    dirs, real = _chain(path)
    for directory in dirs:
        why = _untrusted_writer(os.stat(directory), owner.uid)
        if why:
            raise errors.ConfigError(
                reason='state_path %s is not safe: %s can be changed by '
                'others (%s)' % (path, directory, why))
    if os.lstat(real).st_uid == owner.uid:
        return
    # written by root alone so far (an earlier version ran as root): hand
    # it over, never following a link
    for root, dirs_, files_ in os.walk(real):
        for name in dirs_ + files_:
            os.chown(os.path.join(root, name), owner.uid, owner.gid,
                     follow_symlinks=False)
    os.chown(real, owner.uid, owner.gid, follow_symlinks=False)


def _give_device_links_to(path, owner):
    """Create the volume-linking device link directory (under root's
    ``/run``) for the owner. Failing here is not fatal: linking says why
    when it needs the directory."""
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid != owner.uid and \
                os.geteuid() == 0:
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
    except OSError as exc:
        LOG.warning('cannot prepare %s: %s', path, exc)


def _contexts(conf):
    from agent import privileged
    contexts = list(privileged.CONTEXTS)
    if conf.volume_linking.backend == 'cinder':
        contexts.append(privileged.rbd_exports_context)
    if 'volume_linking' in conf.template_image_handler:
        contexts.append(brick_context())
    return contexts


def brick_context():
    """os-brick's own privsep context, in process unless ``enter`` forked
    its daemon."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # oslo.privsep imports eventlet
        from os_brick import privileged as brick
    if not dropped():
        brick.default.set_client_mode(False)
    return brick.default


def _preload(conf):
    """Import now, as root, what this process may import later: once it
    works as the owner, it may not be able to read its own code (a
    checkout in root's home, a venv under ``/root``)."""
    import importlib
    import pkgutil
    import agent
    from agent import deferred
    for module in pkgutil.walk_packages(agent.__path__, 'agent.'):
        importlib.import_module(module.name)
    deferred.load_all()  # what oslo.config left to load on first use
    from agent.handlers import registry
    for name in conf.template_image_handler:
        registry.load(name)  # a third party's too
    if conf.libvirt.connection_uri:
        try:
            import libvirt  # noqa: F401
        except ImportError:
            pass  # reported when usage is asked
    if 'volume_linking' in conf.template_image_handler:
        brick_context()
        importlib.import_module('os_brick.initiator.connectors.local')


def _drop_to(owner):
    os.setgroups(owner.groups)
    os.setresgid(owner.gid, owner.gid, owner.gid)
    os.setresuid(owner.uid, owner.uid, owner.uid)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_DUMPABLE) failed')
    os.umask(0o022)


_entered = None
_dropped = False


def dropped():
    """Whether this process dropped from root (privsep daemons run)."""
    return _dropped


def enter(conf):
    """Become the owner of ``instances_path`` (once per process).

    :returns: the ``Owner`` the process now works as
    :raises ConfigError: ``instances_path`` or ``state_path`` is unsafe, or
        the process cannot become the owner
    """
    global _entered, _dropped
    if _entered is not None:
        if _entered.uid != instances_owner(conf).uid:
            raise errors.ConfigError(
                reason='instances_path %s now belongs to another user; '
                'restart the agent' % conf.instances_path)
        return _entered
    owner = instances_owner(conf)
    if 'volume_linking' in conf.template_image_handler:
        _give_device_links_to(conf.volume_linking.device_links_path, owner)
    if os.geteuid() == 0 and owner.uid != 0:
        from oslo_privsep import priv_context
        from agent import privileged
        _give_state_to(conf.state_path, owner)
        _preload(conf)
        privileged.TRUSTED_UID = owner.uid
        _dropped = True
        for context in _contexts(conf):
            context.set_client_mode(True)
            context.start(priv_context.Method.FORK)
        _drop_to(owner)
        LOG.info('working as %s (uid %d, gid %d); privileged operations go '
                 'through privsep daemons', owner.name, owner.uid, owner.gid)
    elif os.geteuid() != owner.uid:
        raise errors.ConfigError(
            reason='instances_path %s belongs to uid %d; run the agent as '
            'root (it then works as that user) or as that user'
            % (conf.instances_path, owner.uid))
    _entered = owner
    return owner
