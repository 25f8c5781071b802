"""The ``cinder`` volume backend: volumes of an OpenStack Cinder (block
storage API v3), shared by every agent that uses the same Cinder project.

Cinder is reached through a keystoneauth1 session, auth plugin and adapter
loaded from ``[cinder]`` (nova's option names; with Cinder's ``noauth``:
``auth_type = admin_token``, ``token = admin:<project>``, ``endpoint =
http://<host>:8776/v3/<project>``). Every request has the session's
timeout (``[cinder] api_timeout`` when the session sets none), and every
wait for Cinder's background work ``operation_timeout``.

The agent's metadata of a volume (``kind``, ``image_id``, ``status``...) is
kept in Cinder's volume metadata, one key ``template-agent:<name>`` per
item with a JSON value, so that every agent finds the templates of the
image-volume cache by it (``agent.cache.image_volume_cache``) and the
volumes are ordinary Cinder volumes to everyone else.

Attaching is Cinder's attachments API (v3.54: a mode per attachment): the
connector comes from ``os_brick.initiator.connector.
get_connector_properties`` with ``[DEFAULT] host``, templates are attached
read-only, and the attachment records are the holders across hosts (a
volume attached anywhere is never deleted). The returned RBD connection
info is then made a block device on this host by one of two routes,
chosen by what the host can do:

- ``kernel``: the kernel has the ``rbd`` driver; os-brick maps the image
  (``/dev/rbdN``);
- ``qemu-storage-daemon``: no kernel ``rbd``; a ``qemu-storage-daemon``
  FUSE export of the RBD image (a regular file), with a loop device on it
  (``agent.privileged.rbd_exports``). The daemon belongs to the service:
  ``init`` restores it after a restart, ``release`` stops it.

What is exported where is recorded in ``$state_path/cinder-exports`` (one
JSON file per export), so ``init`` and ``reclaim`` find the attachments and
daemons of a killed process.

Worked example::

    backend = CinderVolumeBackend(conf)
    vid = backend.create(2 * GiB, {'kind': 'template', 'image_id': 'X'})
    backend.write_image(vid, '/tmp/X.part', 'qcow2')
    backend.connection_properties(vid)
    # -> {'driver_volume_type': 'local', 'data': {'device_path':
    #     '/dev/loop4', 'volume_id': vid, 'access_mode': 'ro'}}
    backend.holders(vid)      # -> ['hv1', 'hv2']: hosts it is attached to
    backend.release(vid)      # detach here (attachment deleted)
"""

import concurrent.futures
import contextlib
import io
import json
import logging
import math
import os
import random
import re
import socket
import stat
import threading
import time
import uuid

import psutil
from oslo_concurrency import lockutils

from agent import config, errors, files
from agent.volumes.base import ImageWriter, Volume, VolumeBackend

LOG = logging.getLogger(__name__)
GiB = 1024 ** 3
META_PREFIX = 'template-agent:'
#: 3.54: attachments with a mode; 3.44: os-complete; 3.27: attachments
MICROVERSION = '3.54'
POLL_SECONDS = 0.5
#: the pause before asking again for an attachment Cinder refused because
#: another host's was being made (random within, so hosts interleave)
ATTACH_RETRY_SECONDS = (0.05, 0.25)
#: what a volume goes through while another host attaches or detaches it
#: (Cinder reports the status it reads after its reservation failed, which
#: may already be the next one)
TRANSIENT_STATUSES = ('reserved', 'attaching', 'detaching', 'in-use',
                      'available', 'downloading')
_BUSY = re.compile(r'to reserve, but the current status is ([a-z_-]+)')


def _encode(metadata):
    return {META_PREFIX + k: json.dumps(v, sort_keys=True)
            for k, v in metadata.items()}


def _decode(cinder_metadata):
    meta = {}
    for key, value in (cinder_metadata or {}).items():
        if key.startswith(META_PREFIX):
            try:
                meta[key[len(META_PREFIX):]] = json.loads(value)
            except ValueError:
                meta[key[len(META_PREFIX):]] = value
    return meta


