"""The image-volume cache: one template volume per image, shared by the
hypervisor (linked into ``_base``) and block storage (volumes cloned from it).

Cinder's image-volume cache and SolidFire's template cache, made stricter:

- a miss creates the template once, under a per-image lock shared by every
  process of the host, so concurrent misses make exactly one template;
- an entry whose image changed (newer ``updated_at``) or vanished is
  *retired*: no new links or clones; it is deleted once nothing holds it;
- ``max_size_gb`` and ``max_count`` (0 = unlimited) each work alone; room is
  made by evicting least-recently-used entries, never a held one (linked on a
  hypervisor, or a clone in progress);
- entries are shared across projects only for public (or community) images
  or the owner's own; encrypted images are never cached.

Entries live in a diskcache under ``state_path``. Events
``image_volume_cache.hit|miss|evict`` go to the ``agent.events`` logger as
JSON records and to counters.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import warnings

import diskcache
import psutil
from oslo_concurrency import lockutils
from oslo_utils import timeutils

from agent import errors, files
from agent.images import download
from agent.images.sources import TransientSourceError

LOG = logging.getLogger(__name__)
EVENTS = logging.getLogger('agent.events')
GiB = 1024 ** 3
#: ``[cinder] glance_locations``: a template recorded on its image, or not
LOCATION_EVENTS = ('location_added', 'location_failed', 'location_removed')
ENCRYPTION_PROPERTIES = ('cinder_encryption_key_id', 'img_encrypted',
                         'os_encrypt_key_id')
#: a raw image goes into its claimed template in ranges of this many bytes
#: while it downloads
FOLLOW_STEP = 64 * 1024 ** 2


@dataclasses.dataclass
class CacheEntry:
    image_id: str
    volume_id: str
    backend: str
    size_bytes: int
    image_updated_at: str = None
    created: float = None
    last_used: float = None
    state: str = 'fresh'
    holders: dict = dataclasses.field(default_factory=dict)
    disk_format: str = None

    def to_dict(self):
        return dataclasses.asdict(self)


def _newer(a, b):
    """Whether ISO time ``a`` is later than ``b`` (None is oldest)."""
    if not a:
        return False
    if not b:
        return True
    return timeutils.parse_isotime(a) > timeutils.parse_isotime(b)


class ImageVolumeCache:
    def __init__(self, conf, backend, host=None):
        self.conf = conf
        self.backend = backend
        self.host = host or conf.host
        self.state_dir = os.path.join(conf.state_path, 'image-volume-cache')
        os.makedirs(self.state_dir, exist_ok=True)
        self.db = diskcache.Cache(os.path.join(self.state_dir, 'entries'),
                                  eviction_policy='none', size_limit=2 ** 40)

    def close(self):
        self.db.close()

    # -- storage --------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, image_id):
        """Per-image lock shared by every process on this host."""
        name = 'ivc-' + hashlib.sha1(image_id.encode()).hexdigest()
        with lockutils.lock(name, external=True,
                            lock_path=os.path.join(self.state_dir, 'locks')):
            yield

    def _put(self, entry):
        self.db.set('entry:' + entry.volume_id, entry.to_dict())

    def _delete(self, entry):
        self.db.delete('entry:' + entry.volume_id)

    def entries(self, image_id=None):
        found = []
        for key in list(self.db.iterkeys()):
            if isinstance(key, str) and key.startswith('entry:'):
                data = self.db.get(key)
                if data and (image_id is None or data['image_id'] == image_id):
                    found.append(CacheEntry(**data))
        return sorted(found, key=lambda e: (e.image_id, e.created or 0))

    def fresh_entry(self, image_id):
        for entry in self.entries(image_id):
            if entry.state == 'fresh':
                return entry
        return None

    def counters(self):
        kinds = ('hit', 'miss', 'evict') + (
            LOCATION_EVENTS if self._locations_on() else ())
        return {k: self.db.get('count:' + k, 0) for k in kinds}

    def _event(self, kind, entry, **extra):
        self.db.incr('count:' + kind)
        EVENTS.info(json.dumps(dict(
            event='image_volume_cache.' + kind, image_id=entry.image_id,
            volume_id=entry.volume_id, host=self.host, **extra),
            sort_keys=True))

    # -- rules ----------------------------------------------------------------
    def allowed(self, image, project_id=None):
        """``(True, None)`` when ``image`` may go through the cache."""
        if not self.conf.image_volume_cache.enabled:
            return False, 'the image-volume cache is disabled'
        props = image.properties or {}
        if any(props.get(p) not in (None, False, 'False', 'false')
               for p in ENCRYPTION_PROPERTIES):
            return False, 'encrypted images are not cached'
        if project_id is not None and image.visibility not in (
                'public', 'community') and image.owner != project_id:
            return False, ('image %s is %s and owned by %s, not by project %s'
                           % (image.id, image.visibility, image.owner,
                              project_id))
        return True, None

    # -- the cache ------------------------------------------------------------
    def acquire(self, image, source, holder, project_id=None, progress=None):
        """The fresh entry of ``image``, created on a miss, with ``holder``
        added to it. Release it with ``release(entry, holder)``."""
        ok, why = self.allowed(image, project_id)
        if not ok:
            raise errors.HandlerCannotServe(handler='image-volume cache',
                                            image_id=image.id, reason=why)
        with self.lock(image.id):
            entry = self.fresh_entry(image.id)
            if entry and _newer(image.updated_at, entry.image_updated_at) \
                    and not self._still_fresh(entry, image):
                self._retire(entry, 'image updated at %s' % image.updated_at)
                entry = None
            if entry is None and self.backend.shared:
                entry = self._adopt(image)
            if entry:
                self._event('hit', entry)
            elif self.backend.shared:
                entry, kind = self._populate_shared(image, source, progress)
                self._event(kind, entry)
            else:
                entry = self._populate(image, source, progress)
                self._event('miss', entry)
            entry.holders[holder] = time.time()
            entry.last_used = time.time()
            self._put(entry)
        self.enforce_limits()
        return entry

    def release(self, entry, holder):
        """Drop ``holder``; delete the entry if it is retired and free."""
        with self.lock(entry.image_id):
            current = self._reload(entry)
            if current is None:
                return
            current.holders.pop(holder, None)
            current.last_used = time.time()
            if current.state == 'stale' and not current.holders:
                self._remove(current, 'retired and released')
            else:
                self._put(current)

    def clone_holder(self):
        """A holder id for a clone in progress in this process; a pass
        releases it if the process died (``release_dead_clone_holds``)."""
        return 'clone:%s:%d:%s' % (self.host, os.getpid(), uuid.uuid4())

    def release_dead_clone_holds(self):
        """Release clone holds of processes of this host that are gone."""
        released = []
        prefix = 'clone:%s:' % self.host
        for entry in self.entries():
            for holder in list(entry.holders):
                if not holder.startswith(prefix):
                    continue
                try:
                    pid = int(holder[len(prefix):].split(':', 1)[0])
                except ValueError:
                    continue
                if not psutil.pid_exists(pid):
                    self.release(entry, holder)
                    released.append(holder)
        return released

    def reclaim(self):
        """Delete what a killed process left: temporary files of a dead
        writer, and template volumes no entry knows whose creator is gone
        (killed between writing the template and recording it)."""
        gone = []
        tmp_dir = os.path.join(self.state_dir, 'tmp')
        for name in sorted(os.listdir(tmp_dir)) if os.path.isdir(
                tmp_dir) else []:
            parts = name.split('.')
            if len(parts) == 3 and parts[2] == 'part' and \
                    parts[1].isdigit() and not psutil.pid_exists(
                        int(parts[1])):
                files.unlink_quietly(os.path.join(tmp_dir, name))
                gone.append(name)
        known = {e.volume_id for e in self.entries()}
        for volume in self.backend.list():
            meta = volume.metadata
            if meta.get('kind') != 'template' or volume.id in known:
                continue
            if self.backend.shared and not self._orphan_here(volume):
                continue  # another host's, or in use by the fleet
            with self.lock(meta.get('image_id') or volume.id):
                if volume.id in {e.volume_id for e in self.entries()}:
                    continue
                if meta.get('status') == 'creating' and meta.get('pid') \
                        and psutil.pid_exists(meta['pid']):
                    continue  # being written by a live process
                if meta.get('cinder_status') == 'deleting':
                    continue  # on its way (a delete Cinder is finishing)
                LOG.info('deleting orphan template volume %s of image %s',
                         volume.id, meta.get('image_id'))
                try:
                    self.backend.delete(volume.id)
                except errors.VolumeAttached:
                    continue  # attached meanwhile
                except errors.BackendUnavailable as exc:
                    # the others are still reclaimed; this one next time
                    LOG.warning('orphan template volume %s of image %s is '
                                'left for the next reclaim: %s', volume.id,
                                meta.get('image_id'), exc)
                    continue
                self._unpublish(meta.get('image_id'), volume.id)
                gone.append(volume.id)
        return gone

    def _orphan_here(self, volume):
        """On a shared backend, whether a template no entry here knows is
        this host's to delete: one this host began and whose writer is
        gone, or a retired one that no host has attached."""
        meta = volume.metadata
        if meta.get('status') == 'creating':
            return meta.get('host') == self.host
        return (meta.get('status') == 'failed' or
                meta.get('state') == 'stale') and not \
            self.backend.holders(volume.id)

    def _reload(self, entry):
        data = self.db.get('entry:' + entry.volume_id)
        return CacheEntry(**data) if data else None

    def _populate(self, image, source, progress, volume_id=None):
        """Create the template volume (or take ``volume_id``, claimed
        already: then the caller deletes it on failure) and write the
        image into it once (a raw image into a claimed template while it
        downloads: ``_Follower``)."""
        created = None
        follower = None
        tmp_dir = os.path.join(self.state_dir, 'tmp')
        os.makedirs(tmp_dir, exist_ok=True)
        part = os.path.join(tmp_dir, '%s.%d.part' % (hashlib.sha1(
            image.id.encode()).hexdigest(), os.getpid()))
        try:
            def write_template(fmt, virtual_size):
                nonlocal volume_id, created
                copied = follower.finish(virtual_size) if follower and \
                    fmt == 'raw' else False
                if volume_id is None:
                    self.enforce_limits(reserve_bytes=virtual_size,
                                        reserve_count=1,
                                        locked_image=image.id)
                    volume_id = created = self.backend.create(
                        virtual_size, {'kind': 'template',
                                       'image_id': image.id})
                else:
                    self.backend.extend(volume_id, virtual_size)
                    self.backend.update_metadata(volume_id,
                                                 virtual_size=virtual_size)
                if copied:
                    LOG.info('image %s: written into template %s while it '
                             'downloaded', image.id, volume_id)
                else:
                    if follower:
                        follower.stop()
                    self.backend.write_image(
                        volume_id, part, fmt,
                        zeroed=not (follower and follower.wrote))

            files.unlink_quietly(part)
            part_fd = os.open(part, files.NEW_FLAGS, 0o600)
            try:
                watch = progress
                if volume_id is not None and image.disk_format == 'raw' \
                        and image.size:
                    follower = _Follower(self.backend, volume_id, part_fd,
                                         image.id)

                    def watch(done, total):
                        follower.advance(done)
                        if progress:
                            progress(done, total)
                # (the part file is read back, then discarded: no writeback)
                _, virtual_size, _, _ = download.download_verified(
                    source, image, part_fd, then=write_template,
                    limits=download.DownloadLimits.from_conf(self.conf),
                    progress=watch, writeback=False)
            finally:
                if follower:
                    follower.stop()
                os.close(part_fd)
            # verified: only now may another host take it
            self.backend.mark_written(volume_id)
        except BaseException:
            if created:
                self._delete_failed(created)
            raise
        finally:
            files.unlink_quietly(part)
        now = time.time()
        return CacheEntry(image_id=image.id, volume_id=volume_id,
                          backend=self.backend.name, size_bytes=virtual_size,
                          image_updated_at=image.updated_at, created=now,
                          last_used=now, disk_format=image.disk_format)

    # -- a backend shared by several hosts -----------------------------------
    def _delete_failed(self, volume_id):
        """Delete the template a failed write leaves; if the volume side
        cannot (what failed the write may fail this too), leave it to
        ``reclaim`` and keep the write's own error for the caller."""
        try:
            self.backend.delete(volume_id)
        except errors.VolumeAttached as exc:
            LOG.info('template volume %s is deleted by the last host '
                     'attached to it, or by reclaim: %s', volume_id, exc)
        except errors.AgentError as exc:
            LOG.warning('template volume %s of a failed write is left for '
                        'reclaim: %s', volume_id, exc)

    def _templates(self, image):
        """Template volumes of ``image`` any host made for this version of
        it (not retired), oldest claim first: the first is the one every
        host uses."""
        found = [v for v in self.backend.list()
                 if v.metadata.get('kind') == 'template'
                 and v.metadata.get('image_id') == image.id
                 and v.metadata.get('state', 'fresh') == 'fresh'
                 and v.metadata.get('image_updated_at') == image.updated_at
                 and v.metadata.get('status') in ('creating', 'available')
                 and v.metadata.get('cinder_status', 'available') not in (
                     'deleting', 'error', 'error_deleting')]
        # the claims' own creation times (Cinder's created_at has whole
        # seconds: concurrent claims would tie)
        return sorted(found, key=lambda v: (v.metadata.get('created') or 0,
                                            v.id))

    def _entry_of(self, image, volume):
        now = time.time()
        return CacheEntry(image_id=image.id, volume_id=volume.id,
                          backend=self.backend.name,
                          size_bytes=volume.metadata.get('virtual_size')
                          or volume.size_bytes,
                          image_updated_at=image.updated_at, created=now,
                          last_used=now, disk_format=image.disk_format)

    def _adopt(self, image):
        """An entry for the written template another host made: the
        first claim's, once written (a later one may still give way)."""
        first = next(iter(self._templates(image)), None)
        if first is not None and first.metadata.get('status') == 'available':
            return self._entry_of(image, first)
        return None

    def _populate_shared(self, image, source, progress):
        """Concurrent misses on several hosts make one template. A host
        that sees a claim of the image waits for it; one that sees none
        claims one by creating an empty template volume. The oldest claim
        (by the time its host created it; ties: the smaller id) wins; the
        others delete theirs and wait for it to be written. A winner that
        finds, once written, an older claim it could not see before uses
        that one instead. ``(entry, 'miss'|'hit')``."""
        deadline = time.monotonic() + self.backend.template_wait_timeout
        while True:
            first = next(iter(self._templates(image)), None)
            if first is None:
                claim = self._claim(image)
                try:
                    first = next(iter(self._templates(image)), None)
                    if first is None or first.id == claim:
                        entry = self._populate(image, source, progress,
                                               volume_id=claim)
                        first = next(iter(self._templates(image)), None)
                        if first is None or first.id == claim:
                            self._publish(image, entry)
                            return entry, 'miss'
                except BaseException:
                    self._give_up(claim)
                    raise
                self._give_up(claim)
            LOG.info('image %s: waiting for template %s, claimed by host '
                     '%s', image.id, first.id, first.metadata.get('host'))
            self.backend.prepare_attach()
            held = False  # this host's attachment, made while it is written
            try:
                while time.monotonic() < deadline:
                    try:
                        volume = self.backend.get(first.id)
                    except errors.VolumeNotFound:
                        break  # its writer failed: look again
                    meta = volume.metadata
                    if meta.get('status') == 'available':
                        held = False  # the link takes it over
                        return self._entry_of(image, volume), 'hit'
                    if meta.get('status') == 'failed' or \
                            meta.get('cinder_status') in (
                                'deleting', 'error', 'error_deleting'):
                        break
                    if not held and meta.get('cinder_status') not in (
                            'creating', None):
                        held = self.backend.attach_ahead(first.id)
                    time.sleep(0.5)
                else:
                    raise errors.HandlerCannotServe(
                        handler='image-volume cache', image_id=image.id,
                        reason='the template volume %s another host is '
                        'writing was not ready in %d s' % (
                            first.id, self.backend.template_wait_timeout))
            finally:
                if held:
                    self._let_go(first.id)

    def _give_up(self, volume_id):
        """Drop a claim (lost, or whose write failed): marked ``failed``
        first, so that hosts attached to it ahead let go (and the last
        one deletes it), then deleted if no host has it attached."""
        with contextlib.suppress(errors.AgentError):
            self.backend.update_metadata(volume_id, status='failed')
        self._delete_failed(volume_id)

    def _let_go(self, volume_id):
        """Drop this host's attachment of a template it waited for and
        did not get; delete the template if its writer gave it up and no
        other host has it attached."""
        try:
            self.backend.release(volume_id)
            if self.backend.get(volume_id).metadata.get('status') == \
                    'failed' and not self.backend.holders(volume_id):
                self.backend.delete(volume_id)
        except errors.AgentError as exc:  # reclaim's, then
            LOG.info('template volume %s left for reclaim: %s', volume_id,
                     exc)

    # -- Glance locations ([cinder] glance_locations) -------------------------
    def _locations_on(self):
        """Whether templates are recorded in Glance: the option on, Glance
        the image source, and Cinder the backend (it alone clones)."""
        return self.backend.name == 'cinder' and \
            self.conf.cinder.glance_locations and \
            self.conf.image_source.driver == 'glance'

    def _glance(self):
        """The Glance to record templates on, or None."""
        if not self._locations_on():
            return None
        from agent.images.glance import GlanceImageSource
        return GlanceImageSource(self.conf)

    def _publish(self, image, entry):
        """Record the template just written, and verified against the
        image's hash (``download_verified``), as a ``cinder://`` location
        of its image, so that Cinder's create-from-image clones it. Only
        a raw, bare image: Cinder clones nothing else, and only those bits
        are the image's own. Best effort: a refusal is logged and counted,
        the fetch goes on."""
        glance = self._glance()
        if glance is None or image.disk_format != 'raw' or \
                image.container_format != 'bare' or not image.expected_hash:
            return
        url = 'cinder://%s' % entry.volume_id
        try:
            if image.owner:
                self.backend.set_image_owner(entry.volume_id, image.owner)
            now = glance.add_location(image.id, url)
            self._carry_forward(image.id, image.updated_at, now.updated_at,
                                entry)
        except (errors.AgentError, TransientSourceError) as exc:
            LOG.warning('image %s: template %s not recorded in Glance (Cinder '
                        'will download the image for volumes made from it): '
                        '%s', image.id, entry.volume_id, exc)
            self._event('location_failed', entry, reason=str(exc))
            return
        self._event('location_added', entry, location=url)

    def _unpublish(self, image_id, volume_id):
        """Remove the location of a template just deleted (Glance deletes
        a removed location's volume: it is gone already)."""
        glance = self._glance()
        if glance is None or not image_id:
            return
        entry = CacheEntry(image_id=image_id, volume_id=volume_id,
                           backend=self.backend.name, size_bytes=0)
        try:
            changed = glance.remove_location(image_id,
                                             'cinder://%s' % volume_id)
            if changed is None:
                return
            self._carry_forward(image_id, changed[0], changed[1].updated_at)
        except errors.ImageNotFound:
            return
        except (errors.AgentError, TransientSourceError) as exc:
            LOG.warning('image %s: the location of deleted template %s is '
                        'left in Glance (harmless: Cinder finds no such '
                        'volume and downloads): %s', image_id, volume_id, exc)
            self._event('location_failed', entry, reason=str(exc))
            return
        self._event('location_removed', entry)

    def _carry_forward(self, image_id, before, after, entry=None):
        """Glance moves an image's ``updated_at`` when its locations
        change: move the fresh templates made for ``before`` (shared
        metadata, this host's entries and ``entry``) to ``after``, or every
        host would take the location just changed for a new version of the
        image and retire them."""
        if not after or before == after:
            return
        for volume in self.backend.list():
            meta = volume.metadata
            if meta.get('kind') == 'template' and \
                    meta.get('image_id') == image_id and \
                    meta.get('state', 'fresh') == 'fresh' and \
                    meta.get('image_updated_at') == before:
                self.backend.update_metadata(volume.id,
                                             image_updated_at=after)
        for known in self.entries(image_id) + ([entry] if entry else []):
            if known.state == 'fresh' and known.image_updated_at == before:
                known.image_updated_at = after
                if self.db.get('entry:' + known.volume_id):
                    self._put(known)

    def _still_fresh(self, entry, image):
        """Whether an entry ``image`` looks newer than is still fresh: on a
        shared backend, its template was carried forward to the image's
        ``updated_at`` by the host that changed the image's locations
        (``_carry_forward``); then the entry follows."""
        if not self.backend.shared:
            return False
        try:
            meta = self.backend.get(entry.volume_id).metadata
        except errors.VolumeNotFound:
            return False
        if meta.get('state', 'fresh') != 'fresh' or \
                _newer(image.updated_at, meta.get('image_updated_at')):
            return False
        entry.image_updated_at = image.updated_at
        self._put(entry)
        return True

    def _claim(self, image):
        size = image.virtual_size or image.size or GiB
        self.enforce_limits(reserve_bytes=size, reserve_count=1,
                            locked_image=image.id)
        # not waiting for the volume to be made: the claim counts once it
        # is listed, and the winner downloads meanwhile
        return self.backend.create(size, {
            'kind': 'template', 'image_id': image.id, 'state': 'fresh',
            'image_updated_at': image.updated_at}, wait=False)

    def holders(self, entry):
        """Who holds ``entry``: its holders on this host, and on a shared
        backend every other host that has its volume attached
        (``attachment:<host>``)."""
        held = dict(entry.holders)
        if self.backend.shared:
            for host in self.backend.holders(entry.volume_id):
                if host != self.host:
                    held['attachment:%s' % host] = None
        return held

    def _retire(self, entry, reason):
        LOG.info('retiring image-volume cache entry %s of image %s: %s',
                 entry.volume_id, entry.image_id, reason)
        entry.state = 'stale'
        if self.backend.shared:  # no host adopts it any more
            with contextlib.suppress(errors.VolumeNotFound):
                self.backend.update_metadata(entry.volume_id, state='stale')
        if entry.holders:
            self._put(entry)
        else:
            self._remove(entry, reason)

    def _remove(self, entry, reason):
        try:
            self.backend.delete(entry.volume_id)
        except errors.VolumeAttached as exc:
            if entry.state == 'fresh':
                raise
            # retired here, still attached on another host: that host
            # deletes it when it lets go (release, or its pass)
            LOG.info('retired template %s of image %s stays: %s',
                     entry.volume_id, entry.image_id, exc)
            self._delete(entry)
            return
        self._delete(entry)
        self._unpublish(entry.image_id, entry.volume_id)
        self._event('evict', entry, reason=reason)

    def evict(self, image_id):
        """Evict every entry of ``image_id``; refuse (evicting none) if any
        of them is held."""
        entries = self.entries(image_id)
        if not entries:
            raise errors.CacheEntryNotFound(image_id=image_id)
        evicted = []
        with self.lock(image_id):
            for entry in self.entries(image_id):
                held = self.holders(entry)
                if held:
                    raise errors.CacheEntryHeld(
                        image_id=image_id, holders=', '.join(sorted(held)))
            for entry in self.entries(image_id):
                self._remove(entry, 'evicted by request')
                evicted.append(entry.volume_id)
        return evicted

    def enforce_limits(self, reserve_bytes=0, reserve_count=0,
                       locked_image=None):
        """Evict LRU unheld entries until the limits hold with room for
        ``reserve_*`` more; returns the evicted entries.

        :param locked_image: the image whose lock the caller holds (its
            entries are skipped: the lock is not reentrant)
        """
        max_bytes = self.conf.image_volume_cache.max_size_gb * GiB
        max_count = self.conf.image_volume_cache.max_count
        if not max_bytes and not max_count:
            return []
        evicted = []

        def over(entries):
            size = sum(e.size_bytes for e in entries) + reserve_bytes
            count = len(entries) + reserve_count
            return (max_bytes and size > max_bytes) or \
                (max_count and count > max_count)

        entries = self.entries()
        candidates = sorted((e for e in entries if not e.holders and
                             e.image_id != locked_image),
                            key=lambda e: e.last_used or 0)
        for candidate in candidates:
            if not over(entries):
                break
            with self.lock(candidate.image_id):
                current = self._reload(candidate)
                if current is None or self.holders(current):
                    # taken meanwhile, or attached on another host: never
                    # evict a held entry
                    continue
                self._remove(current, 'over the cache limits')
            evicted.append(current)
            entries = [e for e in entries if e.volume_id != current.volume_id]
        if over(entries):
            LOG.warning('image-volume cache is over its limits but every '
                        'remaining entry is held')
        return evicted

    def refresh(self, source):
        """Retire entries whose image changed or is gone from the source
        (and release the holds of clones whose process died)."""
        self.release_dead_clone_holds()
        retired = []
        for entry in self.entries():
            if entry.state != 'fresh':
                if not entry.holders:
                    with self.lock(entry.image_id):
                        current = self._reload(entry)
                        if current and not current.holders:
                            self._remove(current, 'retired and released')
                continue
            image = None
            try:
                image = source.get(entry.image_id)
            except errors.ImageNotFound:
                reason = 'image deleted from the source'
            except errors.AgentError as exc:
                LOG.warning('cannot check image %s for staleness: %s',
                            entry.image_id, exc)
                continue
            else:
                if not _newer(image.updated_at, entry.image_updated_at):
                    continue
                reason = 'image updated at %s' % image.updated_at
            with self.lock(entry.image_id):
                current = self._reload(entry)
                if current and current.state == 'fresh' and not (
                        image and self._still_fresh(current, image)):
                    self._retire(current, reason)
                    retired.append(current.image_id)
        return retired


