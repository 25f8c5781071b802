"""The swarm: one libtorrent session per service, and the image sources
that read from it.

For each image the agents of ``[p2p] peers`` agree on a seed
(``rendezvous.order``; the first that answers). The **seed** downloads the
image from Glance as it would alone, through the one download sequence;
its stream is teed into segment files under ``$state_path/p2p``, and each
segment, once complete, becomes a private BitTorrent v2 torrent, seeded at
once and appended to the image's manifest. The **others** follow the
seed's manifest over mTLS (``listener``), add each segment's torrent to
their session, connect to every peer, and hand the download sequence the
segments in order, as libtorrent completes them (each piece checked
against the torrent's SHA-256 Merkle tree; peers that send bad pieces are
banned). What they have, they serve to each other.

Nothing the swarm gives is trusted: the download sequence hashes every
byte against the image's hash from Glance and publishes nothing that
does not match; the handler then downloads from Glance alone. Every wait
is bounded: a seed that cannot be reached, a manifest that does not fit,
a swarm without progress for ``[p2p] stall_timeout`` seconds, and the
stream goes on from Glance where it stopped (a Range request).

After the fetch, an agent keeps serving the image for ``[p2p] seed_time``
seconds from its segment files (never from the base, which nova may use),
then deletes them.
"""

import collections
import contextlib
import logging
import os
import queue
import shutil
import socket
import threading
import time

from agent import errors, naming
from agent.images.sources import DataStream, TransientSourceError
from agent.metrics import REGISTRY
from agent.p2p import listener, manifest as manifests, rendezvous

LOG = logging.getLogger(__name__)
#: seconds between two looks at the session (alerts, progress, expiry)
TICK = 0.25
#: seconds a follower long-polls the seed's manifest
POLL_WAIT = 5.0
#: bytes read from a segment file at once
READ_CHUNK = 1024 * 1024


def _piece_size(segment_size):
    """Pieces of 1 MiB up to 64 MiB segments, 4 MiB beyond (v2 torrents
    need a power of two of at least 16 KiB)."""
    return 4 << 20 if segment_size > 64 << 20 else min(1 << 20, max(
        16 << 10, 1 << (segment_size.bit_length() - 1)))


class SwarmFailed(Exception):
    """This image cannot come from the swarm; reason in the message."""


class _Shared:
    """One image this agent shares: as ``seed`` (a ``manifest`` it grows)
    or as ``peer`` (segments it follows from ``seed_peer``)."""

    def __init__(self, image, role, directory, segment_size, seed_peer=None):
        self.image_id = image.id
        self.size = image.size
        self.role = role
        self.dir = directory
        self.seed_peer = seed_peer
        self.segment_size = segment_size  # a peer learns it from the seed
        self.manifest = manifests.Manifest(image.id, image.size,
                                           segment_size) \
            if role == 'seed' else None
        self.segments = {}        # index -> Segment
        self.ready = set()        # indexes complete and on disk
        self.handles = {}         # index -> torrent_handle
        self.complete = False     # every segment known
        self.failed = None        # why the swarm copy was given up
        self.active = True        # a fetch reads it
        self.done_at = None
        self.started = time.monotonic()
        self.progress_at = time.monotonic()
        self.received = {}        # index -> payload bytes counted
        self.sent = {}
        self.from_glance = 0
        self.read_from_peers = 0  # what the fetch read from segments
        self.changed = threading.Condition()
        # the seed's tee: bytes written from 0 on, segments queued
        self.high = 0
        self.queued = 0
        self.fds = {}

    def fail(self, reason):
        with self.changed:
            if self.failed is None:
                self.failed = reason
            self.changed.notify_all()
        if self.manifest is not None:
            self.manifest.fail()

    def state(self):
        if self.failed:
            return 'failed'
        if self.active:
            return 'fetching'
        return 'seeding'


