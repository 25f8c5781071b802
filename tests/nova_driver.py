"""Drive real nova code on a base image, inside nova's own venv.

Run by ``tests/real_nova.py`` as ``<nova venv>/bin/python nova_driver.py``
with one JSON request on stdin; prints one JSON answer on stdout. It imports
nova and the standard library only (never the agent or pytest): it stands
for nova-compute on the same host as the agent.

Set-up is the one nova's own unit tests use, without a database or any
service: ``nova.conf.CONF`` parsed with no files, the options set, the
versioned objects registered, privsep forked (see below).

Requests (``op``):

``cache``
    what the libvirt driver's ``_try_fetch_image_cache`` does for the root
    disk of an instance: ``Backend(use_cow_images).by_name(instance,
    'disk').cache(fetch_func, context, filename, image_id, size,
    trusted_certs)``. ``fetch_func`` stands for ``libvirt_utils.fetch_image``:
    it records that nova downloaded, optionally waits (``fetch_wait``: until
    a file exists, holding nova's lock meanwhile), and writes the image as
    raw with ``.part`` and a rename, as ``images.fetch_to_raw`` does.
    With ``forbid_fetch`` it records the call and raises instead: nova
    must never download a base the agent made, and the answer's
    ``fetched`` and ``error`` say whether it tried. ``fetching_file`` is
    written when ``fetch_func`` starts (nova then holds its lock).
``hold_lock``
    take nova's own external lock for a base (``utils.synchronized(
    filename, external=True, lock_path=$instances_path/locks)``, the one
    ``cache()`` takes), write ``ready_file`` once it is held, hold it until
    ``release_file`` exists; answers when it was acquired and released.
``update``
    nova's cache manager pass, ``imagecache.ImageCacheManager().update(
    context, instances)``, with the block device mapping lookup stubbed to
    return none (there is no database: this is the only stub).

Privileged calls (``nova.privsep``: utime, ...) go to a real privsep
daemon of ``nova.privsep.sys_admin_pctxt`` with nova's capabilities,
forked from this process (oslo.privsep's ``Method.FORK``, possible since
the tests run as root) rather than started through sudo and
nova-rootwrap, which are not configured on a test machine.
"""

import json
import os
import subprocess
import sys
import time
from unittest import mock


def configure(req):
    import nova.conf
    from oslo_concurrency import lockutils  # registers [oslo_concurrency]
    conf = nova.conf.CONF
    conf([], project='nova', default_config_files=[])
    conf.set_override('instances_path', req['instances_path'])
    conf.set_override('subdirectory_name', req.get('subdirectory_name',
                                                   '_base'),
                      group='image_cache')
    conf.set_override('images_type', req.get('images_type', 'default'),
                      group='libvirt')
    conf.set_override('use_cow_images', req.get('use_cow_images', True))
    lockutils.set_defaults(os.path.join(req['instances_path'], 'locks'))
    for name, value in req.get('image_cache', {}).items():
        conf.set_override(name, value, group='image_cache')

    from nova import objects
    objects.register_all()
    import nova.privsep
    from oslo_privsep import priv_context
    # privileged calls (utime, ...) go to a real privsep daemon with nova's
    # capabilities, forked from this process (it runs as root) instead of
    # started through sudo and rootwrap, which are not configured here
    nova.privsep.sys_admin_pctxt.start(priv_context.Method.FORK)
    return conf


def make_instance(conf, spec):
    from nova import objects
    from nova.compute import vm_states
    return objects.Instance(
        id=spec.get('id', 1), uuid=spec['uuid'], image_ref=spec['image_id'],
        kernel_id=None, ramdisk_id=None, host=conf.host,
        task_state=None, vm_state=vm_states.ACTIVE, trusted_certs=None,
        os_type=None, migration_context=None)


