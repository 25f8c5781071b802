"""The ``cinder`` volume backend against a real Cinder 29 on a real Ceph
(``tests/real_cinder.py``), with a real Glance as the image source.

Several agents on this machine act as hypervisors: each has its own
``state_path``, ``instances_path`` and ``[DEFAULT] host``, and all share
one Cinder project. This kernel has no ``rbd`` driver, so volumes are
attached through the userspace route (a ``qemu-storage-daemon`` FUSE export
and a loop device on it), chosen by the backend itself.
"""

import concurrent.futures
import contextlib
import glob
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid

import pytest

from agent import errors
from tests.conftest import AgentEnv, make_raw, overlay_equals, same_content
from tests.real_cinder import end_exports
from tests.real_cinder import real_cinder  # noqa: F401 (a fixture)
from tests.real_glance import real_glance  # noqa: F401 (a fixture)

CHAIN = 'volume_linking,downloading'
MiB = 1024 * 1024


# -- helpers ------------------------------------------------------------------
def host_env(root, name, glance, cinder, **sections):
    """An agent acting as hypervisor ``name``."""
    opts = cinder.agent_options()
    # one machine, several hosts: each its own exports (as each its own
    # /run on real hypervisors)
    opts['exports_path'] = os.path.join(str(root), name, 'exports')
    opts['operation_timeout'] = 120
    opts['template_wait_timeout'] = 300
    env = AgentEnv(os.path.join(str(root), name),
                   DEFAULT={'template_image_handler': CHAIN, 'host': name},
                   image_source={'driver': 'glance'},
                   glance={'api_servers': glance.url},
                   volume_linking={'backend': 'cinder'}, cinder=opts,
                   api={'socket_path': os.path.join(str(root), name,
                                                    'api.sock')})
    env.configure(**sections)
    env.host = name
    return env


def last_line(proc):
    return proc.stdout.strip().splitlines()[-1]


def agent_volumes(cinder, kind=None, image_id=None):
    """The agents' volumes in Cinder, with their decoded metadata."""
    found = []
    for volume in cinder.volumes():
        meta = {k.split(':', 1)[1]: json.loads(v)
                for k, v in volume['metadata'].items()
                if k.startswith('template-agent:')}
        if meta and kind in (None, meta.get('kind')) and \
                image_id in (None, meta.get('image_id')):
            found.append(dict(volume, agent=meta))
    return found


def exports(root):
    """The live qemu-storage-daemon exports of the hosts under ``root``:
    ``{mountpoint: pid}``."""
    found = {}
    for pidfile in glob.glob(os.path.join(str(root), '*', 'exports',
                                          '*.pid')):
        with contextlib.suppress(OSError, ValueError):
            with open(pidfile) as f:
                pid = int(f.read())
            os.kill(pid, 0)
            found[pidfile[:-4] + '.raw'] = pid
    return found


@pytest.fixture
def hosts(tmp_path, real_glance, real_cinder):
    """Three hosts sharing the session's Cinder; at the end every base
    is removed on every host, and nothing may stay attached or exported."""
    envs = [host_env(tmp_path, 'hv%d' % n, real_glance, real_cinder)
            for n in (1, 2, 3)]
    try:
        yield envs
    finally:
        for env in envs:
            listed = env.cli('list', '--format', 'json', check=False)
            for row in json.loads(listed.stdout or '[]'):
                env.cli('remove', row['image_id'], check=False)
            env.cli('init', check=False)
        # never leave a daemon or a loop device behind
        left = end_exports(glob.glob(os.path.join(str(tmp_path), '*',
                                                  'exports')))
        attached = [v['id'] for v in real_cinder.volumes()
                    if v['attachments']]
        for volume in real_cinder.volumes():
            for att in volume['attachments']:
                real_cinder.request('DELETE', '/attachments/%s'
                                    % att['attachment_id'], ok=(200, 404))
            real_cinder.request('DELETE', '/volumes/%s?cascade=true'
                                % volume['id'], ok=(202, 400, 404))
        assert left == [], 'exports left behind: %s' % left
        assert attached == [], 'volumes left attached: %s' % attached


@pytest.fixture
def image(real_glance, image_files):
    """A public qcow2 image in the real Glance."""
    record = real_glance.create_image('cinder-%s' % uuid.uuid4().hex[:6],
                                      image_files['disk.qcow2'],
                                      disk_format='qcow2',
                                      visibility='public')
    return record