class Swarm:
    """The agent's libtorrent session and mTLS manifest listener.

    Built by the service while it is still root (the key may be root's),
    started after the agent dropped to the owner of ``instances_path``.
    ``on_demand(image_id)``, set by the service, starts a fetch of an image
    that a peer asks this agent for, and says whether it did (False: the
    base is here already, or the service stops).
    """

    def __init__(self, conf):
        try:
            import libtorrent
        except ImportError:
            raise errors.ConfigError(
                reason='[p2p] enabled needs libtorrent: install the p2p '
                'extra (pip install template-image-agent[p2p])')
        self.lt = libtorrent
        self.conf = conf
        p2p = conf.p2p
        self.segment_size = p2p.segment_size_mb * 1024 * 1024
        self.stall_timeout = p2p.stall_timeout
        self.seed_time = p2p.seed_time
        self.max_images = p2p.max_images
        self.me = self._find_self(conf)
        self.peers = list(dict.fromkeys(p2p.peers))
        # BitTorrent on port + 1 of every peer, by address
        self.torrent_peers = []
        allowed = set()
        for peer in self.peers:
            host, port = listener.split_address(peer, '[p2p] peers')
            try:
                address = socket.getaddrinfo(host, port + 1,
                                             type=socket.SOCK_STREAM)[0][4]
            except OSError as exc:
                raise errors.ConfigError(reason='[p2p] peers: %s: %s'
                                         % (peer, exc))
            allowed.add(address[0])
            if peer != self.me:
                self.torrent_peers.append((address[0], port + 1))
        host, port = listener.split_address(p2p.listen, '[p2p] listen')
        self.client_tls = listener.tls_context(conf, server=False)
        self.server = listener.ManifestServer(conf, self._manifest_of,
                                              self._demanded)
        self.work_dir = os.path.join(conf.state_path, 'p2p')
        lt = libtorrent
        category = lt.alert.category_t
        self.session = lt.session({
            'listen_interfaces': '%s:%d' % (
                '[%s]' % host if ':' in host else host, port + 1),
            'outgoing_interfaces': host,
            'enable_dht': False, 'enable_lsd': False, 'enable_upnp': False,
            'enable_natpmp': False, 'enable_incoming_utp': False,
            'enable_outgoing_utp': False,
            'upload_rate_limit': p2p.upload_rate_limit,
            'active_downloads': -1, 'active_seeds': -1, 'active_limit': -1,
            'peer_connect_timeout': 3, 'min_reconnect_time': 1,
            'user_agent': 'template-image-agent',
            'alert_mask': (category.error_notification |
                           category.peer_notification |
                           category.ip_block_notification |
                           category.status_notification |
                           category.storage_notification),
        })
        ip_filter = lt.ip_filter()
        ip_filter.add_rule('0.0.0.0', '255.255.255.255', 1)
        ip_filter.add_rule('::', 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff',
                           1)
        for address in allowed:
            ip_filter.add_rule(address, address, 0)
        self.session.set_ip_filter(ip_filter)
        self.on_demand = None
        self.images = {}
        self.banned = collections.OrderedDict()  # address -> when
        self.hash_failures = 0
        self._demands = {}
        self._torrent_of = {}  # v2 info hash -> (shared, index)
        self._lock = threading.Lock()
        self._torrents = queue.Queue()
        self._stop = threading.Event()
        self._threads = []

    @staticmethod
    def _find_self(conf):
        p2p = conf.p2p
        for peer in p2p.peers:
            host, _ = listener.split_address(peer, '[p2p] peers')
            if peer == p2p.listen or host == conf.host:
                return peer
        raise errors.ConfigError(
            reason='[p2p] peers lists neither [p2p] listen (%s) nor '
            '[DEFAULT] host (%s): list every agent of the peer set, this '
            'one included' % (p2p.listen, conf.host))

    # -- life cycle -------------------------------------------------------
    def start(self):
        shutil.rmtree(self.work_dir, ignore_errors=True)  # a last run's
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        self.server.start()
        for target, name in ((self._watch, 'p2p-watch'),
                             (self._make_torrents, 'p2p-torrents')):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        LOG.info('p2p: sharing with %d peers as %s', len(self.peers) - 1,
                 self.me)

    def stop(self):
        self._stop.set()
        self._torrents.put(None)
        self.server.stop()
        for thread in self._threads:
            thread.join(10)
        with self._lock:
            for shared in list(self.images.values()):
                shared.fail('the service stops')
                self._drop(shared)

    # -- the handler's side -------------------------------------------------
    def wants(self, image):
        """Whether ``image`` may come from the swarm: a known size, and
        peers besides this agent."""
        return bool(image.size) and self.peers != [self.me]

    @contextlib.contextmanager
    def share(self, image, glance):
        """Share ``image`` while the caller downloads it: yields the image
        source to download from (the swarm, or ``glance``, the agent's own
        image source, when the swarm is full). On an error the image
        leaves the swarm at once; otherwise it is served for ``[p2p]
        seed_time`` seconds more."""
        try:
            shared = self._join(image)
        except OSError as exc:  # the copy's directory: Glance alone
            LOG.warning('p2p: image %s cannot be shared (%s); it comes '
                        'from Glance alone', image.id, exc)
            shared = None
        source = _SwarmSource(self, shared, glance)
        try:
            yield source
        except BaseException as exc:
            if shared is not None:
                shared.fail('the fetch failed: %s' % exc)
            raise
        finally:
            if shared is not None:
                with self._lock:
                    shared.active = False
                    shared.done_at = time.monotonic()

    def _join(self, image):
        with self._lock:
            old = self.images.get(image.id)
            if old is not None:
                old.fail('fetched again')
                self._drop(old)
            busy = [s for s in self.images.values() if s.active]
            if len(busy) >= self.max_images:
                LOG.info('p2p: %d images shared already ([p2p] '
                         'max_images); image %s comes from Glance alone',
                         len(busy), image.id)
                return None
            idle = sorted((s for s in self.images.values() if not s.active),
                          key=lambda s: s.done_at)
            while idle and len(self.images) >= self.max_images:
                self._drop(idle.pop(0))
        role, seed_peer = self._elect(image.id)
        directory = os.path.join(self.work_dir,
                                 naming.base_filename(image.id))
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o700)
        shared = _Shared(image, role, directory, manifests.segment_size_for(
            image.size, self.segment_size), seed_peer)
        with self._lock:
            self.images[image.id] = shared
        LOG.info('p2p: image %s: %s', image.id, 'seeding it' if
                 role == 'seed' else 'following seed %s' % seed_peer)
        if role == 'peer':
            thread = threading.Thread(target=self._follow, args=(shared,),
                                      name='p2p-follow', daemon=True)
            thread.start()
        return shared

    def _elect(self, image_id):
        """``('seed', None)`` or ``('peer', seed)``: the first peer in
        rendezvous order that answers (an answer that it does not share
        the image yet counts: it will, or the wait times out)."""
        for peer in rendezvous.order(image_id, self.peers):
            if peer == self.me:
                return 'seed', None
            try:
                listener.fetch_manifest(self.client_tls, peer, image_id, 0,
                                        0)
                return 'peer', peer
            except listener.NotShared:
                return 'peer', peer
            except listener.WillNotShare:
                LOG.info('p2p: image %s: %s does not share it, trying the '
                         'next', image_id, peer)
            except listener.PeerUnavailable as exc:
                LOG.warning('p2p: image %s: seed candidate unavailable, '
                            'trying the next: %s', image_id, exc)
        return 'seed', None  # not reached: self is in the order

    def _manifest_of(self, image_id):
        shared = self.images.get(image_id)
        if shared is None or shared.manifest is None:
            return None
        return shared.manifest

    def _demanded(self, image_id):
        """A peer asks for an image this agent does not share: fetch it
        (then share it) unless the base is here already or
        ``[p2p] max_images`` images are shared; True when it will be
        shared. One fetch a minute per image at most."""
        shared = self.images.get(image_id)
        if shared is not None:  # joined since the manifest was looked up
            return shared.manifest is not None  # False: follows a seed
        if self.on_demand is None:
            return False
        now = time.monotonic()
        with self._lock:
            when, will = self._demands.get(image_id, (-60, False))
            if now - when < 60:
                return will
            if sum(1 for s in self.images.values() if s.active) >= \
                    self.max_images:
                return False
            self._demands = {i: d for i, d in self._demands.items()
                             if now - d[0] < 60}
            # meanwhile, other peers asking are told to wait (404)
            self._demands[image_id] = (now, True)
        try:
            will = bool(self.on_demand(image_id))
        except Exception as exc:  # a bad id, a full job table: not shared
            LOG.warning('p2p: cannot start a fetch of %s for a peer: %s',
                        image_id, exc)
            will = False
        with self._lock:
            self._demands[image_id] = (now, will)
        return will

    # -- the seed's side: tee, torrents, manifest -------------------------
    def tee(self, shared, offset, data):
        """Write ``data`` (received from Glance at ``offset``) into the
        segment files; queue each segment that is now complete. A failure
        here (``state_path`` full) ends the sharing, never the seed's own
        download."""
        if shared.failed or not len(data):
            return
        try:
            self._tee(shared, offset, data)
        except OSError as exc:
            LOG.warning('p2p: image %s: cannot keep a copy for the peers '
                        '(%s); they will download it from Glance',
                        shared.image_id, exc)
            REGISTRY.inc('template_agent_p2p_fallbacks_total',
                         reason='seed_copy_failed')
            shared.fail('the seed cannot keep a copy: %s' % exc)

    def _tee(self, shared, offset, data):
        length = len(data)
        position = offset
        view = memoryview(data)
        while position < offset + length:
            index = position // shared.segment_size
            end = min((index + 1) * shared.segment_size, offset + length)
            fd = shared.fds.get(index)
            if fd is None:
                fd = shared.fds[index] = os.open(
                    os.path.join(shared.dir, manifests.segment_name(index)),
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600)
            start = position - offset
            os.pwrite(fd, view[start:end - offset],
                      position - index * shared.segment_size)
            position = end
        if offset <= shared.high:
            shared.high = max(shared.high, offset + length)
        layout = manifests.layout(shared.size, shared.segment_size)
        while shared.queued < len(layout) and \
                sum(layout[shared.queued]) <= shared.high:
            index = shared.queued
            os.close(shared.fds.pop(index))
            shared.queued += 1
            self._torrents.put((shared, index))

    def _make_torrents(self):
        lt = self.lt
        while True:
            item = self._torrents.get()
            if item is None:
                return
            shared, index = item
            if shared.failed:
                continue
            offset, length = manifests.layout(shared.size,
                                              shared.segment_size)[index]
            try:
                files = lt.file_storage()
                files.add_file(manifests.segment_name(index), length)
                maker = lt.create_torrent(
                    files, _piece_size(shared.segment_size),
                    flags=lt.create_torrent.v2_only)
                maker.set_priv(True)
                maker.set_creator('template-image-agent')
                lt.set_piece_hashes(maker, shared.dir)
                torrent = lt.bencode(maker.generate())
                segment = manifests.Segment(index, offset, length, torrent)
                self._add_torrent(shared, segment, seed=True)
                shared.manifest.add(segment)
            except Exception as exc:
                LOG.exception('p2p: image %s: segment %d cannot be shared',
                              shared.image_id, index)
                shared.fail('segment %d: %s' % (index, exc))

    def _add_torrent(self, shared, segment, seed):
        lt = self.lt
        info = lt.torrent_info(lt.bdecode(segment.torrent))
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = shared.dir
        # not queued (auto-managed torrents wait their turn), not paused
        params.flags &= ~(lt.torrent_flags.auto_managed |
                          lt.torrent_flags.paused)
        params.flags |= lt.torrent_flags.disable_dht | \
            lt.torrent_flags.disable_lsd
        if seed:
            params.flags |= lt.torrent_flags.seed_mode
        handle = self.session.add_torrent(params)
        with self._lock:
            self._torrent_of[str(info.info_hashes().v2)] = (shared,
                                                             segment.index)
        with shared.changed:
            shared.segments[segment.index] = segment
            shared.handles[segment.index] = handle
            if seed:
                shared.ready.add(segment.index)
            shared.progress_at = time.monotonic()
            shared.changed.notify_all()
        if not seed:
            self._connect(handle)
        return handle

    def _connect(self, handle):
        for address in self.torrent_peers:
            try:
                handle.connect_peer(address)
            except RuntimeError:  # the torrent was just removed
                return

    # -- a peer's side: follow the seed's manifest -------------------------
    def _check_torrent(self, segment):
        """The torrent of ``segment`` must be one v2 file of exactly the
        segment, named as its index says (never a path)."""
        lt = self.lt
        try:
            info = lt.torrent_info(lt.bdecode(segment.torrent))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise manifests.BadManifest('segment %d: not a torrent: %s'
                                        % (segment.index, exc))
        files = info.files()
        if info.num_files() != 1 or \
                files.file_path(0) != manifests.segment_name(
                    segment.index) or \
                info.total_size() != segment.length or \
                not info.info_hashes().has_v2() or not info.priv():
            raise manifests.BadManifest(
                'segment %d: the torrent is not a private v2 torrent of one '
                'file %s of %d bytes' % (segment.index,
                                         manifests.segment_name(
                                             segment.index),
                                         segment.length))

    def _follow(self, shared):
        """Long-poll the seed's manifest and add each new segment; on
        anything wrong, give the swarm copy up (the stream goes on from
        Glance)."""
        since = 0
        while not self._stop.is_set() and not shared.failed and \
                shared.active and not shared.complete:
            try:
                doc = listener.fetch_manifest(
                    self.client_tls, shared.seed_peer, shared.image_id,
                    since, POLL_WAIT)
                segments, complete, failed = manifests.parse(
                    doc, shared.image_id, shared.size, since)
                if failed:
                    raise SwarmFailed('the seed %s gave the image up'
                                      % shared.seed_peer)
                with shared.changed:
                    shared.segment_size = doc['segment_size']
                for segment in segments:
                    self._check_torrent(segment)
                    self._add_torrent(shared, segment, seed=False)
                since += len(segments)
                if complete:
                    with shared.changed:
                        shared.complete = True
                        shared.changed.notify_all()
            except listener.NotShared:
                self._stop.wait(0.5)  # the seed has not started: bounded
                # by the reader's stall timeout
            except (listener.PeerUnavailable, listener.WillNotShare,
                    manifests.BadManifest,
                    SwarmFailed, errors.AgentError) as exc:
                LOG.warning('p2p: image %s: %s', shared.image_id, exc)
                REGISTRY.inc('template_agent_p2p_fallbacks_total',
                             reason=type(exc).__name__)
                shared.fail(str(exc))

    # -- the watcher: alerts, counters, reconnection, expiry ---------------
    def _watch(self):
        lt = self.lt
        next_connect = next_look = 0
        while not self._stop.is_set():
            # wakes at the first alert: a finished segment is flushed and
            # handed to its reader without waiting for a tick
            self.session.wait_for_alert(int(TICK * 1000))
            for alert in self.session.pop_alerts():
                LOG.debug('p2p: %s: %s', type(alert).__name__,
                          alert.message())
                if isinstance(alert, lt.hash_failed_alert):
                    self.hash_failures += 1
                    REGISTRY.inc('template_agent_p2p_hash_failures_total')
                elif isinstance(alert, lt.peer_ban_alert):
                    address = str(alert.endpoint[0]) \
                        if hasattr(alert, 'endpoint') else str(alert.ip[0])
                    LOG.warning('p2p: banned peer %s: %s', address,
                                alert.message())
                    if address not in self.banned:
                        REGISTRY.inc('template_agent_p2p_banned_peers_total')
                        self._block(address)
                    self.banned[address] = time.time()
                    while len(self.banned) > 100:
                        self.banned.popitem(last=False)
                elif isinstance(alert, lt.torrent_finished_alert):
                    # complete and checked, maybe not all written yet
                    alert.handle.flush_cache()
                elif isinstance(alert, lt.cache_flushed_alert):
                    self._flushed(alert.handle)
                elif isinstance(alert, lt.peer_blocked_alert):
                    REGISTRY.inc('template_agent_p2p_refused_total')
            now = time.monotonic()
            if now < next_look:  # alerts come often; the rest every tick
                continue
            next_look = now + TICK
            reconnect = now >= next_connect
            if reconnect:
                next_connect = now + 2
            with self._lock:
                images = list(self.images.values())
            for shared in images:
                self._look_at(shared, now, reconnect)

    def _block(self, address):
        """A peer banned on one torrent sent bytes that fail their hash:
        refuse it on all of them, until the service restarts."""
        ip_filter = self.session.get_ip_filter()
        try:
            ip_filter.add_rule(address, address, 1)
        except (RuntimeError, ValueError) as exc:
            LOG.warning('p2p: cannot block %s: %s', address, exc)
            return
        self.session.set_ip_filter(ip_filter)

    def _flushed(self, handle):
        """A segment libtorrent completed is on disk: it may be read."""
        try:
            key = str(handle.info_hashes().v2)
        except RuntimeError:
            return
        with self._lock:
            shared, index = self._torrent_of.get(key, (None, None))
        if shared is None:
            return
        with shared.changed:
            if shared.handles.get(index) is not None:
                shared.ready.add(index)
                shared.progress_at = time.monotonic()
                shared.changed.notify_all()

    def _look_at(self, shared, now, reconnect):
        with shared.changed:
            handles = dict(shared.handles)
        moved = False
        for index, handle in handles.items():
            try:
                status = handle.status()
            except RuntimeError:
                continue
            got = status.total_payload_download
            sent = status.total_payload_upload
            if got > shared.received.get(index, 0):
                REGISTRY.inc('template_agent_p2p_received_bytes_total',
                             got - shared.received.get(index, 0),
                             source='peers')
                shared.received[index] = got
                moved = True
            if sent > shared.sent.get(index, 0):
                REGISTRY.inc('template_agent_p2p_sent_bytes_total',
                             sent - shared.sent.get(index, 0))
                shared.sent[index] = sent
            if reconnect and shared.role == 'peer' and \
                    not status.is_seeding and status.num_peers < len(
                        self.torrent_peers):
                self._connect(handle)
        with shared.changed:
            if moved:
                shared.progress_at = now
            shared.changed.notify_all()  # readers look at the handles
        if not shared.active and (shared.failed or now - shared.done_at >=
                                  self.seed_time):
            with self._lock:
                if self.images.get(shared.image_id) is shared:
                    self._drop(shared)

    def _drop(self, shared):
        """Remove ``shared``'s torrents and files (under ``_lock``)."""
        if self.images.get(shared.image_id) is shared:
            del self.images[shared.image_id]
        with shared.changed:
            handles, shared.handles = shared.handles, {}
        for segment in shared.segments.values():
            self._torrent_of.pop(self._hash_of(segment), None)
        for handle in handles.values():
            try:
                self.session.remove_torrent(handle)
            except RuntimeError:
                pass
        for fd in shared.fds.values():
            os.close(fd)
        shared.fds = {}
        shutil.rmtree(shared.dir, ignore_errors=True)
        LOG.info('p2p: image %s left the swarm', shared.image_id)

    def _hash_of(self, segment):
        lt = self.lt
        return str(lt.torrent_info(lt.bdecode(
            segment.torrent)).info_hashes().v2)

    # -- status -------------------------------------------------------------
    def status(self):
        with self._lock:
            images = list(self.images.values())
        rows = {}
        for shared in images:
            with shared.changed:
                handles = dict(shared.handles)
            peers = set()
            for handle in handles.values():
                try:
                    peers.update(str(p.ip[0]) for p in handle.get_peer_info())
                except RuntimeError:
                    continue
            rows[shared.image_id] = {
                'role': shared.role, 'state': shared.state(),
                'seed': shared.seed_peer or self.me,
                'segments': len(handles),
                'bytes_from_peers': sum(shared.received.values()),
                'bytes_from_glance': shared.from_glance,
                'bytes_sent': sum(shared.sent.values()),
                'connected_peers': sorted(peers),
                'failed': shared.failed}
        return {'self': self.me, 'peers': self.peers,
                'bytes_from_peers': REGISTRY.value(
                    'template_agent_p2p_received_bytes_total',
                    source='peers'),
                'bytes_from_glance': REGISTRY.value(
                    'template_agent_p2p_received_bytes_total',
                    source='glance'),
                'bytes_sent': REGISTRY.value(
                    'template_agent_p2p_sent_bytes_total'),
                'hash_failures': self.hash_failures,
                'banned_peers': list(self.banned), 'images': rows}


    def gauges(self):
        """Gauges for ``metrics.render``: images by role and state, peers
        listed and connected."""
        status = self.status()
        counts = collections.Counter(
            (row['role'], row['state']) for row in status['images'].values())
        gauges = [('template_agent_p2p_images',
                   {'role': role, 'state': state}, counts[(role, state)])
                  for role in ('seed', 'peer')
                  for state in ('fetching', 'seeding', 'failed')]
        connected = set()
        for row in status['images'].values():
            connected.update(row['connected_peers'])
        gauges += [('template_agent_p2p_peers', {'which': 'listed'},
                    len(self.peers) - 1),
                   ('template_agent_p2p_peers', {'which': 'connected'},
                    len(connected))]
        return gauges