def _gib(size_bytes):
    return max(1, math.ceil(size_bytes / GiB))


def _with_timeout(seconds, what, call, *args, **kwargs):
    """Run ``call`` with a deadline (os-brick's calls take none): on
    timeout the worker thread is abandoned and a typed error raised."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(call, *args, **kwargs).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise errors.BackendUnavailable(
            backend='cinder', reason='%s did not finish in %d s' % (what,
                                                                  seconds))
    finally:
        pool.shutdown(wait=False)


def kernel_rbd_available():
    """Whether the kernel can map RBD images (module loaded, or present to
    be loaded)."""
    if os.path.isdir('/sys/bus/rbd'):
        return True
    try:
        with open('/lib/modules/%s/modules.dep' % os.uname().release) as f:
            return any('/rbd.ko' in line.split(':', 1)[0] for line in f)
    except OSError:
        return False


class CinderVolumeBackend(VolumeBackend):
    name = 'cinder'
    #: templates are found by every agent using the same Cinder project
    shared = True

    def __init__(self, conf):
        super().__init__(conf)
        # keystoneauth1's [cinder] options, when the configuration loaded
        # did not name this backend (``agent.config.load`` registers them
        # when it does)
        config.register_cinder_auth(conf)
        self.opts = conf.cinder
        self.host = conf.host
        self.exports_path = conf.cinder.exports_path
        self.records_dir = os.path.join(conf.state_path, 'cinder-exports')
        self.template_wait_timeout = conf.cinder.template_wait_timeout
        self._adapter = None
        self._route = None
        self._connector = None
        self._client_lock = threading.Lock()

    # -- Cinder's API ---------------------------------------------------------
    def _client(self):
        with self._client_lock:
            if self._adapter is None:
                self._adapter = self._load_adapter()
            return self._adapter

    def _load_adapter(self):
        try:
            from keystoneauth1 import exceptions as ks_exc
            from keystoneauth1 import loading as ks_loading
        except ImportError:
            raise errors.BackendUnavailable(
                backend='cinder', reason='keystoneauth1 is not installed '
                '(pip install template-image-agent[cinder])')
        try:
            auth = ks_loading.load_auth_from_conf_options(self.conf,
                                                          'cinder')
        except ks_exc.ClientException as exc:
            raise errors.ConfigError(reason='[cinder] auth options: %s'
                                     % exc)
        session = ks_loading.load_session_from_conf_options(
            self.conf, 'cinder', auth=auth)
        if session.timeout is None:
            session.timeout = float(self.opts.api_timeout)
        adapter = ks_loading.load_adapter_from_conf_options(
            self.conf, 'cinder', session=session, auth=auth)
        service_type, service_name, interface = \
            self.opts.catalog_info.split(':', 2)
        adapter.service_type = adapter.service_type or service_type
        adapter.service_name = adapter.service_name or service_name or None
        if not self.conf.cinder.valid_interfaces:
            adapter.interface = interface
        adapter.region_name = adapter.region_name or \
            self.opts.os_region_name
        if self.opts.endpoint_template:
            adapter.endpoint_override = self.opts.endpoint_template % {
                'project_id': session.get_project_id()}
        if adapter.connect_retries is None:
            adapter.connect_retries = self.opts.http_retries
        adapter.default_microversion = MICROVERSION
        return adapter

    @property
    def endpoint(self):
        try:
            return self._client().get_endpoint() or '?'
        except Exception:  # noqa: BLE001 - only for messages
            return self.opts.endpoint_template or '(the service catalog)'

    def _request(self, method, path, action, body=None, ok=(200, 201, 202,
                                                             204)):
        """One request; the decoded body, or None for an accepted 404
        (when 404 is in ``ok``)."""
        from keystoneauth1 import exceptions as ks_exc
        client = self._client()
        # keystoneauth retries a request that timed out, even a POST that
        # Cinder may have carried out (a second volume, or a second
        # attachment refused because the first one reserved the volume):
        # a POST is sent again only if it never reached Cinder
        once = {'connect_retries': 0} if method == 'POST' else {}
        tries = 1 + (client.connect_retries or 0) if once else 1
        for attempt in range(tries):
            try:
                resp = client.request(path, method, json=body,
                                      raise_exc=False, headers={
                                          'Accept': 'application/json'},
                                      **once)
                break
            except ks_exc.ConnectFailure as exc:
                if attempt + 1 < tries:
                    time.sleep(0.5 * 2 ** attempt)
                    continue
                raise errors.VolumeServiceFailed(
                    endpoint=self.endpoint, action=action, reason=str(exc))
            except ks_exc.ClientException as exc:
                if once and isinstance(exc, ks_exc.ConnectTimeout):
                    exc = '%s (it may have been done: not sent again)' % exc
                raise errors.VolumeServiceFailed(
                    endpoint=self.endpoint, action=action, reason=str(exc))
        if resp.status_code not in ok:
            text = resp.text[:500] if resp.text else ''
            if resp.status_code == 404 and path.startswith('/volumes/'):
                raise errors.VolumeNotFound(volume_id=path.split('/')[2],
                                            backend='cinder')
            raise errors.VolumeServiceFailed(
                endpoint=self.endpoint, action=action,
                reason='HTTP %d: %s' % (resp.status_code, text))
        if resp.status_code == 404:
            return None
        return resp.json() if resp.content else {}

    def _volume(self, volume_id):
        return self._request('GET', '/volumes/%s' % volume_id,
                             'show volume %s' % volume_id)['volume']

    def _wait(self, volume_id, statuses, action):
        """Wait until the volume's status is one of ``statuses``
        (``deleted``: it is gone); raise on ``error*`` or the deadline.
        ``statuses`` None: until Cinder has finished making it (any status
        but ``creating``, an error one too: a volume created without
        waiting is written, extended or deleted later)."""
        deadline = time.monotonic() + self.opts.operation_timeout
        while True:
            try:
                volume = self._volume(volume_id)
            except errors.VolumeNotFound:
                if statuses and 'deleted' in statuses:
                    return None
                raise
            status = volume['status']
            if status in statuses if statuses else status != 'creating':
                return volume
            if status.startswith('error'):
                raise errors.VolumeServiceFailed(
                    endpoint=self.endpoint, action=action,
                    reason='volume %s went to status %s' % (volume_id,
                                                            status))
            if time.monotonic() > deadline:
                raise errors.VolumeServiceFailed(
                    endpoint=self.endpoint, action=action,
                    reason='volume %s still %s after %d s' % (
                        volume_id, status, self.opts.operation_timeout))
            time.sleep(POLL_SECONDS)

    def _to_volume(self, data):
        meta = _decode(data.get('metadata'))
        meta.setdefault('cinder_status', data['status'])
        meta['created_at'] = data.get('created_at')
        return Volume(id=data['id'], size_bytes=data['size'] * GiB,
                      metadata=meta)

    def _new_volume(self, body, metadata, action, wait=True):
        """POST a volume and (with ``wait``) wait for it; delete it if it
        fails."""
        body.setdefault('name', 'template-agent-%s-%s' % (
            metadata.get('kind', 'volume'), metadata.get('image_id') or ''))
        body['metadata'] = _encode(metadata)
        if self.opts.volume_type:
            body['volume_type'] = self.opts.volume_type
        volume_id = self._request('POST', '/volumes', action,
                                  {'volume': body})['volume']['id']
        if not wait:
            return volume_id
        try:
            self._wait(volume_id, ('available',), action)
        except BaseException:
            with contextlib.suppress(errors.AgentError):
                self._request('DELETE', '/volumes/%s' % volume_id,
                              'delete volume %s' % volume_id,
                              ok=(202, 404))
            raise
        return volume_id

    # -- interface ------------------------------------------------------------
    def capabilities(self):
        route = self.route()
        self._request('GET', '/volumes?limit=1', 'list volumes')
        return {'backend': self.name, 'available': True, 'reason': None,
                'endpoint': self.endpoint, 'host': self.host,
                'attach': route, 'shared': True,
                'clone': 'cinder (copy-on-write where the driver can)',
                'volume_type': self.opts.volume_type}

    def route(self):
        """How an attached volume becomes a device here: ``kernel`` (os-brick
        maps it) or ``qemu-storage-daemon`` (a FUSE export and a loop
        device); BackendUnavailable when neither works."""
        if self._route is None:
            if kernel_rbd_available():
                self._route = 'kernel'
            elif not os.path.exists('/dev/fuse'):
                raise errors.BackendUnavailable(
                    backend='cinder', reason='the kernel has no rbd driver '
                    'and there is no /dev/fuse for a qemu-storage-daemon '
                    'export')
            elif not any(os.access(os.path.join(d, 'qemu-storage-daemon'),
                                   os.X_OK)
                         for d in os.environ.get(
                             'PATH', '/usr/bin:/bin').split(os.pathsep)):
                raise errors.BackendUnavailable(
                    backend='cinder', reason='the kernel has no rbd driver '
                    'and qemu-storage-daemon is not installed (Debian: '
                    'qemu-system-common, qemu-block-extra)')
            else:
                self._route = 'qemu-storage-daemon'
        return self._route

    def create(self, size_bytes, metadata, wait=True):
        meta = dict(metadata, status='creating', pid=os.getpid(),
                    host=self.host, created=time.time())
        return self._new_volume({'size': _gib(size_bytes)}, meta,
                                'create a volume', wait=wait)

    def get(self, volume_id):
        return self._to_volume(self._volume(volume_id))

    def list(self):
        data = self._request('GET', '/volumes/detail', 'list volumes')
        return [self._to_volume(v) for v in data['volumes']
                if _decode(v.get('metadata'))]

    def update_metadata(self, volume_id, **changes):
        self._request('POST', '/volumes/%s/metadata' % volume_id,
                      'update the metadata of volume %s' % volume_id,
                      {'metadata': _encode(changes)})

    def set_image_owner(self, volume_id, owner):
        """Cinder's own ``image_owner`` metadata key (not the agent's
        namespace): Cinder clones an image volume for a volume create in
        another project only if it names the image's owner."""
        self._request('POST', '/volumes/%s/metadata' % volume_id,
                      'update the metadata of volume %s' % volume_id,
                      {'metadata': {'image_owner': owner}})

    def holders(self, volume_id):
        """The hosts that have ``volume_id`` attached (Cinder's attachment
        records), sorted."""
        try:
            volume = self._volume(volume_id)
        except errors.VolumeNotFound:
            return []
        return sorted({a.get('host_name') or '?'
                       for a in volume.get('attachments') or []})

    def delete(self, volume_id):
        self.release(volume_id)
        try:
            volume = self._wait(volume_id, None,
                                'delete volume %s' % volume_id)
        except errors.VolumeNotFound:
            return
        hosts = sorted({a.get('host_name') or '?'
                        for a in volume.get('attachments') or []})
        if hosts:
            raise errors.VolumeAttached(volume_id=volume_id,
                                        hosts=', '.join(hosts))
        if volume['status'] in ('reserved', 'attaching') and _decode(
                volume.get('metadata')).get('status') in ('creating',
                                                          'failed'):
            self._drop_unfinished_attachments(volume_id)
        action = 'delete volume %s' % volume_id
        try:
            self._request('DELETE', '/volumes/%s' % volume_id, action,
                          ok=(202, 404))
        except errors.VolumeServiceFailed as exc:
            if 'attach' in str(exc):  # attached meanwhile
                raise errors.VolumeAttached(volume_id=volume_id,
                                            hosts='another host')
            raise
        self._wait(volume_id, ('deleted',), action)

    def _drop_unfinished_attachments(self, volume_id):
        """Delete the attachments of a template being written that were
        never completed: its writer's, whose answer was lost (a timed-out
        POST Cinder carried out), which keep the volume ``reserved`` and
        undeletable. Only the writing host attaches a template before it
        is written, so they are this host's."""
        found = self._request(
            'GET', '/attachments?volume_id=%s' % volume_id,
            'list the attachments of volume %s' % volume_id)
        for attachment in found.get('attachments') or []:
            if attachment.get('status') in ('reserved', 'attaching') and \
                    not attachment.get('instance'):
                LOG.info('volume %s: deleting unfinished attachment %s',
                         volume_id, attachment['id'])
                self._request('DELETE', '/attachments/%s' % attachment['id'],
                              'detach volume %s' % volume_id, ok=(200, 404))

    def clone(self, volume_id, size_bytes, metadata):
        source = self._volume(volume_id)
        size = max(_gib(size_bytes), source['size'])
        meta = dict(metadata, status='available', host=self.host,
                    created=time.time(), source_volume=volume_id)
        return self._new_volume({'size': size, 'source_volid': volume_id},
                                meta, 'clone volume %s' % volume_id)

    def extend(self, volume_id, size_bytes):
        action = 'extend volume %s' % volume_id
        volume = self._wait(volume_id, None, action)
        if _gib(size_bytes) <= volume['size']:
            return
        self._request('POST', '/volumes/%s/action' % volume_id, action,
                      {'os-extend': {'new_size': _gib(size_bytes)}})
        deadline = time.monotonic() + self.opts.operation_timeout
        while self._wait(volume_id, ('available', 'in-use'), action)[
                'size'] < _gib(size_bytes):
            if time.monotonic() > deadline:
                raise errors.VolumeServiceFailed(
                    endpoint=self.endpoint, action=action,
                    reason='the size did not change in %d s'
                    % self.opts.operation_timeout)
            time.sleep(POLL_SECONDS)

    @contextlib.contextmanager
    def writing(self, volume_id):
        key = volume_id + '.write'
        self._wait(volume_id, None, 'write volume %s' % volume_id)
        with self._lock(volume_id):
            # in userspace, QEMU's own RBD client writes straight into the
            # attached image (what the export would do, minus FUSE)
            record = self._export(key, volume_id, read_only=False,
                                  block_device=False, direct=True)
        try:
            # a Ceph that stops answering fails the write within
            # operation_timeout (librados waits for ever by default)
            target = record.get('path') or rbd_filename(
                record['connection_info'], self.opts.ceph_conf,
                op_timeout=self.opts.operation_timeout)
            try:
                yield ImageWriter(target, volume_id)
            except errors.ConversionFailed as exc:
                if not _volume_side(exc.kwargs.get('reason') or ''):
                    raise
                raise errors.VolumeWriteFailed(
                    volume_id=volume_id,
                    rbd_image=record['connection_info'].get('name'),
                    # qemu-img says it once per request in flight
                    reason=exc.kwargs['reason'].strip().splitlines()[-1])
        finally:
            with self._lock(volume_id):
                self._teardown(self._load(key))

    def open_volume(self, volume_id):
        """The volume's bits through an export: the link's export when
        this host has one, else an export of its own that closing the
        file ends."""
        with self._lock(volume_id):
            record = self._load(volume_id)
            if record and self._alive(record):
                return open(record['path'], 'rb')
            key = '%s.read-%s' % (volume_id, uuid.uuid4().hex[:8])
            record = self._export(key, volume_id, read_only=True,
                                  block_device=False)

        def end_export():
            with self._lock(volume_id):
                self._teardown(self._load(key))
        return ExportedFile(record['path'], end_export)

    def connection_properties(self, volume_id, read_only=True):
        key = volume_id if read_only else volume_id + '.rw'
        with self._lock(volume_id):
            record = self._export(key, volume_id, read_only=read_only,
                                  block_device=True)
        return {'driver_volume_type': 'local',
                'data': {'device_path': record['device'],
                         'volume_id': volume_id,
                         'access_mode': 'ro' if read_only else 'rw'}}

    def attach_ahead(self, volume_id):
        # Cinder's record only: no device and no export exist until the
        # template is written, so nothing (udev's probe, a page cache,
        # librbd's cache) can keep bytes from before
        try:
            with self._lock(volume_id):
                self._export(volume_id, volume_id, read_only=True,
                             block_device=False, attach_only=True)
            return True
        except errors.AgentError as exc:
            LOG.info('volume %s: not attached ahead (%s); attaching once '
                     'it is written', volume_id, exc)
            return False

    def release(self, volume_id):
        with self._lock(volume_id):
            for record in self._records():
                if record['volume_id'] == volume_id:
                    self._teardown(record)

    def reclaim(self, in_use_volume_ids=None):
        gone = {'volumes': [], 'exports': []}
        for volume in self.list():
            meta = volume.metadata
            if meta.get('status') == 'creating' and \
                    meta.get('host') == self.host and \
                    meta.get('cinder_status') != 'deleting' and not (
                        meta.get('pid') and psutil.pid_exists(meta['pid'])):
                try:
                    self.delete(volume.id)
                except errors.VolumeAttached:
                    continue
                except errors.BackendUnavailable as exc:
                    LOG.warning('unfinished volume %s is left for the next '
                                'reclaim: %s', volume.id, exc)
                    continue
                gone['volumes'].append(volume.id)
        for record in self._records():
            dead_writer = record['key'] != record['volume_id'] and \
                not psutil.pid_exists(record.get('pid') or 0)
            if dead_writer or (in_use_volume_ids is not None and
                               record['volume_id'] not in in_use_volume_ids):
                with self._lock(record['volume_id']):
                    self._teardown(record)
                gone['exports'].append(record.get('device') or
                                       record['path'])
        return gone

    # -- exports --------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, volume_id):
        with lockutils.lock('cinder-volume-' + volume_id, external=True,
                            lock_path=os.path.join(self.records_dir,
                                                   'locks')):
            yield

    def _record_path(self, key):
        return os.path.join(self.records_dir, key + '.json')

    def _load(self, key):
        try:
            fd, _ = files.open_existing(self._record_path(key))
        except FileNotFoundError:
            return None
        with os.fdopen(fd, encoding='utf-8') as f:
            try:
                return json.load(f)
            except ValueError:
                return None

    def _save(self, record):
        os.makedirs(self.records_dir, 0o700, exist_ok=True)
        tmp = self._record_path(record['key']) + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(record, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._record_path(record['key']))

    def _records(self):
        if not os.path.isdir(self.records_dir):
            return []
        found = []
        for name in sorted(os.listdir(self.records_dir)):
            if name.endswith('.json'):
                record = self._load(name[:-5])
                if record:
                    found.append(record)
        return found

    def connector(self):
        """os-brick's connector properties of this host, named by
        ``[DEFAULT] host``."""
        if self._connector is None:
            from agent import identity
            identity.brick_context()
            from os_brick.initiator import connector
            try:
                my_ip = socket.gethostbyname(self.host)
            except OSError:
                my_ip = '127.0.0.1'
            props = _with_timeout(
                self.opts.operation_timeout, 'os-brick connector properties',
                connector.get_connector_properties, None, my_ip, False,
                False, host=self.host)
            props['do_local_attach'] = self.route() == 'kernel'
            self._connector = props
        return dict(self._connector)

    def prepare_attach(self):
        # os-brick's import and the connector properties take about a
        # second on a busy host: paid while the template is written
        with contextlib.suppress(Exception):
            self.connector()

    def _attachment(self, volume_id, read_only, record):
        """The connection info of this host's attachment for the export
        (the recorded one if Cinder still has it, else a new one)."""
        if record and record.get('attachment_id'):
            data = self._request(
                'GET', '/attachments/%s' % record['attachment_id'],
                'show attachment %s' % record['attachment_id'],
                ok=(200, 404))
            if data and data['attachment'].get('connection_info'):
                return (record['attachment_id'],
                        data['attachment']['connection_info'])
        action = 'attach volume %s to %s' % (volume_id, self.host)
        body = {'attachment': {'volume_uuid': volume_id,
                               'connector': self.connector(),
                               'mode': 'ro' if read_only else 'rw'}}
        deadline = time.monotonic() + self.opts.operation_timeout
        while True:
            try:
                data = self._request('POST', '/attachments', action,
                                     body)['attachment']
                break
            except errors.VolumeServiceFailed as exc:
                # another host is attaching or detaching the (multiattach)
                # volume at this moment: Cinder refuses instead of queueing
                busy = _BUSY.search(str(exc))
                if not busy or busy.group(1) not in TRANSIENT_STATUSES or \
                        time.monotonic() > deadline:
                    raise
                # (short: Cinder takes one attachment at a time, and each
                # is done in a fraction of a second)
                time.sleep(random.uniform(*ATTACH_RETRY_SECONDS))
        try:
            self._request('POST', '/attachments/%s/action' % data['id'],
                          action, {'os-complete': {}})
        except BaseException:
            with contextlib.suppress(errors.AgentError):
                self._request('DELETE', '/attachments/%s' % data['id'],
                              'detach volume %s' % volume_id, ok=(200, 404))
            raise
        return data['id'], data['connection_info']

    def _export(self, key, volume_id, read_only, block_device,
                direct=False, attach_only=False):
        """The live export ``key`` of ``volume_id`` (made, or repaired after
        a restart); its record. Call under the volume's lock. With
        ``direct``, the userspace route stops at the attachment (its
        ``connection_info`` is for QEMU's RBD client); with
        ``attach_only``, every route does (no device, no export)."""
        record = self._load(key)
        if attach_only and record and record.get('attachment_id'):
            return record
        if record and self._alive(record) and (
                record.get('device') or not block_device):
            return record
        if record:
            self._teardown(record, keep_attachment=True)
        route = self.route()
        record = {'key': key, 'volume_id': volume_id, 'route': route,
                  'read_only': read_only, 'pid': os.getpid(),
                  'attachment_id': (record or {}).get('attachment_id')}
        try:
            attachment_id, info = self._attachment(volume_id, read_only,
                                                   record)
            record['attachment_id'] = attachment_id
            record['connection_info'] = info
            self._save(record)  # a crash from here on leaves a trace
            if attach_only:
                pass
            elif route == 'kernel':
                record['path'] = record['device'] = self._map(info)
            elif not direct:
                record['path'] = self._start_export(key, volume_id, info,
                                                    read_only)
                if block_device:
                    # the image's own size, not the volume's whole GiBs
                    size = _decode(self._volume(volume_id).get(
                        'metadata')).get('virtual_size') or 0
                    record['device'] = self._privileged(
                        lambda m: m.attach_loop, self.exports_path, key,
                        read_only, size)
            self._save(record)
        except BaseException:
            self._teardown(record)
            raise
        return record

    def _alive(self, record):
        if record['route'] == 'kernel':
            try:
                return stat.S_ISBLK(os.stat(record['path']).st_mode)
            except (OSError, KeyError):
                return False
        state = self._privileged(lambda m: m.status, self.exports_path,
                                 record['key'])
        if not (state['daemon'] and state['mounted']):
            return False
        device = record.get('device')
        if device:
            from agent.volumes.local import loop_devices_of
            return any(dev == device for dev, _, autoclear in
                       loop_devices_of(record['path']) if not autoclear)
        return True

    def _start_export(self, key, volume_id, info, read_only):
        pool, image = info['name'].split('/', 1)
        try:
            return self._privileged(
                lambda m: m.start, self.exports_path, key, pool, image,
                list(info.get('hosts') or []),
                [str(p) for p in info.get('ports') or []],
                info.get('auth_username') if info.get('auth_enabled')
                else None,
                self.opts.ceph_conf if os.path.isfile(self.opts.ceph_conf)
                else None, not read_only, self.opts.operation_timeout)
        except errors.BackendUnavailable as exc:
            cause = exc.__context__
            # the daemon's RBD client timed out, or Ceph refused it
            if isinstance(cause, TimeoutError) or (
                    isinstance(cause, OSError) and _volume_side(str(cause))):
                raise errors.VolumeExportFailed(
                    volume_id=volume_id, rbd_image=info['name'],
                    reason=str(cause)) from cause
            raise

    def _brick(self):
        from agent import identity
        identity.brick_context()
        from os_brick.initiator import connector
        return connector.InitiatorConnector.factory(
            'RBD', root_helper=None, do_local_attach=True)

    def _map(self, info):
        return _with_timeout(self.opts.operation_timeout, 'rbd map',
                             self._brick().connect_volume,
                             dict(info, do_local_attach=True))['path']

    def _teardown(self, record, keep_attachment=False):
        """Undo an export: loop device, daemon or mapping, and (unless
        kept, for a repair) the attachment, then its record. The record
        stays while Cinder cannot be told (``reclaim`` retries)."""
        if not record:
            return
        if record['route'] == 'kernel':
            if record.get('path'):
                _with_timeout(self.opts.operation_timeout, 'rbd unmap',
                              self._brick().disconnect_volume,
                              record.get('connection_info') or {},
                              {'path': record['path']})
        else:
            if record.get('device'):
                self._privileged(lambda m: m.detach_loop,
                                 self.exports_path, record['device'])
            self._privileged(lambda m: m.stop, self.exports_path,
                             record['key'], self.opts.operation_timeout)
        if keep_attachment:
            return
        if record.get('attachment_id'):
            self._request('DELETE', '/attachments/%s'
                          % record['attachment_id'], 'detach volume %s'
                          % record['volume_id'], ok=(200, 404))
        files.unlink_quietly(self._record_path(record['key']))

    def _privileged(self, call, *args):
        from agent.privileged import rbd_exports
        try:
            return call(rbd_exports)(*args)
        except (OSError, rbd_exports.ExportRefused) as exc:
            raise errors.BackendUnavailable(backend='cinder', reason=str(exc))


