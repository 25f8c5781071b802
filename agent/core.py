"""The agent core: the calls the CLI and the daemon are thin layers over.

``TemplateAgent`` validates ids, takes nova's lock for a base, asks the image
source, runs the configured handlers in order, records which one prepared
each base, and answers who uses what. Everything that removes a base checks
usage strictly, under the base's lock, right before removing it.
"""

import functools
import logging
import os
import stat
import time

from agent import config, errors, files, identity, locks, naming
from agent.metrics import REGISTRY
from agent.cache import manager
from agent.cache.index import BaseImage, BaseImageIndex
from agent.handlers import registry
from agent.handlers.base import HandlerContext
from agent.linking import links
from agent.hypervisor.usage import UsageScanner
from agent.images import sources

LOG = logging.getLogger(__name__)


def disk_bytes(path):
    """Bytes a base really takes on disk (sparse files take less)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_blocks * 512


def _writer_pid(name):
    """The pid in a temporary name ``tmp-<pid>-<uuid>.part``, else None."""
    parts = name.split('-', 2)
    if len(parts) == 3 and parts[0] == 'tmp' and parts[1].isdigit() and \
            parts[2].endswith('.part'):
        return int(parts[1])
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _summed(counts):
    """``{source: bytes}`` dicts added up, source by source."""
    total = {}
    for count in counts:
        for source, n in count.items():
            total[source] = total.get(source, 0) + n
    return total


def lstat_or_none(name, dir_fd):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_base_kind(st):
    """A base is a regular file or a symlink (to a file or a device);
    anything else under a base's name (a FIFO, a socket, a directory) is
    not one, and is never opened, adopted or removed."""
    return stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)


class TemplateAgent:
    def __init__(self, conf):
        self.conf = conf
        self.base_dir = config.base_dir(conf)
        self._source = None
        self._index = None
        self._context = None
        self._handlers = {}
        # fail at start on an unknown handler name, listing the valid ones
        self.chain_names = list(conf.template_image_handler)
        for name in self.chain_names:
            registry.validate(name)
        # from here on this process works as the owner of instances_path
        self.owner = identity.enter(conf)
        self.scanner = UsageScanner(conf)

    # -- lazily built parts -------------------------------------------------
    @property
    def source(self):
        if self._source is None:
            self._source = sources.from_config(
                self.conf, lambda volume_id:
                self.context.volume_backend.open_volume(volume_id))
        return self._source

    @property
    def index(self):
        if self._index is None:
            self._index = BaseImageIndex(self.conf.state_path)
        return self._index

    @property
    def context(self):
        if self._context is None:
            self._context = HandlerContext(
                conf=self.conf, source=self.source, index=self.index,
                base_dir=self.base_dir)
        return self._context

    @functools.cached_property
    def volumes(self):
        """The block storage side: volume operations, the image-volume
        cache (``agent.volumes.side``)."""
        from agent.volumes.side import VolumeSide
        return VolumeSide(self.conf, self.context, self.index)

    def handler(self, name):
        if name not in self._handlers:
            self._handlers[name] = registry.load(name)(self.context)
        return self._handlers[name]

    def close(self):
        if self._index is not None:
            self._index.close()
        if self._context is not None:
            self._context.close()

    def base_path(self, image_id):
        naming.validate_image_id(image_id)
        return os.path.join(self.base_dir, naming.base_filename(image_id))

    def lock(self, filename, progress=None):
        """nova's lock for a base; while it is busy, ``progress`` (if any)
        is called, so a cancelled job stops waiting."""
        wait = (lambda: progress(0, None)) if progress else None
        return locks.base_lock(self.conf, filename, wait=wait)

    # -- fetch ----------------------------------------------------------------
    def fetch_image(self, image_id, handler=None, project_id=None,
                    progress=None):
        """Prepare the base of ``image_id``; idempotent; return its path."""
        path = self.base_path(image_id)
        filename = os.path.basename(path)
        names = [handler] if handler else self.chain_names
        for name in names:
            registry.validate(name)
        with self.lock(filename, progress), \
                self.context.base_dir_fd() as dir_fd:
            st = lstat_or_none(filename, dir_fd)
            if st is not None and not is_base_kind(st):
                raise errors.UnsafePath(
                    path=path, reason='it is neither a file nor a symlink; '
                    'remove it')
            if st is not None and stat.S_ISLNK(st.st_mode) and \
                    not links.target_attached(filename, dir_fd):
                # a link whose device is gone or detached (e.g. after a
                # reboot, before init): undo it through its handler and
                # prepare anew
                entry = self.index.get(filename) or self._adopt(st, filename)
                self.handler(entry.handler).remove_image(entry, path)
                self.index.delete(filename)
                st = None
            if st is not None:
                entry = self.index.get(filename) or self._adopt(st, filename)
                if entry.image_id is None:
                    entry.image_id = image_id
                entry.last_used = time.time()
                self.index.put(entry)
                REGISTRY.inc('template_agent_fetches_total',
                             handler=entry.handler, result='existing')
                return path
            image = self.source.get(image_id)
            if image.status != 'active':
                raise errors.ImageNotActive(image_id=image_id,
                                            status=image.status)
            reasons = []
            for name in names:
                h = self.handler(name)
                ok, why = h.can_serve(image, project_id=project_id)
                if not ok:
                    reasons.append('%s: %s' % (name, why))
                    continue
                try:
                    entry = h.fetch_image(image, path, progress=progress,
                                          project_id=project_id)
                except errors.AgentError as exc:
                    REGISTRY.inc('template_agent_fetches_total', handler=name,
                                 result='error')
                    if not exc.falls_through or name == names[-1]:
                        raise
                    LOG.warning('handler %s failed on image %s, trying the '
                                'next: %s', name, image_id, exc)
                    reasons.append('%s: %s' % (name, exc))
                    continue
                try:
                    os.utime(filename, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    # the owner of _base moved the new base (or _base)
                    # away as it was published: nothing to index here
                    raise errors.UnsafePath(
                        path=path, reason='the base was moved away while it '
                        'was published') from None
                entry.created = entry.last_used = time.time()
                self.index.put(entry)
                REGISTRY.inc('template_agent_fetches_total', handler=name,
                             result='prepared')
                LOG.info('prepared base %s for image %s with handler %s',
                         path, image_id, name)
                return path
            raise errors.NoHandlerSucceeded(image_id=image_id,
                                            reasons='; '.join(reasons))

    def precache(self, image_ids, progress=None):
        """nova's cache_images: prepare each image, at most
        ``precache_concurrency`` at a time; per image ``cached``,
        ``existing``, ``unsupported`` or ``error``.

        :param progress: ``callable(images_done, images_total,
            sources=None)``, also called while each image streams (so it
            can cancel by raising); ``sources``: the bytes read so far
            from each source, summed over the images whose fetch tells
            (a peer-to-peer one: ``peers`` and ``glance``)
        """
        ids = list(dict.fromkeys(image_ids))
        results = {}
        sources = {}  # image id -> bytes by source, of fetches that say

        def step(image_id=None, source_bytes=None):
            if image_id is not None and source_bytes is not None:
                sources[image_id] = source_bytes
            if progress:
                progress(len(results), len(ids), sources=_summed(
                    sources.values()) if sources else None)

        def one(image_id):
            existed = os.path.lexists(self.base_path(image_id))
            try:
                self.fetch_image(image_id, progress=lambda done, total,
                                 sources=None: step(image_id, sources))
                results[image_id] = 'existing' if existed else 'cached'
            except errors.Cancelled:
                raise
            except (errors.ImageUnacceptable,
                    errors.NoHandlerSucceeded) as exc:
                LOG.info('precache of %s: unsupported: %s', image_id, exc)
                results[image_id] = 'unsupported'
            except errors.AgentError as exc:
                LOG.warning('precache of %s failed: %s', image_id, exc)
                results[image_id] = 'error'
            step()

        import concurrent.futures
        workers = self.conf.image_cache.precache_concurrency
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(one, i) for i in ids]:
                future.result()
        return results

    def _adopt(self, st, filename):
        """Record a base nova made (``st``: its lstat)."""
        entry = BaseImage(filename=filename, handler=registry.FILE_HANDLER,
                          source='nova', size_bytes=st.st_size,
                          created=st.st_mtime, last_used=st.st_mtime,
                          adopted=True)
        self.index.put(entry)
        return entry

    # -- listing ------------------------------------------------------------
    def reconcile(self, entries=None):
        """Make the index agree with ``_base`` (adopt nova-made files, drop
        entries whose file is gone), each name under its lock.

        :param entries: ``index.all()``, when the caller read it already
        """
        present = set(manager.base_names(self.base_dir))
        known = {e.filename for e in (
            self.index.all() if entries is None else entries)}
        adopted, dropped = [], []
        for filename in sorted(present ^ known):
            with self.lock(filename), self.context.base_dir_fd() as dir_fd:
                st = lstat_or_none(filename, dir_fd)
                entry = self.index.get(filename)
                if st is not None and is_base_kind(st) and entry is None:
                    self._adopt(st, filename)
                    adopted.append(filename)
                elif st is None and entry is not None:
                    # removed behind the agent's back (e.g. by nova's own
                    # cache manager): let its handler release what it held
                    try:
                        self.handler(entry.handler).remove_image(
                            entry, os.path.join(self.base_dir, filename))
                    except (errors.AgentError, OSError) as exc:
                        LOG.warning('releasing vanished base %s: %s',
                                    filename, exc)
                    self.index.delete(filename)
                    dropped.append(filename)
        return adopted, dropped

    def describe(self, entry, usage):
        path = os.path.join(self.base_dir, entry.filename)
        users = usage.users.get(path, [])
        return {
            'image_id': entry.image_id,
            'filename': entry.filename,
            'path': path,
            'handler': entry.handler,
            'source': entry.source,
            'size_bytes': entry.size_bytes,
            'disk_bytes': disk_bytes(path),
            'virtual_size': entry.virtual_size,
            'disk_format': entry.disk_format,
            'hash_algo': entry.hash_algo,
            'hash_value': entry.hash_value,
            'image_updated_at': entry.image_updated_at,
            'created': entry.created,
            'last_used': entry.last_used,
            'target': entry.target or (files.realpath_or_none(path)
                                       if os.path.islink(path) else None),
            'adopted': entry.adopted,
            'resized': bool((naming.parse_base_filename(entry.filename)
                             or (None, None))[1]),
            'in_use': bool(users),
            'users': users,
        }

    def list_images(self):
        """Every base with its users; usage problems become warnings."""
        entries = self.index.all()
        if any(self.reconcile(entries)):
            entries = self.index.all()
        entries.sort(key=lambda e: e.filename)
        paths = [os.path.join(self.base_dir, e.filename) for e in entries]
        usage = self.scanner.scan(paths, strict=False)
        return [self.describe(e, usage) for e in entries], \
            usage.warnings + self._unservable_links(entries)

    def _unservable_links(self, entries):
        """Warnings for linked bases nova cannot use as they are (its
        image backend changed since they were linked)."""
        ok, why = config.linked_bases_serve_nova(self.conf)
        if ok:
            return []
        return ['base %s (image %s) is a link, but %s; remove it once no '
                'instance uses it, and the next fetch downloads it'
                % (e.filename, e.image_id, why) for e in entries
                if e.handler == 'volume_linking']

    def show_image(self, image_id):
        path = self.base_path(image_id)
        filename = os.path.basename(path)
        with self.context.base_dir_fd() as dir_fd:
            st = lstat_or_none(filename, dir_fd)
        if st is None or not is_base_kind(st):
            raise errors.BaseImageNotFound(image_id=image_id,
                                           path=self.base_dir)
        entry = self.index.get(filename) or self._adopt(st, filename)
        usage = self.scanner.scan([path], strict=False)
        info = self.describe(entry, usage)
        info['usage_warnings'] = usage.warnings
        return info

    # -- removal ------------------------------------------------------------
    def remove_base(self, filename, check_age=None):
        """Remove one base under its lock if unused (and old enough).

        :param check_age: ``callable(lstat_result) -> bool``; when given,
            re-checked under the lock, the base is kept if it says False.
        :returns: the removed base's description, or None when kept
        :raises BaseImageInUse: something uses it
        """
        path = os.path.join(self.base_dir, filename)
        with self.lock(filename), self.context.base_dir_fd() as dir_fd:
            st = lstat_or_none(filename, dir_fd)
            if st is None:
                self.index.delete(filename)
                return None
            if not is_base_kind(st):
                raise errors.UnsafePath(
                    path=path, reason='it is neither a file nor a symlink; '
                    'not removed')
            if check_age is not None and not check_age(st):
                return None
            usage = self.scanner.scan([path], strict=True)
            if usage.in_use(path):
                raise errors.BaseImageInUse(path=path,
                                            users=', '.join(usage.users[path]))
            entry = self.index.get(filename) or self._adopt(st, filename)
            info = self.describe(entry, usage)
            self.handler(entry.handler).remove_image(entry, path)
            self.index.delete(filename)
            LOG.info('removed base %s (image %s, %d bytes on disk)', path,
                     entry.image_id, info['disk_bytes'])
            return info

    def remove_image(self, image_id):
        path = self.base_path(image_id)
        info = self.remove_base(os.path.basename(path))
        if info is None:
            raise errors.BaseImageNotFound(image_id=image_id,
                                           path=self.base_dir)
        return info

    def prune(self, dry_run=False, min_age=None):
        report = manager.run_pass(self, dry_run=dry_run, min_age=min_age)
        if not dry_run:
            REGISTRY.inc('template_agent_manager_passes_total')
            REGISTRY.inc('template_agent_manager_removed_bases_total',
                         len(report['removed']))
            REGISTRY.inc('template_agent_manager_reclaimed_bytes_total',
                         report['reclaimed_bytes'])
        if not dry_run:
            report['reclaimed'] = self.reclaim_leftovers()
            if self.volumes.enabled:
                report.update(self.volumes.maintain())
        return report

    def reclaim_leftovers(self, exports=False):
        """Delete what killed processes left half made: temporary files of
        dead writers in the agent's state and, when volumes are used, on
        the volume side (see ``VolumeSide.reclaim``)."""
        report = {'temporary_files': []}
        state = self.conf.state_path
        for name in sorted(os.listdir(state)) if os.path.isdir(state) else []:
            pid = _writer_pid(name)
            if pid and not _alive(pid):
                files.unlink_quietly(os.path.join(state, name))
                report['temporary_files'].append(name)
        if self.volumes.enabled:
            report.update(self.volumes.reclaim(exports))
        return report

    def import_image(self, file_path, image_id, volume_backed=False,
                     **fields):
        """Add a file to the local catalog (``images import``); with
        ``volume_backed``, into a new backend volume with a ``cinder://``
        location instead."""
        from agent.images.local_catalog import LocalCatalog
        if not isinstance(self.source, LocalCatalog):
            raise errors.ConfigError(
                reason='the local catalog is not in use ([image_source] '
                'driver = %s); upload images to Glance instead'
                % self.conf.image_source.driver)
        writer = self.volumes.volume_writer(image_id) if volume_backed \
            else None
        return self.source.import_image(file_path, image_id,
                                        volume_writer=writer, **fields)

    def status(self):
        linkable, why = config.linked_bases_serve_nova(self.conf)
        return dict({'handlers': self.chain_names,
                     'nova_image_backend': {
                         'backend': config.nova_image_backend(self.conf),
                         'linked_bases_serve': linkable, 'reason': why},
                     'image_source': self.conf.image_source.driver,
                     'base_dir': self.base_dir,
                     'base_images': len(manager.base_names(self.base_dir))},
                    **self.volumes.status(), **self._p2p_status())

    def _p2p_status(self):
        swarm = self.context.swarm
        if swarm is None:
            return {'p2p': {'enabled': bool(self.conf.p2p.enabled),
                            'active': False}}
        return {'p2p': dict(swarm.status(), enabled=True, active=True)}

    # -- restart ------------------------------------------------------------
    def init(self):
        """After a restart: delete half-written files, reconcile the index,
        and let every handler that prepared a base re-prepare its own."""
        cleaned = []
        with self.context.base_dir_fd() as dir_fd:
            names = sorted(os.listdir(dir_fd))
        for name in names:
            owner = naming.temp_owner(name)
            if owner is None:
                continue
            with self.lock(owner), self.context.base_dir_fd() as dir_fd:
                st = lstat_or_none(name, dir_fd)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    files.unlink_quietly(name, dir_fd=dir_fd)
                    cleaned.append(name)
        adopted, dropped = self.reconcile()
        report = {'cleaned': cleaned, 'adopted': adopted, 'dropped': dropped,
                  'handlers': {}}
        names = list(self.chain_names)
        names += sorted({e.handler for e in self.index.all()} - set(names))
        for name in names:
            try:
                report['handlers'][name] = self.handler(name).init()
            except errors.UnknownHandler as exc:
                report['handlers'][name] = {'error': str(exc)}
            REGISTRY.inc('template_agent_links_restored_total',
                         len(report['handlers'][name].get('restored', [])))
        # after the handlers re-attached what bases link to
        report['reclaimed'] = self.reclaim_leftovers(exports=True)
        return report

    def metrics_gauges(self):
        """Gauges computed at scrape time, for ``metrics.render``."""
        rows, _ = self.list_images()
        gauges = [
            ('template_agent_base_images', {'state': state},
             sum(1 for r in rows if r['in_use'] == (state == 'in_use')))
            for state in ('in_use', 'unused')]
        gauges.append(('template_agent_base_image_bytes', {},
                       sum(r['disk_bytes'] for r in rows)))
        if self.volumes.enabled:
            gauges.extend(self.volumes.gauges())
        if self.context.swarm is not None:
            gauges.extend(self.context.swarm.gauges())
        return gauges
