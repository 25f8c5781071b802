"""Volume linking on real things: loop devices, XFS with reflink and
ext4 on loop devices, qcow2 overlays built on linked bases and read back
through the chain with ``qemu-img compare``, libvirt's test driver, the CLI
in subprocesses and the core calls in threads.

Every test ends with nothing attached: the autouse fixture below fails a
test that leaves a loop device over one of its files (and detaches it).
"""

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.conftest import (REPO, AgentEnv, make_raw, overlay_equals,
                            same_content)

MiB = 1024 * 1024
GiB = 1024 * MiB
CHAIN = 'volume_linking,downloading'


# -- helpers ------------------------------------------------------------------
def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


def loops(detaching=False):
    """``[(device, backing file)]`` of the attached loop devices.

    ``losetup -d`` on a device that something still holds open (e.g. the
    host's udev probing it) only sets autoclear: the kernel detaches it
    once closed. Those are left out unless ``detaching``.
    """
    out = subprocess.run(['losetup', '-l', '-n', '-O',
                          'NAME,AUTOCLEAR,BACK-FILE'],
                         capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        name, autoclear, back = (line.split(None, 2) + ['', ''])[:3]
        if autoclear != '1' or detaching:
            found.append((name, back.strip()))
    return found


def loops_under(root):
    root = str(root).rstrip('/') + '/'
    return sorted(n for n, b in loops() if b.startswith(root))


def backing_of(device):
    """The file behind an attached loop device, or None."""
    for name, back in loops():
        if name == device:
            return back
    return None


def read_only(device):
    """Whether the loop device is read-only: flagged so, and a write to
    it fails."""
    flag = subprocess.run(['losetup', '-n', '-O', 'RO', '-l', device],
                          capture_output=True, text=True,
                          check=True).stdout.strip()
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, b'\0' * 512)
    except OSError:
        return flag == '1'
    finally:
        os.close(fd)
    return False


def detach(devices):
    for device in devices:
        subprocess.run(['losetup', '-d', device], capture_output=True)


def unplug(prefix):
    """Detach every loop device over a file whose path starts with
    ``prefix`` and wait until the kernel has let them go, as after a
    reboot."""
    gone = [(n, b) for n, b in loops() if b.startswith(str(prefix))]
    detach(n for n, _ in gone)
    deadline = time.monotonic() + 10
    while set(gone) & set(loops(detaching=True)) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(gone) & set(loops(detaching=True))


def compare(a, b, fa=None, fb=None):
    """``qemu-img compare``, with explicit formats when given."""
    cmd = ['qemu-img', 'compare']
    cmd += ['-f', fa] if fa else []
    cmd += ['-F', fb] if fb else []
    return subprocess.run(cmd + [a, b], capture_output=True).returncode == 0


def sparse_qcow2(path, virtual, pattern):
    """A qcow2 of ``virtual`` size with 64 KiB of ``pattern`` at 0: big for
    the cache limits, tiny on disk and fast to convert."""
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', path, virtual],
                   check=True, capture_output=True)
    subprocess.run(['qemu-io', '-c', 'write -P %d 0 64k' % pattern, path],
                   check=True, capture_output=True)
    return path


def set_locations(env, image_id, urls):
    """Give a local-catalog image these locations (as an admin would in
    Glance)."""
    path = os.path.join(env.state, 'catalog', image_id + '.json')
    with open(path) as f:
        record = json.load(f)
    record['locations'] = [{'url': u, 'metadata': {}} for u in urls]
    with open(path, 'w') as f:
        json.dump(record, f)


def volume_file(env, volume_id):
    return os.path.join(env.volumes, 'volume-' + volume_id)


def templates(env, image_id=None):
    """Template volumes (``volume list``, in this process)."""
    with agent_of(env) as agent:
        volumes = agent.volumes.list_volumes()
    return [v for v in volumes if v['metadata'].get('kind') == 'template'
            and image_id in (None, v['metadata'].get('image_id'))]


@contextlib.contextmanager
def agent_of(env):
    """The core calls the CLI makes, in this process."""
    agent = env.agent()
    try:
        yield agent
    finally:
        agent.close()


def entries_by_image(agent):
    result = {}
    for entry in agent.volumes.cache_list():
        result.setdefault(entry['image_id'], []).append(entry)
    return result


def events(agent):
    return agent.status()['image_volume_cache']['events']


def cli_ok(env, *args):
    """Run the CLI; return its last stdout line."""
    return env.cli(*args).stdout.strip().splitlines()[-1]


# -- fixtures -----------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_leaked_loop_devices(tmp_path):
    """Fail a test that leaves a loop device over any of its files (the
    agent's own remove/prune/delete must have detached it); detach it
    anyway so later tests are not affected."""
    before = loops()
    assert [n for n, b in before if b.startswith(str(tmp_path) + '/')] == []
    leaked = []
    try:
        yield
    finally:
        leaked = [(n, b) for n, b in loops()
                  if b.startswith(str(tmp_path) + '/')]
        detach(n for n, _ in leaked)
    assert leaked == [], 'loop devices left attached: %s' % leaked
    assert loops_under(tmp_path) == []