def _volume_side(qemu_img_stderr):
    """Whether qemu-img failed on the RBD side of a write (Ceph timed out,
    refused or went away) rather than reading the image."""
    text = qemu_img_stderr.lower()
    return 'while writing' in text or 'rbd' in text or \
        'did not finish' in text or 'timed out' in text


def rbd_filename(info, ceph_conf=None, op_timeout=None):
    """QEMU's ``rbd:`` filename for an RBD connection info (``pool/image``,
    monitors, user), with the names checked as the exports check them.
    ``op_timeout``: seconds after which librados gives up on a monitor or
    OSD operation (and on connecting) instead of waiting for Ceph."""
    from agent.privileged import rbd_exports
    pool, _, image = (info.get('name') or '').partition('/')
    names = [pool, image] + ([info['auth_username']]
                             if info.get('auth_enabled') else [])
    hosts = list(zip(info.get('hosts') or [], info.get('ports') or []))
    if not hosts or not all(rbd_exports._NAME.match(n or '') for n in names) \
            or not all(rbd_exports._HOST.match(str(h)) and str(p).isdigit()
                       for h, p in hosts):
        raise errors.BackendUnavailable(
            backend='cinder', reason='unusable RBD connection info %r'
            % (info,))
    monitors = '\\;'.join('%s\\:%s' % (h, p) for h, p in hosts)
    name = 'rbd:%s/%s:mon_host=%s' % (pool, image, monitors)
    if info.get('auth_enabled'):
        name += ':id=%s' % info['auth_username']
    else:
        name += ':auth_supported=none'
    if ceph_conf and os.path.isfile(ceph_conf) and ':' not in ceph_conf:
        name += ':conf=%s' % ceph_conf
    if op_timeout:
        name += ''.join(':%s=%d' % (opt, op_timeout) for opt in (
            'rados_osd_op_timeout', 'rados_mon_op_timeout',
            'client_mount_timeout'))
    return name


class ExportedFile(io.FileIO):
    """A read-only file over an export that ends when the file closes."""

    def __init__(self, path, on_close):
        super().__init__(path, 'rb')
        self._on_close = on_close

    def close(self):
        try:
            super().close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close:
                on_close()