class _SwarmSource:
    """The image source a shared download reads: ``get`` from Glance,
    ``open`` from the swarm (teed from Glance on the seed), or from Glance
    from where the swarm stopped."""

    def __init__(self, swarm, shared, glance):
        self.swarm = swarm
        self.shared = shared
        self.glance = glance
        self.name = self.glance.name

    def get(self, image_id):
        return self.glance.get(image_id)

    def reporting(self, progress):
        """``progress`` (``callable(done, total, sources=None)``) told, at
        every call, how many of the bytes the fetch read so far came from
        peers and how many from Glance; None stays None."""
        shared = self.shared
        if progress is None or shared is None:
            return progress

        def report(done, total, sources=None):
            progress(done, total, sources={
                'peers': shared.read_from_peers,
                'glance': shared.from_glance})
        return report

    def open(self, image, offset=0):
        shared = self.shared
        if shared is None:
            return self.glance.open(image, offset)
        if shared.role == 'seed':
            return self._counted(self.glance.open(image, offset), tee=True)
        if shared.failed:
            LOG.info('p2p: image %s: from Glance from byte %d on (%s)',
                     image.id, offset, shared.failed)
            return self._counted(self.glance.open(image, offset), tee=False)
        return _PeerStream(self.swarm, shared, offset).stream()

    def _counted(self, stream, tee):
        """``stream`` with its bytes counted as from Glance, and written
        into the segment files when ``tee`` (the seed)."""
        swarm, shared = self.swarm, self.shared
        position = stream.offset

        def taken(data):
            nonlocal position
            if tee:
                swarm.tee(shared, position, data)
            position += len(data)
            shared.from_glance += len(data)
            REGISTRY.inc('template_agent_p2p_received_bytes_total',
                         len(data), source='glance')

        def chunks():
            for piece in stream:
                taken(piece)
                yield piece

        readinto = None
        if stream.readinto is not None:
            inner = stream.readinto

            def readinto(buffer):
                got = inner(buffer)
                with memoryview(buffer) as view:
                    taken(view[:got])
                return got
        return DataStream(chunks(), stream.offset, stream.close,
                          abort=stream.abort, readinto=readinto)