# -- tests --------------------------------------------------------------------
def test_hosts_share_one_template_link_it_and_clone_it(
        hosts, image, image_files, real_cinder, tmp_path):
    image_id = image['id']
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        procs = list(pool.map(lambda env: env.cli('fetch', image_id),
                              hosts))
    bases = [last_line(proc) for proc in procs]

    # concurrent misses on three hosts: one template in Cinder
    template, = agent_volumes(real_cinder, 'template', image_id)
    assert template['agent']['status'] == 'available'
    assert template['multiattach'] is True
    # every host links it, read-only, and QEMU reads the image through it
    for base, proc in zip(bases, procs):
        assert os.path.islink(base), proc.stderr
        device = os.path.realpath(base)
        assert device.startswith('/dev/loop')
        assert overlay_equals(base, image_files['disk.raw'], tmp_path)
        assert subprocess.run(['qemu-img', 'compare', '-f', 'raw', '-F',
                               'qcow2', base, image_files['disk.qcow2']],
                              capture_output=True).returncode == 0
    # the holders are Cinder's attachment records, one per host
    attached = {a['host_name'] for a in real_cinder.wait_volume(
        template['id'], ('in-use',))['attachments']}
    assert attached == {'hv1', 'hv2', 'hv3'}
    rows = hosts[0].cli_json('cache', 'list')
    row, = [r for r in rows if r['image_id'] == image_id]
    assert row['volume_id'] == template['id']
    assert {h for h in row['holders'] if h.startswith('attachment:')} == \
        {'attachment:hv2', 'attachment:hv3'}
    assert any(h.startswith('link:hv1:') for h in row['holders'])
    # one userspace export per host, owned by the agents' exports dir
    assert len(exports(tmp_path)) == 3

    # volume create on a host: a Cinder clone of the template
    before = real_cinder.rbd_images()
    volume_id = last_line(hosts[1].cli('volume', 'create', '--image',
                                       image_id, '--size', '1'))
    clone = real_cinder.request('GET', '/volumes/%s' % volume_id)['volume']
    meta = {k.split(':', 1)[1]: json.loads(v)
            for k, v in clone['metadata'].items()
            if k.startswith('template-agent:')}
    assert meta['source_volume'] == template['id']
    assert clone['source_volid'] == template['id']
    after = real_cinder.rbd_images()
    new = set(after) - set(before)
    assert 'volume-%s' % volume_id in new
    # copy-on-write in the pool: the clone holds none of the image's bytes
    assert after['volume-%s' % volume_id] < 1 * MiB
    assert len(agent_volumes(real_cinder, 'template', image_id)) == 1

    # removed on every host: nothing attached, the template stays cached
    for env in hosts:
        env.cli('remove', image_id)
    assert real_cinder.wait_volume(template['id'], ('available',))[
        'attachments'] == []
    assert exports(tmp_path) == {}
    hosts[1].cli('volume', 'delete', volume_id)


def test_a_raw_image_goes_into_its_template_while_it_downloads(
        hosts, real_glance, real_cinder, tmp_path):
    """A raw image is copied into the claimed template range by range as
    it downloads, holes left as holes; every host reads the image."""
    hv1, hv2 = hosts[0], hosts[1]
    image_path = str(tmp_path / 'follow.raw')
    rnd = random.Random(5)
    with open(image_path, 'wb') as f:    # data, a hole, data, a hole
        f.write(rnd.randbytes(100 * MiB))
        f.seek(180 * MiB)
        f.write(rnd.randbytes(70 * MiB))
        f.truncate(300 * MiB)
    image_id = real_glance.create_image('follow', image_path,
                                        visibility='public')['id']
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda env: env.cli('-v', 'fetch', image_id),
                              (hv1, hv2)))
    for proc in procs:
        assert same_content(last_line(proc), image_path)
    written = [p.stderr for p in procs if 'while it downloaded' in p.stderr]
    assert len(written) == 1, [p.stderr[-2000:] for p in procs]
    assert 'stopped' not in written[0], written[0]
    template = agent_volumes(real_cinder, 'template', image_id)
    assert len(template) == 1, template
    used = real_cinder.rbd_images()['volume-%s' % template[0]['id']]
    # (RBD allocates 4 MiB objects)
    assert 170 * MiB <= used <= 178 * MiB, used