@pytest.fixture
def lenv(tmp_path):
    # a private API socket: never a service that may run on this host
    env = AgentEnv(tmp_path, DEFAULT={'template_image_handler': CHAIN},
                   api={'socket_path': tmp_path / 'api.sock'})
    env.volumes = os.path.join(env.state, 'volumes')
    return env


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Images of this module (the session's ``image_files`` are used too)."""
    d = tmp_path_factory.mktemp('vl-images')
    files = {
        'alt.raw': make_raw(str(d / 'alt.raw'), data_mib=2, total_mib=8,
                            seed=2),
        'new.raw': make_raw(str(d / 'new.raw'), data_mib=2, total_mib=8,
                            seed=5),
        'huge.qcow2': sparse_qcow2(str(d / 'huge.qcow2'), '2G', 0x11),
    }
    for n in range(1, 4):
        files['big%d.qcow2' % n] = sparse_qcow2(
            str(d / ('big%d.qcow2' % n)), '600M', 0x20 + n)
        files['small%d.raw' % n] = make_raw(
            str(d / ('small%d.raw' % n)), data_mib=1, total_mib=8,
            seed=10 + n)
    return files


@pytest.fixture
def loop_fs(request, tmp_path):
    """A filesystem made on a loop device and mounted under ``tmp_path``:
    ``'xfs'`` with reflink, or ``'ext4'`` (no reflink). Unmounted and
    detached at the end, also when the test fails; loop devices left over
    files on it fail the test."""
    kind = request.param
    img = str(tmp_path / ('%s.img' % kind))
    mnt = str(tmp_path / kind)
    os.makedirs(mnt)
    with open(img, 'wb') as f:
        f.truncate(512 * MiB)
    dev, mounted, leaked = None, False, []
    try:
        dev = subprocess.run(['losetup', '-f', '--show', img], check=True,
                             capture_output=True, text=True).stdout.strip()
        mkfs = (['mkfs.xfs', '-q', '-f', '-m', 'reflink=1'] if kind == 'xfs'
                else ['mkfs.ext4', '-q', '-F'])
        subprocess.run(mkfs + [dev], check=True, capture_output=True)
        subprocess.run(['mount', dev, mnt], check=True, capture_output=True)
        mounted = True
        yield kind, mnt
    finally:
        leaked = loops_under(mnt)
        detach(leaked)
        if mounted:
            # the kernel drops a detached loop device's file asynchronously
            # (autoclear): the filesystem can be busy for a moment
            deadline = time.monotonic() + 10
            while subprocess.run(['umount', mnt],
                                 capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    subprocess.run(['umount', '-l', mnt])
                    break
                time.sleep(0.1)
        if dev:
            deadline = time.monotonic() + 10
            while backing_of(dev) == img and time.monotonic() < deadline:
                detach([dev])
                time.sleep(0.1)
    assert leaked == [], 'loop devices left over %s: %s' % (mnt, leaked)


# -- 1. fetch via a link ------------------------------------------------------
def test_fetch_links_raw_and_qcow2_and_a_second_fetch_hits(
        lenv, image_files, images, tmp_path, caplog):
    sources = {'img-raw': image_files['disk.raw'],
               'img-qcow2': image_files['disk.qcow2']}
    with agent_of(lenv) as agent:
        for image_id, src in sources.items():
            agent.import_image(src, image_id)
        paths = {i: agent.fetch_image(i) for i in sources}
        volumes = {e['image_id']: e['volume_id']
                   for e in agent.volumes.cache_list()}

    targets = {}
    for image_id, src in sources.items():
        path = paths[image_id]
        assert path == os.path.join(lenv.base_dir, sha1(image_id))
        assert os.path.islink(path)
        targets[image_id] = os.path.realpath(path)
        assert re.match(r'^/dev/loop\d+$', targets[image_id])
        assert stat.S_ISBLK(os.stat(path).st_mode)
        # the device is the image's template volume, exported read-only
        assert backing_of(targets[image_id]) == volume_file(
            lenv, volumes[image_id])
        assert read_only(targets[image_id])
        assert overlay_equals(path, src, tmp_path)
        assert not overlay_equals(path, images['alt.raw'], tmp_path)
    assert targets['img-raw'] != targets['img-qcow2']

    # the qcow2 was converted to raw, once, into its template
    qcow2_template = volume_file(lenv, volumes['img-qcow2'])
    info = json.loads(subprocess.run(
        ['qemu-img', 'info', '-U', '--output=json', qcow2_template],
        check=True, capture_output=True, text=True).stdout)
    assert info['format'] == 'raw' and info['virtual-size'] == 8 * MiB
    assert compare(qcow2_template, image_files['disk.qcow2'], 'raw', 'qcow2')

    rows = {r['image_id']: r for r in lenv.cli_json('list')}
    for image_id in sources:
        assert rows[image_id]['handler'] == 'volume_linking'
        assert rows[image_id]['target'] == targets[image_id]
    status = lenv.cli_json('status')
    assert status['volume_backend']['backend'] == 'local'
    cache = status['image_volume_cache']
    assert cache['events'] == {'hit': 0, 'miss': 2, 'evict': 0}
    assert cache['entries'] == 2 and cache['held'] == 2
    assert len(templates(lenv)) == 2

    with agent_of(lenv) as agent:
        # idempotent: the same link, no new template, no cache event
        assert agent.fetch_image('img-raw') == paths['img-raw']
        assert os.path.realpath(paths['img-raw']) == targets['img-raw']
        assert events(agent) == {'hit': 0, 'miss': 2, 'evict': 0}

        # removed: link gone, device detached, template kept, unheld
        agent.remove_image('img-raw')
        assert not os.path.lexists(paths['img-raw'])
        assert loops_under(tmp_path) == [targets['img-qcow2']]
        entry, = entries_by_image(agent)['img-raw']
        assert entry['holders'] == [] and entry['state'] == 'fresh'

        # fetched again: a hit on the same template, logged as an event
        with caplog.at_level(logging.INFO, logger='agent.events'):
            path = agent.fetch_image('img-raw')
        logged = [json.loads(r.getMessage()) for r in caplog.records
                  if r.name == 'agent.events']
        assert logged == [{
            'event': 'image_volume_cache.hit', 'image_id': 'img-raw',
            'volume_id': volumes['img-raw'],
            'host': agent.context.image_volume_cache.host}]
        assert events(agent) == {'hit': 1, 'miss': 2, 'evict': 0}
        entry, = entries_by_image(agent)['img-raw']
        assert entry['volume_id'] == volumes['img-raw']
        assert entry['holders'] == ['link:%s:%s' % (
            agent.context.image_volume_cache.host, path)]
        assert backing_of(os.path.realpath(path)) == volume_file(
            lenv, volumes['img-raw'])
        assert overlay_equals(path, sources['img-raw'], tmp_path)

        for image_id in sources:
            agent.remove_image(image_id)
        assert lenv.base_files() == []
        assert loops_under(tmp_path) == []
    # the templates stay cached for the next hit
    cache = lenv.cli_json('status')['image_volume_cache']
    assert cache['events'] == {'hit': 1, 'miss': 2, 'evict': 0}
    assert cache['entries'] == 2 and cache['held'] == 0


# -- 2. volume-backed images and bad input ------------------------------------
def test_volume_backed_image_links_its_own_volume(lenv, image_files,
                                                  tmp_path):
    record = lenv.cli_json('images', 'import', image_files['disk.raw'],
                           '--id', 'vb', '--volume-backed', '--owner', 'p1')
    url = record['locations'][0]['url']
    assert url.startswith('cinder://')
    volume_id = url[len('cinder://'):]
    volume, = lenv.cli_json('volume', 'list')
    assert volume['id'] == volume_id
    assert volume['metadata'] == dict(volume['metadata'], kind='image',
                                      image_id='vb')
    assert compare(volume_file(lenv, volume_id), image_files['disk.raw'],
                   'raw', 'raw')

    with agent_of(lenv) as agent:
        path = agent.fetch_image('vb', project_id='p1')
        entry = agent.index.get(sha1('vb'))
        assert (entry.handler, entry.origin, entry.volume_id) == (
            'volume_linking', 'location', volume_id)
        device = os.path.realpath(path)
        assert backing_of(device) == volume_file(lenv, volume_id)
        assert overlay_equals(path, image_files['disk.raw'], tmp_path)
        # zero copy: no template, no cache entry, no cache event
        assert agent.volumes.cache_list() == []
        assert events(agent) == {'hit': 0, 'miss': 0, 'evict': 0}
        assert [v['id'] for v in agent.volumes.list_volumes()] == [volume_id]

        agent.remove_image('vb')
        assert loops_under(tmp_path) == []
        assert os.path.isfile(volume_file(lenv, volume_id))

        # the cinder://<store>/<volume-id> form links the same volume
        set_locations(lenv, 'vb', ['cinder://default/' + volume_id])
        path = agent.fetch_image('vb', project_id='p1')
        assert backing_of(os.path.realpath(path)) == \
            volume_file(lenv, volume_id)
        assert agent.index.get(sha1('vb')).origin == 'location'
        assert agent.volumes.cache_list() == []
        agent.remove_image('vb')
    assert loops_under(tmp_path) == []


def test_volume_location_of_another_project_is_refused(lenv, image_files,
                                                       tmp_path):
    """Cinder's rule: a volume location only for the owner. A shared image
    of p1 is then downloaded for p2 (the cache may not share it either); a
    public one goes through the cache (a template of its own, never a link
    to p1's volume)."""
    with agent_of(lenv) as agent:
        shared = agent.import_image(image_files['disk.raw'], 'vb-shared',
                                    volume_backed=True, owner='p1')
        public = agent.import_image(image_files['disk.raw'], 'vb-public',
                                    volume_backed=True, owner='p1',
                                    visibility='public')
        image_volumes = {shared.volume_location, public.volume_location}

        path = agent.fetch_image('vb-shared', project_id='p2')
        entry = agent.index.get(sha1('vb-shared'))
        assert entry.handler == 'downloading'
        assert os.path.isfile(path) and not os.path.islink(path)
        assert compare(path, image_files['disk.raw'], 'raw', 'raw')
        assert 'vb-shared' not in entries_by_image(agent)

        path = agent.fetch_image('vb-public', project_id='p2')
        entry = agent.index.get(sha1('vb-public'))
        assert (entry.handler, entry.origin) == ('volume_linking', 'cache')
        assert entry.volume_id not in image_volumes
        cache_entry, = entries_by_image(agent)['vb-public']
        assert cache_entry['volume_id'] == entry.volume_id
        assert backing_of(os.path.realpath(path)) == volume_file(
            lenv, entry.volume_id)
        assert overlay_equals(path, image_files['disk.raw'], tmp_path)

        # encrypted images are never cached: downloaded
        agent.import_image(image_files['disk.raw'], 'enc',
                           properties={'img_encrypted': True})
        path = agent.fetch_image('enc')
        assert agent.index.get(sha1('enc')).handler == 'downloading'
        assert not os.path.islink(path)
        assert sorted(entries_by_image(agent)) == ['vb-public']

        for image_id in ('vb-shared', 'vb-public', 'enc'):
            agent.remove_image(image_id)
        assert lenv.base_files() == []


def test_volume_location_on_a_non_raw_image_is_refused(lenv, image_files,
                                                       images, tmp_path):
    """A qcow2 image whose location names a volume (here one holding other
    bits, so a wrong link would show) is never linked to that volume: the
    cache converts the qcow2 into a template of its own."""
    with agent_of(lenv) as agent:
        trap = agent.import_image(images['alt.raw'], 'trap',
                                  volume_backed=True)
        agent.import_image(image_files['disk.qcow2'], 'vq')
        set_locations(lenv, 'vq', ['cinder://' + trap.volume_location])
        assert agent.source.get('vq').volume_location == \
            trap.volume_location

        path = agent.fetch_image('vq')
        entry = agent.index.get(sha1('vq'))
        assert (entry.handler, entry.origin) == ('volume_linking', 'cache')
        assert entry.volume_id != trap.volume_location
        assert overlay_equals(path, image_files['disk.qcow2'], tmp_path)
        assert not overlay_equals(path, images['alt.raw'], tmp_path)
        agent.remove_image('vq')


def test_missing_volume_falls_through(lenv, image_files, tmp_path):
    with agent_of(lenv) as agent:
        # the location names a volume that does not exist, the catalog
        # still has the bits: downloading serves
        agent.import_image(image_files['disk.raw'], 'mv')
        set_locations(lenv, 'mv', ['cinder://%s' % uuid.uuid4()])
        path = agent.fetch_image('mv')
        assert agent.index.get(sha1('mv')).handler == 'downloading'
        assert os.path.isfile(path) and not os.path.islink(path)
        assert compare(path, image_files['disk.raw'], 'raw', 'raw')
        assert agent.volumes.cache_list() == []
        assert agent.volumes.list_volumes() == []

        gone = agent.import_image(image_files['disk.raw'], 'gone',
                                  volume_backed=True)
    # a volume-backed image whose only copy was deleted: every handler
    # fails, nothing is published, nothing stays attached
    assert cli_ok(lenv, 'volume', 'delete', gone.volume_location) == \
        'deleted %s' % gone.volume_location
    proc = lenv.cli('fetch', 'gone', check=False)
    assert proc.returncode == 1
    assert gone.volume_location in proc.stderr
    assert 'not found' in proc.stderr
    assert lenv.base_files() == [sha1('mv')]
    assert lenv.cli_json('volume', 'list') == []
    assert lenv.cli_json('cache', 'list') == []
    cli_ok(lenv, 'remove', 'mv')


def test_volume_too_small(lenv, image_files, images, tmp_path):
    lenv.configure(glance={'num_retries': 0})
    with agent_of(lenv) as agent:
        short = agent.import_image(image_files['disk.raw'], 'short',
                                   volume_backed=True)
        agent.import_image(images['huge.qcow2'], 'huge')
    # the volume lost its second half: refused by the link, and the bits
    # cannot be read for a download either
    os.truncate(volume_file(lenv, short.volume_location), 4 * MiB)
    proc = lenv.cli('fetch', 'short', check=False)
    assert proc.returncode == 1
    assert 'handler volume_linking failed' in proc.stderr
    assert 'too small' in proc.stderr
    # fell through to downloading, which reads the same short volume
    assert 'Download of image short failed' in proc.stderr
    assert lenv.base_files() == []
    assert templates(lenv) == []

    # a 1 GiB volume for an image of 2 GiB virtual size
    proc = lenv.cli('volume', 'create', '--image', 'huge', '--size', '1',
                    check=False)
    assert proc.returncode == 1 and 'too small' in proc.stderr
    assert [v for v in lenv.cli_json('volume', 'list')
            if v['metadata']['kind'] == 'volume'] == []
    # big enough
    volume_id = cli_ok(lenv, 'volume', 'create', '--image', 'huge',
                       '--size', '2')
    assert os.path.getsize(volume_file(lenv, volume_id)) == 2 * GiB
    assert compare(volume_file(lenv, volume_id), images['huge.qcow2'],
                   'raw', 'qcow2')
    cli_ok(lenv, 'volume', 'delete', volume_id)
    cli_ok(lenv, 'cache', 'evict', 'huge')
    assert [v['id'] for v in lenv.cli_json('volume', 'list')] == [
        short.volume_location]


# -- 3. clones: reflink on XFS, sparse copy on ext4 ---------------------------
@pytest.mark.parametrize('loop_fs', ['xfs', 'ext4'], indirect=True)
def test_volume_create_clones_the_template(lenv, loop_fs, image_files,
                                           tmp_path):
    kind, mnt = loop_fs
    lenv.volumes = os.path.join(mnt, 'volumes')
    lenv.configure(local_volumes={'path': lenv.volumes})
    backend = lenv.cli_json('status')['volume_backend']
    assert backend['path'] == lenv.volumes
    assert backend['reflink'] is (kind == 'xfs')
    assert backend['clone'] == ('reflink' if kind == 'xfs'
                                else 'sparse-copy')

    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.qcow2'], 'cq')
    volume_id = cli_ok(lenv, 'volume', 'create', '--image', 'cq',
                       '--size', '1')
    template, = templates(lenv, 'cq')
    volume = {v['id']: v for v in lenv.cli_json('volume', 'list')}[volume_id]
    assert volume['metadata']['kind'] == 'volume'
    assert volume['metadata']['source_volume'] == template['id']
    path = volume_file(lenv, volume_id)
    assert os.path.getsize(path) == 1 * GiB
    assert compare(path, image_files['disk.qcow2'], 'raw', 'qcow2')
    assert compare(path, image_files['disk.raw'], 'raw', 'raw')
    extents = subprocess.run(['filefrag', '-v', path], check=True,
                             capture_output=True, text=True).stdout
    if kind == 'xfs':
        assert 'shared' in extents      # copy-on-write: no bits copied
    else:
        assert 'shared' not in extents
        # the copy is sparse: only the 2 MiB of data were written
        assert os.stat(path).st_blocks * 512 < 8 * MiB

    # the template on this filesystem is linked as well
    with agent_of(lenv) as agent:
        base = agent.fetch_image('cq')
        assert backing_of(os.path.realpath(base)) == volume_file(
            lenv, template['id'])
        assert overlay_equals(base, image_files['disk.raw'], tmp_path)
        agent.remove_image('cq')
    assert loops_under(mnt) == []

    # the clone is independent of its template
    proc = lenv.cli('volume', 'delete', template['id'], check=False)
    assert proc.returncode == 1 and 'cache evict' in proc.stderr
    cli_ok(lenv, 'cache', 'evict', 'cq')
    assert not os.path.exists(volume_file(lenv, template['id']))
    assert compare(path, image_files['disk.raw'], 'raw', 'raw')
    cli_ok(lenv, 'volume', 'delete', volume_id)
    assert not os.path.exists(path)
    assert lenv.cli_json('volume', 'list') == []


# -- 4. restart and reboot ----------------------------------------------------
def test_init_after_a_reboot_restores_every_link(lenv, image_files,
                                                 tmp_path):
    sources = {'rb-raw': image_files['disk.raw'],
               'rb-qcow2': image_files['disk.qcow2']}
    with agent_of(lenv) as agent:
        for image_id, src in sources.items():
            agent.import_image(src, image_id)
            agent.fetch_image(image_id)
        volumes = {e['image_id']: e['volume_id']
                   for e in agent.volumes.cache_list()}
        # and a volume-backed image, whose volume will be lost
        lost = agent.import_image(image_files['disk.raw'], 'rb-lost',
                                  volume_backed=True).volume_location
        agent.fetch_image('rb-lost')
    bases = {i: os.path.join(lenv.base_dir, sha1(i)) for i in sources}

    # the reboot: every loop device of this agent is gone (their /dev/loopN
    # nodes stay), and so is one volume
    unplug('%s/' % tmp_path)
    assert loops_under(tmp_path) == []
    os.unlink(volume_file(lenv, lost))
    os.unlink(volume_file(lenv, lost) + '.json')
    for path in bases.values():
        assert os.path.islink(path)

    report = lenv.cli_json('init')['handlers']['volume_linking']
    assert sorted(report['restored']) == sorted(sha1(i) for i in sources)
    assert report['intact'] == []
    failed, = report['failed']
    assert failed['filename'] == sha1('rb-lost')
    assert failed['image_id'] == 'rb-lost' and lost in failed['reason']
    rows = {r['image_id']: r for r in lenv.cli_json('list')}
    for image_id, path in bases.items():
        device = os.path.realpath(path)
        assert stat.S_ISBLK(os.stat(path).st_mode)
        assert backing_of(device) == volume_file(lenv, volumes[image_id])
        assert rows[image_id]['target'] == device
        assert overlay_equals(path, sources[image_id], tmp_path)

    with agent_of(lenv) as agent:
        # again: everything in place, nothing attached twice
        report = agent.init()['handlers']['volume_linking']
        assert sorted(report['intact']) == sorted(sha1(i) for i in sources)
        assert report['restored'] == []
        assert len(loops_under(tmp_path)) == 2
        # one device lost (it will most likely be re-attached under the same
        # /dev/loopN): restored, not intact
        unplug(volume_file(lenv, volumes['rb-raw']))
        report = agent.init()['handlers']['volume_linking']
        assert report['restored'] == [sha1('rb-raw')]
        assert report['intact'] == [sha1('rb-qcow2')]
        assert backing_of(os.path.realpath(bases['rb-raw'])) == volume_file(
            lenv, volumes['rb-raw'])

        for image_id in list(sources) + ['rb-lost']:
            agent.remove_image(image_id)
        assert lenv.base_files() == []
        assert len(agent.volumes.cache_list()) == 2


def test_init_releases_a_link_removed_behind_the_agents_back(
        lenv, image_files, tmp_path):
    """nova's own image cache manager removes unused bases it knows about
    (``os.remove`` on the link): the next reconcile (``init``, ``list``)
    lets the handler release the hold on the template and detach it, so the
    entry can be evicted again."""
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.raw'], 'nv')
        path = agent.fetch_image('nv')
    os.unlink(path)
    assert len(loops_under(tmp_path)) == 1
    proc = lenv.cli('cache', 'evict', 'nv', check=False)
    assert proc.returncode == 1 and 'held' in proc.stderr

    report = lenv.cli_json('init')
    assert report['dropped'] == [sha1('nv')]
    assert loops_under(tmp_path) == []
    entry, = lenv.cli_json('cache', 'list')
    assert entry['holders'] == [] and entry['state'] == 'fresh'
    assert cli_ok(lenv, 'cache', 'evict', 'nv').startswith('evicted nv')
    assert templates(lenv) == []


def test_fetch_repairs_a_dangling_link(lenv, image_files, tmp_path):
    """Before ``init``: the link names a device that is gone (its node was
    not re-created at boot); a fetch undoes it and links again."""
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.raw'], 'dl')
        path = agent.fetch_image('dl')
        volume_id = agent.index.get(sha1('dl')).volume_id
    unplug('%s/' % tmp_path)
    gone = next('/dev/loop%d' % n for n in range(4000, 5000)
                if not os.path.exists('/dev/loop%d' % n))
    os.unlink(path)
    os.symlink(gone, path)
    assert os.path.islink(path) and not os.path.exists(path)

    with agent_of(lenv) as agent:
        assert agent.fetch_image('dl') == path
        device = os.path.realpath(path)
        assert device != gone and stat.S_ISBLK(os.stat(path).st_mode)
        assert backing_of(device) == volume_file(lenv, volume_id)
        assert overlay_equals(path, image_files['disk.raw'], tmp_path)
        entry, = agent.volumes.cache_list()
        assert entry['volume_id'] == volume_id
        assert len(entry['holders']) == 1
        assert events(agent) == {'hit': 1, 'miss': 1, 'evict': 0}
        agent.remove_image('dl')


def test_a_reboot_that_rebinds_the_loop_device_leaves_a_dangling_base(
        lenv, image_files, tmp_path):
    """After a reboot ``/dev/loopN`` may belong to another file before
    ``init`` runs: the base must then dangle, never resolve to that file,
    until ``init`` attaches its volume again."""
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.raw'], 'rb')
        path = agent.fetch_image('rb')
        volume_id = agent.index.get(sha1('rb')).volume_id
    device = os.path.realpath(path)
    assert backing_of(device) == volume_file(lenv, volume_id)
    # the reboot: every loop device gone, /run empty ...
    unplug('%s/' % tmp_path)
    shutil.rmtree(lenv.sections['volume_linking']['device_links_path'])
    # ... and the old device bound to somebody else's file before init
    decoy = make_raw(str(tmp_path / 'decoy.raw'), data_mib=1, total_mib=8,
                     seed=7)
    subprocess.run(['losetup', '-r', device, decoy], check=True)
    try:
        assert os.path.islink(path) and not os.path.exists(path)
        with pytest.raises(FileNotFoundError):
            open(path, 'rb').close()
        report = lenv.cli_json('init')
        assert report['handlers']['volume_linking']['restored'] == \
            [sha1('rb')]
        now = os.path.realpath(path)
        assert now != device
        assert backing_of(now) == volume_file(lenv, volume_id)
        assert overlay_equals(path, image_files['disk.raw'], tmp_path)
    finally:
        detach([device])
        cli_ok(lenv, 'remove', 'rb')


def test_fetch_repairs_a_link_to_a_detached_loop_device(lenv, image_files,
                                                        tmp_path):
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.raw'], 'dd')
        path = agent.fetch_image('dd')
        volume_id = agent.index.get(sha1('dd')).volume_id
    unplug('%s/' % tmp_path)
    try:
        with agent_of(lenv) as agent:
            assert agent.fetch_image('dd') == path
            assert backing_of(os.path.realpath(path)) == volume_file(lenv,
                                                                volume_id)
    finally:
        with agent_of(lenv) as agent:
            agent.remove_image('dd')


def test_volume_delete_refuses_a_linked_volume(lenv, image_files, tmp_path):
    with agent_of(lenv) as agent:
        volume_id = agent.import_image(image_files['disk.raw'], 'lk',
                                       volume_backed=True).volume_location
        base = agent.fetch_image('lk')
    proc = lenv.cli('volume', 'delete', volume_id, check=False)
    assert proc.returncode == 1 and sha1('lk') in proc.stderr
    assert backing_of(os.path.realpath(base)) == volume_file(lenv, volume_id)
    assert overlay_equals(base, image_files['disk.raw'], tmp_path)
    cli_ok(lenv, 'remove', 'lk')
    assert loops_under(tmp_path) == []
    assert cli_ok(lenv, 'volume', 'delete', volume_id) == \
        'deleted %s' % volume_id
    assert not os.path.exists(volume_file(lenv, volume_id))


# -- 5. limits ----------------------------------------------------------------
def test_max_count_alone(lenv, images, tmp_path, caplog):
    lenv.configure(image_volume_cache={'max_count': 1})
    with agent_of(lenv) as agent:
        for n in (1, 2, 3):
            agent.import_image(images['small%d.raw' % n], 'c%d' % n)
        agent.fetch_image('c1')
        c1_volume = agent.index.get(sha1('c1')).volume_id
        with caplog.at_level(logging.WARNING):
            agent.fetch_image('c2')
        # c1 is linked: kept although the cache is over its count
        assert 'every remaining entry is held' in caplog.text
        assert sorted(entries_by_image(agent)) == ['c1', 'c2']
        assert agent.context.volume_backend.get(c1_volume)

        # c2 released: the manager pass evicts it, not the held c1
        agent.remove_image('c2')
        report = agent.prune()
        assert report['cache_evicted'] == ['c2']
        assert sorted(entries_by_image(agent)) == ['c1']

        # c1 released: the miss on c3 makes room by evicting it
        agent.remove_image('c1')
        agent.fetch_image('c3')
        assert sorted(entries_by_image(agent)) == ['c3']
        assert c1_volume not in {v['id'] for v in agent.volumes.list_volumes()}
        assert events(agent) == {'hit': 0, 'miss': 3, 'evict': 2}

    proc = lenv.cli('cache', 'evict', 'c3', check=False)
    assert proc.returncode == 1 and 'held' in proc.stderr
    assert [e['image_id'] for e in lenv.cli_json('cache', 'list')] == ['c3']
    cli_ok(lenv, 'remove', 'c3')
    assert cli_ok(lenv, 'cache', 'evict', 'c3').startswith('evicted c3')
    assert lenv.cli_json('cache', 'list') == []
    assert templates(lenv) == []


def test_max_size_gb_alone(lenv, images, tmp_path, caplog):
    """600 MiB images (virtual; tiny qcow2 files) in a 1 GiB cache: one
    fits, two do not."""
    lenv.configure(image_volume_cache={'max_size_gb': 1})
    with agent_of(lenv) as agent:
        for n in (1, 2, 3):
            agent.import_image(images['big%d.qcow2' % n], 'b%d' % n)
        # unheld b1 (made for a volume) is evicted for b2
        clone = agent.volumes.create_volume('b1', 1)
        assert [e['holders'] for e in agent.volumes.cache_list()] == [[]]
        agent.fetch_image('b2')
        assert sorted(entries_by_image(agent)) == ['b2']
        b2_volume = agent.index.get(sha1('b2')).volume_id
        # held b2 is not evicted for b3: the cache goes over its size
        with caplog.at_level(logging.WARNING):
            agent.volumes.create_volume('b3', 1)
        assert 'every remaining entry is held' in caplog.text
        status = agent.status()['image_volume_cache']
        assert status['entries'] == 2 and status['held'] == 1
        assert status['bytes'] == 2 * 600 * MiB > GiB
        assert os.path.isfile(volume_file(lenv, b2_volume))
        assert compare(volume_file(lenv, b2_volume), images['big2.qcow2'],
                       'raw', 'qcow2')
        assert events(agent) == {'hit': 0, 'miss': 3, 'evict': 1}
        # the clone of the evicted b1 lives on
        assert compare(volume_file(lenv, clone), images['big1.qcow2'], 'raw',
                       'qcow2')
        agent.remove_image('b2')
        assert loops_under(tmp_path) == []
        # once b2 is released, the manager pass brings the cache back under
        # its limit by evicting the least recently used: b3 (cloned before
        # b2's link went away)
        assert agent.prune()['cache_evicted'] == ['b3']
        assert sorted(entries_by_image(agent)) == ['b2']


def test_both_limits_evict_least_recently_used_never_held(lenv, images,
                                                          tmp_path, caplog):
    lenv.configure(image_volume_cache={'max_count': 2, 'max_size_gb': 1})
    with agent_of(lenv) as agent:
        for n in (1, 2, 3):
            agent.import_image(images['small%d.raw' % n], 's%d' % n)
            agent.import_image(images['big%d.qcow2' % n], 'b%d' % n)
        agent.volumes.create_volume('s1', 1)
        agent.volumes.create_volume('s2', 1)
        agent.volumes.create_volume('s1', 1)        # a hit: s2 is now the LRU
        agent.volumes.create_volume('s3', 1)        # count: s2 goes
        assert sorted(entries_by_image(agent)) == ['s1', 's3']
        agent.fetch_image('b1')             # count: s1 (LRU) goes
        assert sorted(entries_by_image(agent)) == ['b1', 's3']
        b1_volume = agent.index.get(sha1('b1')).volume_id
        # size: s3 goes, and b1 would have to go too, but it is linked
        with caplog.at_level(logging.WARNING):
            agent.volumes.create_volume('b2', 1)
        assert 'every remaining entry is held' in caplog.text
        assert sorted(entries_by_image(agent)) == ['b1', 'b2']
        assert os.path.isfile(volume_file(lenv, b1_volume))
        assert events(agent) == {'hit': 1, 'miss': 5, 'evict': 3}
        agent.remove_image('b1')            # b1 used until now
        agent.volumes.create_volume('b3', 1)  # size: b2 (LRU), then b1 go
        assert sorted(entries_by_image(agent)) == ['b3']
        assert events(agent) == {'hit': 1, 'miss': 6, 'evict': 5}


# -- 6. stale entries ---------------------------------------------------------
def test_stale_entry_is_retired_while_held_and_deleted_once_released(
        lenv, image_files, images, tmp_path):
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.raw'], 'st')
        path = agent.fetch_image('st')
        old, = agent.volumes.cache_list()
        time.sleep(1.1)     # updated_at has a resolution of one second
        agent.import_image(images['new.raw'], 'st')

        # a miss makes a new template; the held old one is retired
        clone = agent.volumes.create_volume('st', 1)
        assert compare(volume_file(lenv, clone), images['new.raw'], 'raw',
                       'raw')
    rows = {e['volume_id']: e for e in lenv.cli_json('cache', 'list')}
    assert len(rows) == 2
    assert rows[old['volume_id']]['state'] == 'stale'
    assert rows[old['volume_id']]['holders'] == old['holders']
    new_volume, = set(rows) - {old['volume_id']}
    assert rows[new_volume]['state'] == 'fresh'
    assert rows[new_volume]['image_updated_at'] > old['image_updated_at']
    # the existing base keeps serving the bits its instances were built on
    assert overlay_equals(path, image_files['disk.raw'], tmp_path)

    with agent_of(lenv) as agent:
        # no new link or clone from a stale template
        clone2 = agent.volumes.create_volume('st', 1)
        assert {v['id']: v for v in agent.volumes.list_volumes()}[clone2][
            'metadata']['source_volume'] == new_volume
        # released: the retired entry and its volume are deleted
        agent.remove_image('st')
        entry, = agent.volumes.cache_list()
        assert entry['volume_id'] == new_volume
        assert not os.path.exists(volume_file(lenv, old['volume_id']))
        path = agent.fetch_image('st')
        assert agent.index.get(sha1('st')).volume_id == new_volume
        assert overlay_equals(path, images['new.raw'], tmp_path)
        assert events(agent) == {'hit': 2, 'miss': 2, 'evict': 1}
        agent.remove_image('st')


def test_manager_pass_retires_stale_entries(lenv, image_files, images,
                                            tmp_path):
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.raw'], 'unheld')
        agent.import_image(image_files['disk.raw'], 'held')
        agent.volumes.create_volume('unheld', 1)
        agent.fetch_image('held')
        time.sleep(1.1)
        for image_id in ('unheld', 'held'):
            agent.import_image(images['new.raw'], image_id)
    report = lenv.cli_json('prune', '--yes')
    assert sorted(report['cache_retired']) == ['held', 'unheld']
    assert report['removed'] == []          # the base is young and kept
    rows = lenv.cli_json('cache', 'list')
    assert [(r['image_id'], r['state']) for r in rows] == [('held', 'stale')]
    assert templates(lenv, 'unheld') == []
    cli_ok(lenv, 'remove', 'held')
    assert lenv.cli_json('cache', 'list') == []
    assert templates(lenv) == []


# -- 7. concurrent misses -----------------------------------------------------
def test_concurrent_misses_in_threads_make_one_template(lenv, image_files,
                                                        tmp_path):
    agent = lenv.agent()
    try:
        agent.import_image(image_files['disk.qcow2'], 'thr')
        barrier = threading.Barrier(4)
        results, failures = [], []

        def worker(n):
            try:
                barrier.wait()
                if n % 2:
                    results.append(('base', agent.fetch_image('thr')))
                else:
                    results.append(
                        ('volume', agent.volumes.create_volume('thr', 1)))
            except BaseException as exc:   # reported below
                failures.append(exc)
        threads = [threading.Thread(target=worker, args=(n,))
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert failures == []
        assert sorted(kind for kind, _ in results) == ['base', 'base',
                                                       'volume', 'volume']
        template, = templates(lenv, 'thr')
        # one miss; the clones hit; the second fetch found the link
        assert events(agent) == {'hit': 2, 'miss': 1, 'evict': 0}
        for kind, value in results:
            if kind == 'base':
                assert backing_of(os.path.realpath(value)) == volume_file(
                    lenv, template['id'])
            else:
                assert compare(volume_file(lenv, value),
                               image_files['disk.raw'], 'raw', 'raw')
        agent.remove_image('thr')
    finally:
        agent.close()


def test_concurrent_misses_in_processes_make_one_template(lenv, image_files,
                                                          tmp_path):
    lenv.cli('images', 'import', image_files['disk.qcow2'], '--id', 'prc')
    cmd = [sys.executable, '-m', 'agent.cli', '--config-file', lenv.conf_path]
    procs = [subprocess.Popen(cmd + args, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
             for args in (['volume', 'create', '--image', 'prc', '--size',
                           '1'],) * 2 + (['fetch', 'prc'],)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    template, = templates(lenv, 'prc')
    clones = [o.strip().splitlines()[-1] for o, _ in outs[:2]]
    assert len(set(clones)) == 2
    for clone in clones:
        assert compare(volume_file(lenv, clone), image_files['disk.raw'],
                       'raw', 'raw')
    base = outs[2][0].strip().splitlines()[-1]
    assert backing_of(os.path.realpath(base)) == \
        volume_file(lenv, template['id'])
    assert lenv.cli_json('status')['image_volume_cache']['events'] == {
        'hit': 2, 'miss': 1, 'evict': 0}
    cli_ok(lenv, 'remove', 'prc')


# -- 8. in use by a libvirt domain --------------------------------------------
def write_node_xml(path, domains):
    """A libvirt test-driver node: ``domains`` is ``{name: qcow2 disk}``."""
    parts = ['<node>']
    for name, disk in domains.items():
        parts.append(
            "<domain type='test'><name>%s</name><memory>65536</memory>"
            "<os><type>hvm</type></os><devices><disk type='file' "
            "device='disk'><driver name='qemu' type='qcow2'/>"
            "<source file='%s'/><target dev='vda'/></disk></devices>"
            "</domain>" % (name, disk))
    parts.append('</node>')
    with open(path, 'w') as f:
        f.write('\n'.join(parts))
    return 'test://' + os.path.abspath(path)


def test_base_used_by_a_libvirt_domain_is_never_removed(lenv, image_files,
                                                        images, tmp_path):
    with agent_of(lenv) as agent:
        agent.import_image(image_files['disk.qcow2'], 'inuse')
        agent.import_image(images['alt.raw'], 'unused')
        base = agent.fetch_image('inuse')
        agent.fetch_image('unused')
        volume_id = agent.index.get(sha1('inuse')).volume_id
    # the instance disk lives outside instances_path: only libvirt knows it
    os.makedirs(str(tmp_path / 'vm'))
    disk = str(tmp_path / 'vm' / 'disk.qcow2')
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-F', 'raw', '-b',
                    base, disk], check=True, capture_output=True)
    uri = write_node_xml(str(tmp_path / 'node.xml'), {'vm-linked': disk})
    lenv.configure(libvirt={'connection_uri': uri})

    rows = {r['image_id']: r for r in lenv.cli_json('list')}
    assert rows['inuse']['users'] == ['domain:vm-linked']
    assert rows['unused']['users'] == []
    report = lenv.cli_json('prune', '--min-age', '0', '--yes')
    assert [i['filename'] for i in report['removed']] == [sha1('unused')]
    assert [i['filename'] for i in report['in_use']] == [sha1('inuse')]
    assert report['cache_evicted'] == []
    proc = lenv.cli('cache', 'evict', 'inuse', check=False)
    assert proc.returncode == 1 and 'held' in proc.stderr
    proc = lenv.cli('remove', 'inuse', check=False)
    assert proc.returncode == 1 and 'domain:vm-linked' in proc.stderr
    assert backing_of(os.path.realpath(base)) == volume_file(lenv, volume_id)
    assert same_content(disk, image_files['disk.qcow2'])
    assert lenv.base_files() == [sha1('inuse')]

    # the domain is gone: the base goes, and the template can be evicted
    write_node_xml(str(tmp_path / 'node.xml'), {})
    os.unlink(disk)
    report = lenv.cli_json('prune', '--min-age', '0', '--yes')
    assert [i['filename'] for i in report['removed']] == [sha1('inuse')]
    assert lenv.base_files() == []
    assert cli_ok(lenv, 'cache', 'evict', 'inuse').startswith(
        'evicted inuse')


# -- nova's image backend decides whether a link can serve ------------------
@pytest.mark.parametrize('images_type,use_cow_images,links', [
    ('qcow2', True, True),
    ('default', True, True),
    ('qcow2', False, True),      # use_cow_images only matters for default
    ('default', False, False),   # = flat
    ('flat', True, False),
    ('raw', True, False),
    ('lvm', True, False),
    ('rbd', True, False),
    ('ploop', True, False),
])
def test_volume_linking_serves_only_qcow2_overlays(
        lenv, image_files, images_type, use_cow_images, links):
    """Only where nova builds instance disks as qcow2 overlays on the base
    is a base linked; elsewhere the handler declines with a reason naming
    the backend and downloading prepares a regular file."""
    lenv.configure(DEFAULT={'use_cow_images': use_cow_images},
                   libvirt={'images_type': images_type})
    lenv.cli('images', 'import', image_files['disk.qcow2'], '--id', 'img')
    base = os.path.join(lenv.base_dir, sha1('img'))

    alone = lenv.cli('fetch', 'img', '--handler', 'volume_linking',
                     check=False)
    if links:
        assert alone.returncode == 0, alone.stderr
        assert os.path.islink(base)
        assert stat.S_ISBLK(os.stat(base).st_mode)
        lenv.cli('remove', 'img')
    else:
        assert alone.returncode == 1, alone.stderr
        backend = 'flat' if images_type == 'default' else images_type
        assert 'volume_linking: nova uses the %s image backend' % backend \
            in alone.stderr, alone.stderr
        assert 'images_type = %s' % images_type in alone.stderr
        assert not os.path.lexists(base)

    backend = lenv.cli_json('status')['nova_image_backend']
    assert backend['linked_bases_serve'] is links
    assert backend['backend'] == {'default': 'qcow2' if use_cow_images
                                  else 'flat'}.get(images_type, images_type)
    lenv.cli('fetch', 'img')   # the chain: volume_linking,downloading
    row, = lenv.cli_json('list')
    if links:
        assert row['handler'] == 'volume_linking' and os.path.islink(base)
    else:
        assert row['handler'] == 'downloading'
        assert os.path.isfile(base) and not os.path.islink(base)
        assert loops_under(lenv.root) == []
    assert compare(base, image_files['disk.qcow2'], 'raw', 'qcow2')
    lenv.cli('remove', 'img')


def test_a_truncated_qcow2_never_becomes_a_template(lenv, image_files,
                                                   tmp_path):
    """The template volume is written by converting the image: a damaged
    one is refused there too, leaves no volume and no link, and does not
    fall through to downloading."""
    cut = str(tmp_path / 'cut.qcow2')
    shutil.copyfile(image_files['disk.qcow2'], cut)
    os.truncate(cut, os.path.getsize(cut) // 3)
    lenv.cli('images', 'import', cut, '--id', 'img-cut')
    proc = lenv.cli('fetch', 'img-cut', check=False)
    assert proc.returncode == 1
    assert 'qemu-img check finds the qcow2 image damaged' in proc.stderr
    assert lenv.base_files() == []
    assert templates(lenv) == [] and lenv.cli_json('volume', 'list') == []
    assert loops_under(tmp_path) == []


def test_links_made_before_nova_left_qcow2_are_reported(lenv, image_files):
    """A base linked while nova used qcow2 stays a link when the backend
    changes (instances may still be overlays on it): ``list`` says so and
    what to do; once removed, the next fetch downloads."""
    lenv.cli('images', 'import', image_files['disk.raw'], '--id', 'img')
    base = lenv.cli('fetch', 'img').stdout.strip().splitlines()[-1]
    assert os.path.islink(base)
    proc = lenv.cli('list')
    assert 'warning:' not in proc.stderr
    lenv.configure(libvirt={'images_type': 'flat'})
    proc = lenv.cli('list')
    assert 'warning: base %s (image img) is a link, but nova uses the flat ' \
        'image backend' % sha1('img') in proc.stderr, proc.stderr
    lenv.cli('remove', 'img')
    lenv.cli('fetch', 'img')
    assert os.path.isfile(base) and not os.path.islink(base)
    assert 'warning:' not in lenv.cli('list').stderr
    lenv.cli('remove', 'img')


# -- a raw image copied into its template while it downloads ---------------
def test_a_raw_image_is_copied_into_its_template_behind_its_download(
        lenv, tmp_path):
    """The follower copies only what the download has said it wrote,
    leaves holes as holes, and a download that starts over voids the copy
    (the write after the download then writes everything)."""
    from agent.cache import image_volume_cache as ivc
    step = ivc.FOLLOW_STEP
    with agent_of(lenv) as agent:
        backend = agent.context.volume_backend
        data = random.Random(3).randbytes(step)
        part = str(tmp_path / 'image.part')
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        vid = backend.create(3 * step, {'kind': 'template',
                                        'image_id': 'follow'})
        try:
            follower = ivc._Follower(backend, vid, fd, 'follow')
            os.pwrite(fd, data, 0)      # step 1: data
            follower.advance(step)
            # step 2: zeros, a hole the download skipped, past the file's
            # end; step 3: half data, half zeros
            follower.advance(2 * step)
            os.pwrite(fd, data[:step // 2], 2 * step)
            follower.advance(2 * step + step // 2)
            os.ftruncate(fd, 3 * step)   # (the download's last act)
            assert follower.finish(3 * step)
            with open(backend._file(vid), 'rb') as f:
                assert f.read(step) == data
                assert f.read(step) == bytes(step)
                assert f.read(step) == data[:step // 2] + bytes(step // 2)
            # the hole stayed a hole
            assert os.stat(backend._file(vid)).st_blocks * 512 < 2 * step

            # the source starts over: nothing copied counts
            os.ftruncate(fd, 0)
            again = backend.create(step, {'kind': 'template',
                                          'image_id': 'again'})
            follower = ivc._Follower(backend, again, fd, 'again')
            os.pwrite(fd, data, 0)
            follower.advance(step)
            follower.advance(0)
            assert not follower.finish(step)
            assert follower.error is None
        finally:
            os.close(fd)
            for volume_id in (vid, locals().get('again')):
                if volume_id:
                    backend.delete(volume_id)