def op_cache(conf, req):
    from nova import context as nova_context
    from nova.virt.libvirt import imagebackend
    from nova.virt.libvirt import imagecache

    events = []

    def fetch_func(context, target, image_id, trusted_certs=None):
        events.append({'event': 'fetch', 'target': target,
                       'image_id': image_id, 'at': time.time()})
        if req.get('forbid_fetch'):
            raise RuntimeError('nova tried to download image %s into %s'
                               % (image_id, target))
        if req.get('fetching_file'):
            with open(req['fetching_file'], 'w') as f:
                f.write('%f\n' % time.time())
        wait = req.get('fetch_wait')
        if wait:
            deadline = time.monotonic() + wait['timeout']
            while not os.path.exists(wait['until']):
                if time.monotonic() > deadline:
                    raise RuntimeError('fetch_wait timed out')
                time.sleep(0.05)
        part = target + '.part'
        subprocess.run(['qemu-img', 'convert', '-f', req['source_format'],
                        '-O', 'raw', req['source'], part], check=True,
                       capture_output=True)
        os.rename(part, target)
        events.append({'event': 'fetched', 'at': time.time()})

    ctx = nova_context.RequestContext('user', 'project')
    instance = make_instance(conf, req['instance'])
    image_id = req['instance']['image_id']
    # the driver makes the instance directory first (_create_image)
    os.makedirs(os.path.join(conf.instances_path, instance.uuid),
                exist_ok=True)
    backend = imagebackend.Backend(conf.use_cow_images)
    disk = backend.by_name(instance, 'disk')
    started = time.time()
    if req.get('ready_file'):
        with open(req['ready_file'], 'w') as f:
            f.write('%f\n' % started)
    error = None
    try:
        # as the libvirt driver's _try_fetch_image_cache
        disk.cache(fetch_func=fetch_func, context=ctx,
                   filename=imagecache.get_cache_fname(image_id),
                   image_id=image_id, size=req.get('size'),
                   trusted_certs=instance.trusted_certs)
    except Exception as exc:
        error = '%s: %s' % (type(exc).__name__, exc)
    return {'backend': type(disk).__name__, 'disk': disk.path,
            'driver_format': disk.driver_format, 'error': error,
            'fetched': [e for e in events if e['event'] == 'fetch'],
            'events': events, 'started': started, 'finished': time.time()}


def op_hold_lock(conf, req):
    from nova import utils
    lock_path = os.path.join(conf.instances_path, 'locks')
    times = {}

    @utils.synchronized(req['filename'], external=True, lock_path=lock_path)
    def held():
        times['acquired'] = time.time()
        with open(req['ready_file'], 'w') as f:
            f.write('%f\n' % times['acquired'])
        deadline = time.monotonic() + req.get('timeout', 60)
        while not os.path.exists(req['release_file']):
            if time.monotonic() > deadline:
                raise RuntimeError('release_file never appeared')
            time.sleep(0.02)
        times['released'] = time.time()

    times['requested'] = time.time()
    held()
    return times


def op_update(conf, req):
    from nova import context as nova_context
    from nova import objects
    from nova.virt.libvirt import imagecache

    ctx = nova_context.RequestContext('user', 'project')
    instances = [make_instance(conf, spec) for spec in req['instances']]
    base_dir = os.path.join(conf.instances_path,
                            conf.image_cache.subdirectory_name)
    before = sorted(os.listdir(base_dir)) if os.path.isdir(base_dir) else []
    with mock.patch.object(objects.BlockDeviceMappingList,
                           'bdms_by_instance_uuid', return_value={}):
        manager = imagecache.ImageCacheManager()
        manager.update(ctx, instances)
    after = sorted(os.listdir(base_dir)) if os.path.isdir(base_dir) else []
    return {'removed': sorted(set(before) - set(after)),
            'active': sorted(manager.active_base_files),
            'removable': sorted(manager.removable_base_files)}


def main():
    req = json.load(sys.stdin)
    conf = configure(req)
    answer = {'cache': op_cache, 'update': op_update,
              'hold_lock': op_hold_lock}[req['op']](conf, req)
    json.dump(answer, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    # nova's imports are noisy (eventlet deprecation): keep stdout JSON only
    sys.exit(main())