def test_no_host_evicts_a_template_attached_on_another(
        hosts, real_glance, image_files, real_cinder):
    hv1, hv2 = hosts[:2]
    first, second = (real_glance.create_image(
        'evict-%d' % n, image_files['disk.qcow2'], disk_format='qcow2',
        visibility='public')['id'] for n in (1, 2))
    hv1.cli('fetch', first)                 # attached on hv1
    template, = agent_volumes(real_cinder, 'template', first)
    # hv2 uses it too (a clone), then keeps at most one entry
    hv2.configure(image_volume_cache={'max_count': 1})
    clone = last_line(hv2.cli('volume', 'create', '--image', first,
                              '--size', '1'))
    hv2.cli('fetch', second)                # over the limit on hv2
    # hv2 could not evict the template hv1 has attached
    assert [v['id'] for v in agent_volumes(real_cinder, 'template',
                                           first)] == [template['id']]
    proc = hv2.cli('cache', 'evict', first, check=False)
    assert proc.returncode != 0 and 'attachment:hv1' in proc.stderr
    assert [v['id'] for v in agent_volumes(real_cinder, 'template',
                                           first)] == [template['id']]
    hv1.cli('remove', first)
    hv2.cli('remove', second)
    hv2.cli('volume', 'delete', clone)
    # released everywhere: now hv2 may evict it
    hv2.cli('cache', 'evict', first)
    assert agent_volumes(real_cinder, 'template', first) == []


def test_stale_image_gets_a_new_template_and_the_old_one_goes_after_the_last_detach(  # noqa: E501
        hosts, image, image_files, real_glance, real_cinder, tmp_path):
    hv1, hv2 = hosts[:2]
    image_id = image['id']
    base1 = last_line(hv1.cli('fetch', image_id))
    hv2.cli('fetch', image_id)
    old, = agent_volumes(real_cinder, 'template', image_id)
    time.sleep(1.1)          # Glance's updated_at has whole seconds
    real_glance.update(image_id, revision='2')

    # hv1's pass retires the old template for the whole fleet
    report = hv1.cli_json('prune', '--yes')
    assert image_id in report['cache_retired']
    old_now = {v['id']: v for v in agent_volumes(real_cinder)}[old['id']]
    assert old_now['agent']['state'] == 'stale'
    # a new fetch/clone anywhere makes (once) a new template
    volume_id = last_line(hv2.cli('volume', 'create', '--image', image_id,
                                  '--size', '1'))
    fresh = [v for v in agent_volumes(real_cinder, 'template', image_id)
             if v['id'] != old['id']]
    assert len(fresh) == 1
    # the existing bases keep serving the bits they were built on
    assert overlay_equals(base1, image_files['disk.raw'], tmp_path)

    hv1.cli('remove', image_id)
    # still attached on hv2: kept
    assert old['id'] in {v['id'] for v in agent_volumes(real_cinder)}
    hv2.cli('remove', image_id)
    hv2.cli('prune', '--yes')
    # the last host let go: deleted
    assert old['id'] not in {v['id'] for v in agent_volumes(real_cinder)}
    hv2.cli('volume', 'delete', volume_id)