class _PeerStream:
    """The image from ``offset`` on, segment by segment as libtorrent
    completes them, read from the segment files. Raises
    TransientSourceError when the swarm fails or stalls, so the download
    goes on from Glance (``_SwarmSource.open`` after the failure)."""

    def __init__(self, swarm, shared, offset):
        self.swarm = swarm
        self.shared = shared
        self.offset = offset
        self.aborted = threading.Event()

    def stream(self):
        return DataStream(self._chunks(), self.offset, abort=self._abort)

    def _abort(self):
        """The download abandons this stream (cancelled, or too slow for
        ``[glance] download_min_rate``): what it reopens reads Glance."""
        self.aborted.set()
        self.shared.fail('the download abandoned the stream from the swarm')

    def _wait_segment(self, position):
        """The segment holding ``position``, once libtorrent has all of it
        (checked piece by piece against its torrent)."""
        shared = self.shared
        stall = self.swarm.stall_timeout
        with shared.changed:
            while True:
                if self.aborted.is_set():
                    raise TransientSourceError('aborted')
                if shared.failed:
                    raise SwarmFailed(shared.failed)
                index = position // shared.segment_size
                if index in shared.ready:
                    return shared.segments[index]
                idle = time.monotonic() - shared.progress_at
                if idle > stall:
                    REGISTRY.inc('template_agent_p2p_fallbacks_total',
                                 reason='stalled')
                    raise SwarmFailed('no progress from the swarm for %d s '
                                      '([p2p] stall_timeout)' % idle)
                shared.changed.wait(TICK)

    def _chunks(self):
        shared = self.shared
        position = self.offset
        try:
            while position < shared.size:
                segment = self._wait_segment(position)
                path = os.path.join(shared.dir,
                                    manifests.segment_name(segment.index))
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC |
                             os.O_NOFOLLOW)
                try:
                    while position < segment.end:
                        if self.aborted.is_set():
                            return
                        want = min(READ_CHUNK, segment.end - position)
                        data = os.pread(fd, want,
                                        position - segment.offset)
                        if len(data) != want:
                            raise SwarmFailed('segment %d is short'
                                              % segment.index)
                        position += len(data)
                        shared.read_from_peers += len(data)
                        yield data
                finally:
                    os.close(fd)
        except (SwarmFailed, OSError) as exc:
            if not self.aborted.is_set():
                LOG.warning('p2p: image %s: the swarm stopped at byte %d: '
                            '%s; going on from Glance', shared.image_id,
                            position, exc)
                shared.fail(str(exc))
            raise TransientSourceError('the swarm stopped: %s' % exc)
