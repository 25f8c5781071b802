"""The agent core: the calls the CLI and the daemon are thin layers over.

``TemplateAgent`` validates ids, takes nova's lock for a base, asks the image
source, runs the configured handlers in order, records which one prepared
each base, and answers who uses what. Everything that removes a base checks
usage strictly, under the base's lock, right before removing it.
"""

import logging
import os
import time

from agent import config, errors, locks, naming
from agent.cache import manager
from agent.cache.index import BaseImage, BaseImageIndex
from agent.handlers import registry
from agent.handlers.base import HandlerContext
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


class TemplateAgent:
    def __init__(self, conf):
        self.conf = conf
        self.base_dir = config.base_dir(conf)
        self._source = None
        self._index = None
        self._handlers = {}
        # fail at start on an unknown handler name, listing the valid ones
        self.chain_names = list(conf.template_image_handler)
        for name in self.chain_names:
            registry.load(name)
        self.scanner = UsageScanner(conf)

    # -- lazily built parts -------------------------------------------------
    @property
    def source(self):
        if self._source is None:
            self._source = sources.from_config(self.conf)
        return self._source

    @property
    def index(self):
        if self._index is None:
            self._index = BaseImageIndex(self.conf.state_path)
        return self._index

    def handler(self, name):
        if name not in self._handlers:
            context = HandlerContext(conf=self.conf, source=self.source,
                                     index=self.index, base_dir=self.base_dir)
            self._handlers[name] = registry.load(name)(context)
        return self._handlers[name]

    def close(self):
        if self._index is not None:
            self._index.close()

    def _ensure_dirs(self):
        os.makedirs(self.base_dir, exist_ok=True)
        os.makedirs(config.lock_dir(self.conf), exist_ok=True)

    def base_path(self, image_id):
        naming.validate_image_id(image_id)
        return os.path.join(self.base_dir, naming.base_filename(image_id))

    def lock(self, filename):
        return locks.base_lock(self.conf, filename)

    # -- fetch ----------------------------------------------------------------
    def fetch_image(self, image_id, handler=None, project_id=None,
                    progress=None):
        """Prepare the base of ``image_id``; idempotent; return its path."""
        path = self.base_path(image_id)
        filename = os.path.basename(path)
        names = [handler] if handler else self.chain_names
        for name in names:
            registry.load(name)
        self._ensure_dirs()
        with self.lock(filename):
            if os.path.lexists(path):
                entry = self.index.get(filename) or self._adopt(filename)
                if entry.image_id is None:
                    entry.image_id = image_id
                entry.last_used = time.time()
                self.index.put(entry)
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
                    if not exc.falls_through or name == names[-1]:
                        raise
                    LOG.warning('handler %s failed on image %s, trying the '
                                'next: %s', name, image_id, exc)
                    reasons.append('%s: %s' % (name, exc))
                    continue
                os.utime(path, follow_symlinks=False)
                self.index.put(entry)
                LOG.info('prepared base %s for image %s with handler %s',
                         path, image_id, name)
                return path
            raise errors.NoHandlerSucceeded(image_id=image_id,
                                            reasons='; '.join(reasons))

    def _adopt(self, filename):
        st = os.lstat(os.path.join(self.base_dir, filename))
        entry = BaseImage(filename=filename, handler='downloading',
                          source='nova', size_bytes=st.st_size,
                          created=st.st_mtime, last_used=st.st_mtime,
                          adopted=True)
        self.index.put(entry)
        return entry

    # -- listing ------------------------------------------------------------
    def reconcile(self):
        """Make the index agree with ``_base`` (adopt nova-made files, drop
        entries whose file is gone), each name under its lock."""
        present = set(manager.base_names(self.base_dir))
        known = {e.filename for e in self.index.all()}
        adopted, dropped = [], []
        for filename in sorted(present ^ known):
            with self.lock(filename):
                exists = os.path.lexists(os.path.join(self.base_dir,
                                                      filename))
                entry = self.index.get(filename)
                if exists and entry is None:
                    self._adopt(filename)
                    adopted.append(filename)
                elif not exists and entry is not None:
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
            'target': entry.target or (os.path.realpath(path)
                                       if os.path.islink(path) else None),
            'adopted': entry.adopted,
            'resized': bool((naming.parse_base_filename(entry.filename)
                             or (None, None))[1]),
            'in_use': bool(users),
            'users': users,
        }

    def list_images(self):
        """Every base with its users; usage problems become warnings."""
        if os.path.isdir(self.base_dir):
            self.reconcile()
        entries = sorted(self.index.all(), key=lambda e: e.filename)
        paths = [os.path.join(self.base_dir, e.filename) for e in entries]
        usage = self.scanner.scan(paths, strict=False)
        return [self.describe(e, usage) for e in entries], usage.warnings

    def show_image(self, image_id):
        path = self.base_path(image_id)
        filename = os.path.basename(path)
        if not os.path.lexists(path):
            raise errors.BaseImageNotFound(image_id=image_id,
                                           path=self.base_dir)
        entry = self.index.get(filename) or self._adopt(filename)
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
        with self.lock(filename):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                self.index.delete(filename)
                return None
            if check_age is not None and not check_age(st):
                return None
            usage = self.scanner.scan([path], strict=True)
            if usage.in_use(path):
                raise errors.BaseImageInUse(path=path,
                                            users=', '.join(usage.users[path]))
            entry = self.index.get(filename) or self._adopt(filename)
            info = self.describe(entry, usage)
            self.handler(entry.handler).remove_image(entry, path)
            self.index.delete(filename)
            LOG.info('removed base %s (image %s, %d bytes on disk)', path,
                     entry.image_id, info['disk_bytes'])
            return info

    def remove_image(self, image_id):
        path = self.base_path(image_id)
        if not os.path.lexists(path):
            raise errors.BaseImageNotFound(image_id=image_id,
                                           path=self.base_dir)
        info = self.remove_base(os.path.basename(path))
        if info is None:
            raise errors.BaseImageNotFound(image_id=image_id,
                                           path=self.base_dir)
        return info

    def prune(self, dry_run=False, min_age=None):
        return manager.run_pass(self, dry_run=dry_run, min_age=min_age)

    # -- restart ------------------------------------------------------------
    def init(self):
        """After a restart: delete half-written files, reconcile the index,
        and let every handler that prepared a base re-prepare its own."""
        self._ensure_dirs()
        cleaned = []
        for name in sorted(os.listdir(self.base_dir)):
            owner = naming.temp_owner(name)
            if owner is None:
                continue
            with self.lock(owner):
                path = os.path.join(self.base_dir, name)
                if os.path.lexists(path) and not os.path.isdir(path):
                    os.unlink(path)
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
        return report