def test_init_restores_links_and_userspace_exports(hosts, image,
                                                   image_files, tmp_path):
    hv1 = hosts[0]
    base = last_line(hv1.cli('fetch', image['id']))
    (mountpoint, pid), = exports(tmp_path).items()
    device = os.path.realpath(base)
    # the service and its daemons are gone, as after a kill of the unit
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists('/proc/%d' % pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    subprocess.run(['umount', '-l', mountpoint], capture_output=True)
    subprocess.run(['losetup', '-d', device], capture_output=True)
    assert not same_content(base, image_files['disk.qcow2'])

    report = hv1.cli_json('init')
    assert report['handlers']['volume_linking']['restored'], report
    assert len(exports(tmp_path)) == 1
    assert overlay_equals(base, image_files['disk.raw'], tmp_path)
    # a second init finds it intact
    report = hv1.cli_json('init')
    assert report['handlers']['volume_linking']['intact'], report
    assert overlay_equals(base, image_files['disk.raw'], tmp_path)


def test_cinder_down_is_a_clear_error_and_downloading_serves(
        hosts, image, image_files, real_cinder, tmp_path):
    hv3 = hosts[2]
    real_cinder.stop_cinder()
    try:
        status = hv3.cli_json('status')
        backend = status['volume_backend']
        assert backend['available'] is False
        assert 'Cinder at' in backend['reason']
        proc = hv3.cli('fetch', image['id'])
        base = last_line(proc)
        # served by the next handler: a regular file, verified
        assert os.path.isfile(base) and not os.path.islink(base)
        assert same_content(base, image_files['disk.qcow2'])
        proc = hv3.cli('volume', 'create', '--image', image['id'], '--size',
                       '1', check=False)
        assert proc.returncode != 0
        assert 'Cinder at' in proc.stderr
    finally:
        real_cinder.start_cinder()


def test_volume_backed_import_writes_a_cinder_volume_and_links_it(
        hosts, image_files, real_cinder, tmp_path):
    hv1 = hosts[0]
    hv1.configure(image_source={'driver': 'local'})
    hv1.cli('images', 'import', image_files['disk.raw'], '--id', 'vb',
            '--volume-backed')
    record, = [r for r in hv1.cli_json('images', 'list') if r['id'] == 'vb']
    location, = [loc['url'] if isinstance(loc, dict) else loc
                 for loc in record['locations']]
    assert location.startswith('cinder://')
    volume_id = location[len('cinder://'):]
    volume = {v['id']: v for v in agent_volumes(real_cinder)}[volume_id]
    assert volume['agent']['kind'] == 'image'
    assert volume['agent']['status'] == 'available'

    # linked from that very volume: no template, no copy
    base = last_line(hv1.cli('fetch', 'vb'))
    assert os.path.islink(base)
    assert same_content(base, image_files['disk.raw'])
    assert agent_volumes(real_cinder, 'template', 'vb') == []
    assert {a['host_name'] for a in real_cinder.wait_volume(
        volume_id, ('in-use',))['attachments']} == {'hv1'}
    hv1.cli('remove', 'vb')
    assert real_cinder.wait_volume(volume_id, ('available',))[
        'attachments'] == []


def test_cinder_stopped_while_a_template_is_written(
        hosts, real_glance, real_cinder, tmp_path):
    hv2 = hosts[1]
    image_path = make_raw(str(tmp_path / 'big.raw'), data_mib=192,
                          total_mib=256, seed=9)
    image_id = real_glance.create_image('mid-op', image_path,
                                        visibility='public')['id']
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fetch = pool.submit(hv2.cli, 'fetch', image_id, check=False)
        deadline = time.monotonic() + 120
        while not agent_volumes(real_cinder, 'template', image_id):
            assert time.monotonic() < deadline and not fetch.done()
            time.sleep(0.1)
        # the claim is made: hv2 is downloading or writing the template
        real_cinder.stop_cinder()
        try:
            proc = fetch.result(timeout=600)
        finally:
            real_cinder.start_cinder()
    assert proc.returncode == 0, proc.stderr
    base = last_line(proc)
    assert 'Cinder at' in proc.stderr           # what failed, and where
    assert os.path.isfile(base) and not os.path.islink(base)
    assert same_content(base, image_path)
    # what Cinder could not be told is cleaned once it is back (a volume
    # its cinder-volume was making when stopped stays creating until the
    # restarted service sets it to error)
    print('half-made template gone %.0f s after Cinder came back'
          % reclaim_until_clean(hv2, real_cinder, image_id))
    assert [v['id'] for v in real_cinder.volumes() if v['attachments']] \
        == []


def pool_usage(cinder):
    """``(images, used bytes)`` of the pool: every RBD image and
    snapshot, and ``rbd du``'s total."""
    images = cinder.rbd_images()
    return images, sum(images.values())


def test_cinder_create_from_image_clones_the_recorded_template(
        hosts, real_glance, real_cinder, tmp_path):
    hv1, hv2, hv3 = hosts
    locations_on = {'cinder': {'glance_locations': True},
                    'glance': {'auth_token': 'template-agent:%s'
                               % real_cinder.project_id}}
    hv1.configure(**locations_on)
    hv2.configure(**locations_on)
    # the image belongs to a project that is not the agents'
    user_project = uuid.uuid4().hex
    image_path = make_raw(str(tmp_path / 'clone.raw'), data_mib=48,
                          total_mib=64, seed=11)
    image = real_glance.create_image('clone-me', image_path,
                                     visibility='public', owner=user_project)
    image_id = image['id']

    base = last_line(hv1.cli('fetch', image_id))
    assert same_content(base, image_path)
    template, = agent_volumes(real_cinder, 'template', image_id)
    # recorded on the image once written and verified, for Cinder to clone
    locations = [loc['url'] for loc in real_glance.get(image_id)[
        'locations']]
    assert [u for u in locations if u.startswith('cinder://')
            and u.endswith('/' + template['id'])] or \
        'cinder://%s' % template['id'] in locations, locations
    assert real_cinder.request('GET', '/volumes/%s' % template['id'])[
        'volume']['metadata']['image_owner'] == user_project
    events = hv1.cli_json('status')['image_volume_cache']['events']
    assert events['location_added'] == 1, events
    # another host that sees the location still holds it as a template
    base2 = last_line(hv2.cli('fetch', image_id))
    assert os.path.realpath(base2).startswith('/dev/loop')
    row, = [r for r in hv2.cli_json('cache', 'list')
            if r['image_id'] == image_id]
    assert row['volume_id'] == template['id']

    # Cinder's own create-from-image, by the image's owner
    images_before, used_before = pool_usage(real_cinder)
    volumes_before = {v['id'] for v in real_cinder.volumes()}
    volume_id = real_cinder.request('POST', '/volumes', {'volume': {
        'size': 1, 'imageRef': image_id, 'name': 'from-image'}},
        project=user_project)['volume']['id']
    real_cinder.wait_volume(volume_id, timeout=300)
    images_after, used_after = pool_usage(real_cinder)
    print('pool before: %d images, %d bytes used: %s' % (
        len(images_before), used_before, images_before))
    print('pool after:  %d images, %d bytes used: %s' % (
        len(images_after), used_after, images_after))
    # no second copy: one new volume (no image-<id> cache volume of
    # Cinder's), a clone of the template's RBD image holding none of it
    assert {v['id'] for v in real_cinder.volumes()} - volumes_before == \
        {volume_id}
    new = set(images_after) - set(images_before)
    assert {n for n in new if '@' not in n} == {'volume-%s' % volume_id}
    # and the snapshot it is cloned from, on the template
    assert {n.split('@')[0] for n in new if '@' in n} <= {
        'volume-%s' % template['id']}, new
    info = json.loads(real_cinder.rbd('info', '--format', 'json',
                                      'volumes/volume-%s' % volume_id))
    assert info['parent']['image'] == 'volume-%s' % template['id'], info
    assert images_after['volume-%s' % volume_id] < MiB
    assert used_after - used_before < 4 * MiB     # the image holds 48 MiB
    # and it holds the image
    exported = str(tmp_path / 'exported.raw')
    real_cinder.rbd('export', 'volumes/volume-%s' % volume_id, exported,
                    timeout=120)
    size = os.path.getsize(image_path)
    with open(exported, 'rb') as got, open(image_path, 'rb') as want:
        assert got.read(size) == want.read()
        assert got.read().count(0) == os.path.getsize(exported) - size

    # a Glance that refuses the location (no token: Glance cannot ask
    # Cinder about the volume): the fetch works as without the option
    hv3.configure(cinder={'glance_locations': True})
    other = real_glance.create_image('refused', image_path,
                                     visibility='public',
                                     owner=user_project)['id']
    proc = hv3.cli('fetch', other)
    assert same_content(last_line(proc), image_path)
    assert 'not recorded in Glance' in proc.stderr
    events = hv3.cli_json('status')['image_volume_cache']['events']
    assert events['location_failed'] == 1 and \
        events['location_added'] == 0, events
    assert not [u for u in (loc['url'] for loc in real_glance.get(other)[
        'locations']) if u.startswith('cinder://')]

    # the template deleted: its location goes with it
    real_cinder.request('DELETE', '/volumes/%s' % volume_id,
                        project=user_project)
    real_cinder.wait_volume(volume_id, ('deleted',), timeout=120)
    hv1.cli('remove', image_id)
    hv2.cli('remove', image_id)
    hv1.cli('cache', 'evict', image_id)
    assert agent_volumes(real_cinder, 'template', image_id) == []
    assert not [u for u in (loc['url'] for loc in real_glance.get(
        image_id)['locations']) if u.startswith('cinder://')]
    assert hv1.cli_json('status')['image_volume_cache']['events'][
        'location_removed'] == 1


def reclaim_until_clean(env, cinder, image_id, timeout=300):
    """Run ``reclaim`` on ``env`` until no half-made template of the image
    is left (Cinder may still be finishing what it took while its storage
    was down); the seconds it took."""
    start = time.monotonic()
    while True:
        env.cli('reclaim')
        left = [(v['id'], v['status']) for v in agent_volumes(
            cinder, 'template', image_id)
            if v['agent'].get('status') == 'creating']
        if not left:
            return time.monotonic() - start
        assert time.monotonic() < start + timeout, \
            'half-made templates still there %d s after the stack came ' \
            'back: %s' % (timeout, left)
        time.sleep(2)


def loop_devices_under(root):
    """Loop devices whose backing file is under ``root``."""
    out = subprocess.run(['losetup', '-l', '-n', '-O', 'NAME,BACK-FILE'],
                         capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if len(line.split()) > 1 and
            line.split(None, 1)[1].strip().startswith(str(root))]


def processes_naming(text):
    """PIDs of live processes whose command line names ``text``."""
    found = []
    for pid in os.listdir('/proc'):
        with contextlib.suppress(OSError):
            if pid.isdigit():
                with open('/proc/%s/cmdline' % pid, 'rb') as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
    return found


def test_ceph_stopped_while_a_template_is_written(
        hosts, real_glance, real_cinder, tmp_path):
    hv1 = hosts[0]
    timeout = 30
    hv1.configure(cinder={'operation_timeout': timeout, 'timeout': timeout})
    image_path = make_raw(str(tmp_path / 'ceph.raw'), data_mib=255,
                          total_mib=320, seed=13)
    image_id = real_glance.create_image('ceph-stops', image_path,
                                        visibility='public')['id']
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fetch = pool.submit(hv1.cli, 'fetch', image_id, check=False)
        deadline = time.monotonic() + 300
        while True:     # until the template's RBD image takes bytes
            assert time.monotonic() < deadline and not fetch.done(), \
                fetch.result().stderr if fetch.done() else 'no write'
            template = agent_volumes(real_cinder, 'template', image_id)
            if template and real_cinder.rbd_images().get(
                    'volume-%s' % template[0]['id'], 0) > 0:
                break
            time.sleep(0.1)
        real_cinder.stop_ceph()
        stopped = time.monotonic()
        try:
            proc = fetch.result(timeout=1200)
            took = time.monotonic() - stopped
            left = {'exports': exports(tmp_path),
                    'loops': loop_devices_under(tmp_path),
                    'qemu': processes_naming('volume-%s'
                                             % template[0]['id'])}
        finally:
            real_cinder.start_ceph()
    print('fetch ended %.0f s after Ceph stopped; stderr:\n%s'
          % (took, proc.stderr))
    # the downloading handler served, verified; nothing partial linked
    assert proc.returncode == 0, proc.stderr
    base = last_line(proc)
    assert os.path.isfile(base) and not os.path.islink(base)
    assert same_content(base, image_path)
    # what failed, where, and what to do
    assert 'handler volume_linking failed' in proc.stderr
    # (the write fails on Ceph, or, when Ceph stops while the template is
    # attached, Cinder's attach, which waits on Ceph, times out)
    assert 'Check that Ceph (monitors and OSDs) answers' in proc.stderr \
        or 'Check that Cinder (api, scheduler, volume) and its storage ' \
        'are up' in proc.stderr, proc.stderr
    # bounded by the configured timeouts, not by Ceph's return
    assert took < 8 * timeout, took
    assert left == {'exports': {}, 'loops': [], 'qemu': []}, left
    # what Ceph could not do is cleaned once it is back
    # (Cinder may still be finishing the delete it took while Ceph was
    # down: its RBD client reconnects with a backoff, slower on a loaded
    # machine)
    print('half-written template gone %.0f s after Ceph came back'
          % reclaim_until_clean(hv1, real_cinder, image_id))
    assert [v['id'] for v in real_cinder.volumes() if v['attachments']] \
        == []


def test_reclaim_deletes_a_template_an_unfinished_attachment_reserves(
        hosts, real_cinder):
    """An attachment POST that timed out after Cinder carried it out
    leaves the template being written ``reserved`` (and a second POST is
    never sent: it would be refused). ``reclaim`` removes that unfinished
    attachment of its own unfinished template, then the template."""
    hv1, hv2 = hosts[0], hosts[1]
    meta = {'template-agent:' + k: json.dumps(v) for k, v in {
        'kind': 'template', 'status': 'creating', 'host': 'hv1',
        'image_id': 'lost-answer', 'created': time.time()}.items()}
    volume = real_cinder.request('POST', '/volumes', {'volume': {
        'size': 1, 'name': 'lost-answer', 'metadata': meta}})['volume']
    real_cinder.wait_volume(volume['id'])
    attachment = real_cinder.request('POST', '/attachments', {'attachment': {
        'volume_uuid': volume['id']}})['attachment']
    assert real_cinder.wait_volume(volume['id'], ('reserved',))[
        'status'] == 'reserved'
    # not another host's to reclaim
    hv2.cli('reclaim')
    assert real_cinder.wait_volume(volume['id'], ('reserved',))
    hv1.cli('reclaim')
    gone = real_cinder.wait_volume(volume['id'], ('deleted',))
    assert gone is None, gone
    # the attachment went with it (any status but 404 raises)
    real_cinder.request('GET', '/attachments/%s' % attachment['id'],
                        ok=(404,))


def test_a_tampered_image_missed_on_several_hosts_leaves_no_template(
        hosts, real_glance, real_cinder, tmp_path):
    """Three hosts miss at once on an image whose stored bytes no longer
    match its hash. The host whose claim wins downloads, finds the
    mismatch and gives the template up, while the others wait for it (and
    attach it ahead); they let go, claim in turn and fail the same way.
    Nothing is linked or published, and nothing stays attached, exported
    or in Cinder."""
    image_path = make_raw(str(tmp_path / 'tampered.raw'), data_mib=100,
                          total_mib=128, seed=21)
    image_id = real_glance.create_image('tampered', image_path,
                                        visibility='public')['id']
    stored = os.path.join(real_glance.workdir, 'images', image_id)
    with open(stored, 'r+b') as f:  # one bit flipped in the store
        f.seek(64 * MiB)
        byte = f.read(1)[0]
        f.seek(64 * MiB)
        f.write(bytes([byte ^ 1]))
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        procs = list(pool.map(lambda env: env.cli('fetch', image_id,
                                                  check=False), hosts))
    for env, proc in zip(hosts, procs):
        assert proc.returncode != 0, proc.stdout
        assert 'corrupt or was tampered with' in proc.stderr, proc.stderr
        assert env.base_files() == []
    # every claim given up is deleted by the fetches themselves (the last
    # host attached to it lets go and deletes it), not left to reclaim
    deadline = time.monotonic() + 120
    while agent_volumes(real_cinder, 'template', image_id):
        assert time.monotonic() < deadline, agent_volumes(
            real_cinder, 'template', image_id)
        time.sleep(1)
    assert [v['id'] for v in real_cinder.volumes() if v['attachments']] \
        == []
    assert exports(tmp_path) == {}


def test_an_export_ceph_does_not_answer_is_a_ceph_error(tmp_path):
    """Ceph stopping between Cinder's attachment and the export leaves
    the userspace route's daemon waiting on the monitors: the wait is
    bounded, the error names Ceph, and nothing stays exported."""
    from agent import config
    from agent.volumes.cinder import CinderVolumeBackend
    exports_dir = tmp_path / 'exports'
    conf_file = tmp_path / 'agent.conf'
    conf_file.write_text(
        '[DEFAULT]\nstate_path = %s\nhost = hv1\n'
        '[volume_linking]\nbackend = cinder\n'
        '[cinder]\nexports_path = %s\noperation_timeout = 3\n'
        % (tmp_path / 'state', exports_dir))
    backend = CinderVolumeBackend(config.load([str(conf_file)]))
    # a monitor that takes the connection and never says a word
    mon = socket.socket()
    mon.bind(('127.0.0.1', 0))
    mon.listen(16)
    try:
        started = time.monotonic()
        with pytest.raises(errors.VolumeExportFailed) as failed:
            backend._start_export(
                'c0a8e3f2-54a1-4a5e-9a39-1d2f5e3b7c11.write',
                'c0a8e3f2-54a1-4a5e-9a39-1d2f5e3b7c11',
                {'name': 'volumes/volume-c0a8e3f2', 'hosts': ['127.0.0.1'],
                 'ports': [str(mon.getsockname()[1])]}, read_only=False)
        took = time.monotonic() - started
    finally:
        mon.close()
        end_exports([str(exports_dir)])
    assert 'Check that Ceph (monitors and OSDs) answers' in str(
        failed.value), failed.value
    assert 'volumes/volume-c0a8e3f2' in str(failed.value)
    assert took < 3 + 15, took     # the timeout and the stop's grace
    assert os.listdir(exports_dir) == []
    assert processes_naming('volume-c0a8e3f2') == []