class _Follower:
    """Copies a raw image into its claimed template while it downloads,
    range by range behind the download, so that once the download ends
    only its last range is left to write, not the whole image.

    It copies only bytes the download has written (the download says how
    far through ``progress``), from the descriptor the download writes,
    into a template no host may use before the image's hash is verified
    (``mark_written``). A download that starts over voids what was copied;
    any failure only ends the following: the write after the download then
    writes the whole volume, zeros included."""

    def __init__(self, backend, volume_id, part_fd, image_id):
        self.backend = backend
        self.volume_id = volume_id
        self.part_fd = part_fd
        self.image_id = image_id
        self.copied = 0     # bytes in the template
        self.wrote = False  # whether any byte went there
        self.error = None
        self._cond = threading.Condition()
        self._seen = 0      # bytes the download has written
        self._end = None    # the image's size, once downloaded
        self._stopped = False
        self._void = False
        # the thread loads os-brick (for Cinder's connector), which imports
        # eventlet: a thread that imports eventlet first can never be
        # joined (seen with eventlet 0.40, Python 3.11)
        with contextlib.suppress(ImportError), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # its deprecation warning
            import eventlet  # noqa: F401
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='follow-' + image_id[:8])
        self._thread.start()

    def advance(self, offset):
        with self._cond:
            if offset < self._seen:
                self._void = True   # the source started over
            self._seen = offset
            self._cond.notify()

    def _next(self):
        """The next ``(offset, length)`` to copy; None when done."""
        with self._cond:
            while True:
                if self._stopped or self._void:
                    return None
                if self._end is not None:
                    return (self.copied, self._end - self.copied) \
                        if self.copied < self._end else None
                if self._seen - self.copied >= FOLLOW_STEP:
                    return self.copied, FOLLOW_STEP
                self._cond.wait()

    def _run(self):
        from agent.images import qemu_img
        try:
            with self.backend.writing(self.volume_id) as writer:
                while True:
                    span = self._next()
                    if span is None:
                        break
                    offset, length = span
                    # zeros at the end of what is written may be holes
                    # past the file's end: the new template reads zeros
                    # there already
                    length = min(length, os.fstat(self.part_fd).st_size -
                                 offset)
                    if length > 0:
                        self.wrote = True
                        writer.copy(qemu_img.fd_path(self.part_fd), offset,
                                    length, pass_fds=(self.part_fd,))
                    self.copied = sum(span)
        except Exception as exc:
            self.error = exc
            LOG.info('image %s: copying into template %s while it '
                     'downloads stopped: %s', self.image_id, self.volume_id,
                     exc)

    def finish(self, size):
        """Copy the rest of the ``size`` bytes; whether the template now
        holds them all."""
        with self._cond:
            self._end = size
            self._cond.notify()
        self._thread.join()
        if isinstance(self.error, errors.BackendUnavailable):
            raise self.error  # the volume side failed: so would a rewrite
        return self.error is None and not self._void and \
            self.copied == size

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
