"""The agent against a real Glance (v2 API under gunicorn,
sqlite, file store, no auth), started by ``tests/real_glance.py``.

Images are created through Glance's own API (raw, qcow2, vmdk; owners and
visibilities) and their hash fields come from Glance. They are fetched with
the downloading handler and with ``volume_linking,downloading`` (the
image-volume cache on loop devices), compared with ``qemu-img compare``, and
then updated, deleted, or cut off mid-download in Glance.

Every test ends with nothing attached: the autouse fixture below fails a
test that leaves a loop device over one of its files (and detaches it).
"""

import hashlib
import os
import random
import subprocess
import sys
import time
import uuid

import pytest

from agent import errors
from tests.conftest import REPO, AgentEnv, files_written, same_content
from tests.real_glance import own_real_glance, real_glance  # noqa: F401

MiB = 1024 * 1024
CHAIN = 'volume_linking,downloading'
PROJECT_A = 'project-a'
PROJECT_B = 'project-b'


# -- helpers ------------------------------------------------------------------
def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


def file_hash(path, algo):
    h = hashlib.new(algo)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(MiB), b''):
            h.update(block)
    return h.hexdigest()


def loops_under(root):
    """Attached loop devices whose backing file is under ``root``."""
    out = subprocess.run(['losetup', '-l', '-n', '-O', 'NAME,BACK-FILE'],
                         capture_output=True, text=True, check=True).stdout
    root = str(root).rstrip('/') + '/'
    found = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(' ')
        if back.strip().startswith(root):
            found.append(name)
    return sorted(found)


def compare_raw(a, b):
    """``qemu-img compare -f raw -F raw`` (a may be a block device)."""
    return subprocess.run(['qemu-img', 'compare', '-f', 'raw', '-F', 'raw',
                           a, b], capture_output=True).returncode == 0


def instance_disk(env, base):
    """A qcow2 overlay on ``base`` under instances_path, as nova makes an
    instance's disk: it makes the base in use."""
    d = os.path.join(env.instances, str(uuid.uuid4()))
    os.makedirs(d)
    disk = os.path.join(d, 'disk')
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-F', 'raw', '-b',
                    base, disk], check=True, capture_output=True)
    return disk


def last_line(proc):
    return proc.stdout.strip().splitlines()[-1]


def glance_env(env, glance, chain='downloading', **glance_opts):
    env.configure(DEFAULT={'template_image_handler': chain},
                  image_source={'driver': 'glance'},
                  glance=dict({'api_servers': glance.url}, **glance_opts))
    return env


def row_of(env, image_id):
    rows = [r for r in env.cli_json('list') if r['image_id'] == image_id]
    assert len(rows) == 1, rows
    return rows[0]


def cache_rows(env, image_id=None):
    return [r for r in env.cli_json('cache', 'list')
            if image_id in (None, r['image_id'])]


def cleanup(env, image_id, volumes=()):
    """Undo what a test made, in this process (quicker than the CLI):
    delete ``volumes``, remove the base of ``image_id`` (detaching its loop
    device) and evict its cache entries; what is already gone is fine."""
    agent = env.agent()
    try:
        for volume in volumes:
            if volume:
                try:
                    agent.volumes.delete_volume(volume)
                except errors.AgentError:
                    pass
        for call in (agent.remove_image, agent.volumes.cache_evict):
            try:
                call(image_id)
            except errors.AgentError:
                pass
    finally:
        agent.close()


def wait_past(updated_at):
    """Sleep until the clock is past ``updated_at`` (a resolution of one
    second), so that Glance's next change has a later one."""
    import datetime
    then = datetime.datetime.strptime(updated_at, '%Y-%m-%dT%H:%M:%SZ')
    then = then.replace(tzinfo=datetime.timezone.utc).timestamp()
    delay = then + 1.05 - time.time()
    if delay > 0:
        time.sleep(delay)


# -- fixtures -----------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_leaked_loop_devices(tmp_path):
    """Fail a test that leaves a loop device over one of its files (the
    agent's remove/prune must have detached it); detach it anyway."""
    assert loops_under(tmp_path) == []
    try:
        yield
    finally:
        leaked = loops_under(tmp_path)
        for device in leaked:
            subprocess.run(['losetup', '-d', device], capture_output=True)
    assert leaked == [], 'loop devices left attached: %s' % leaked


@pytest.fixture(scope='module')
def glance_images(real_glance, image_files):
    """disk.raw, disk.qcow2 and disk.vmdk uploaded to the real Glance as
    public images of project A: ``{disk_format: (record, source file)}``."""
    images = {}
    for fmt in ('raw', 'qcow2', 'vmdk'):
        path = image_files['disk.' + fmt]
        record = real_glance.create_image(
            'disk-' + fmt, path, disk_format=fmt, visibility='public',
            owner=PROJECT_A)
        images[fmt] = (record, path)
    return images


@pytest.fixture(scope='module')
def big_image(tmp_path_factory):
    """128 MiB raw: 1 MiB blocks, every other one pseudo-random, the rest
    zeros (Glance stores them as data)."""
    path = str(tmp_path_factory.mktemp('big') / 'big.raw')
    rnd = random.Random(42)
    with open(path, 'wb') as f:
        for i in range(128):
            f.write(rnd.randbytes(MiB) if i % 2 == 0 else bytes(MiB))
    return path


# -- 1. images made through Glance's API, hash fields from Glance -------------
def test_glance_computes_the_hash_fields(glance_images, real_glance):
    for fmt, (record, path) in glance_images.items():
        assert record['status'] == 'active'
        assert record['disk_format'] == fmt
        assert record['size'] == os.path.getsize(path)
        assert record['checksum'] == file_hash(path, 'md5')
        assert record['os_hash_algo'] == 'sha512'
        assert record['os_hash_value'] == file_hash(path, 'sha512')
        assert record['visibility'] == 'public'
        assert record['owner'] == PROJECT_A
        # served with Range support, as the agent's resume needs
        resp = real_glance.session.get(
            real_glance.file_url(record['id']),
            headers={'Range': 'bytes=10-19'}, timeout=30)
        assert resp.status_code == 206 and len(resp.content) == 10


def test_real_glance_answers_a_resume_as_the_agent_requires(
        env, real_glance, glance_images):
    """The agent refuses a 206 whose Content-Range is not the range it
    asked for: Glance's own answer must pass that check."""
    from agent import config
    from agent.images.glance import GlanceImageSource
    record, path = glance_images['qcow2']
    glance_env(env, real_glance)
    source = GlanceImageSource(config.load([env.conf_path]))
    image = source.get(record['id'])
    offset = record['size'] // 3
    stream = source.open(image, offset)
    try:
        assert stream.offset == offset
        data = b''.join(stream)
    finally:
        stream.close()
    with open(path, 'rb') as f:
        f.seek(offset)
        assert data == f.read()


@pytest.mark.parametrize('fmt', ['raw', 'qcow2', 'vmdk'])
def test_downloading_handler_makes_a_verified_raw_base(
        env, real_glance, glance_images, image_files, fmt):
    record, _ = glance_images[fmt]
    image_id = record['id']
    glance_env(env, real_glance)
    path = last_line(env.cli('fetch', image_id))
    assert path == os.path.join(env.base_dir, sha1(image_id))
    assert not os.path.islink(path)
    info = subprocess.run(['qemu-img', 'info', '--output=json', path],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "raw"' in info
    assert same_content(path, image_files['disk.raw'])
    assert env.base_files() == [sha1(image_id)]

    row = row_of(env, image_id)
    assert row['handler'] == 'downloading'
    assert row['source'] == 'glance'
    assert row['disk_format'] == fmt
    assert row['size_bytes'] == os.path.getsize(image_files['disk.raw'])
    # the hash the agent verified is Glance's own
    assert (row['hash_algo'], row['hash_value']) == (
        'sha512', record['os_hash_value'])
    assert row['image_updated_at'] == record['updated_at']
    # idempotent
    assert last_line(env.cli('fetch', image_id)) == path
    env.cli('remove', image_id)
    assert env.base_files() == []


@pytest.mark.parametrize('fmt', ['raw', 'qcow2', 'vmdk'])
def test_volume_linking_serves_through_the_image_volume_cache(
        env, real_glance, glance_images, image_files, tmp_path, fmt):
    record, _ = glance_images[fmt]
    image_id = record['id']
    glance_env(env, real_glance, chain=CHAIN)
    path = last_line(env.cli('fetch', image_id, '--project-id', PROJECT_B))
    try:
        assert path == os.path.join(env.base_dir, sha1(image_id))
        assert os.path.islink(path)
        device = os.path.realpath(path)
        assert device.startswith('/dev/loop')
        assert loops_under(tmp_path) == [device]
        assert compare_raw(path, image_files['disk.raw'])
        # an instance disk on the linked base reads the image through it
        disk = instance_disk(env, path)
        assert same_content(disk, image_files['disk.raw'])

        row = row_of(env, image_id)
        assert row['handler'] == 'volume_linking'
        assert row['target'] == device
        assert row['hash_value'] == record['os_hash_value']
        assert row['in_use'] and row['users'] == ['disk:%s' % disk]
        entry, = cache_rows(env)
        assert entry['image_id'] == image_id and entry['state'] == 'fresh'
        assert entry['image_updated_at'] == record['updated_at']
        assert entry['size_bytes'] == os.path.getsize(
            image_files['disk.raw'])
        assert len(entry['holders']) == 1
        os.unlink(disk)
    finally:
        cleanup(env, image_id)
    assert env.base_files() == [] and cache_rows(env) == []
    assert loops_under(tmp_path) == []


# -- 2. owners and visibilities -----------------------------------------------
@pytest.mark.parametrize('visibility,shared', [
    ('private', False), ('shared', False), ('public', True),
    ('community', True)])
def test_cache_sharing_follows_owner_and_visibility(
        env, real_glance, image_files, tmp_path, visibility, shared):
    record = real_glance.create_image(
        'vis-' + visibility, image_files['disk.raw'], visibility=visibility,
        owner=PROJECT_A)
    assert (record['visibility'], record['owner']) == (visibility, PROJECT_A)
    image_id = record['id']
    glance_env(env, real_glance, chain=CHAIN)
    owner_host = glance_env(AgentEnv(tmp_path / 'owner-host'), real_glance,
                            chain=CHAIN)
    volume = None
    try:
        # project B on this host: shared through the cache only when the
        # image is public or community, else downloaded for B alone
        path = last_line(env.cli('fetch', image_id, '--project-id',
                                 PROJECT_B))
        row = row_of(env, image_id)
        assert row['handler'] == ('volume_linking' if shared
                                  else 'downloading')
        assert os.path.islink(path) == shared
        assert compare_raw(path, image_files['disk.raw'])
        entries = cache_rows(env)
        assert [e['image_id'] for e in entries] == (
            [image_id] if shared else [])

        # block storage side: a volume for B clones the template only when
        # shared; otherwise it is written directly, the cache untouched
        volume = last_line(env.cli('volume', 'create', '--image', image_id,
                                   '--size', '1', '--project-id', PROJECT_B))
        vol = {v['id']: v for v in env.cli_json('volume', 'list')}[volume]
        assert bool(vol['metadata'].get('source_volume')) == shared
        assert [e['image_id'] for e in cache_rows(env)] == (
            [image_id] if shared else [])

        # the owner's own project always goes through the cache
        own_path = last_line(owner_host.cli('fetch', image_id,
                                            '--project-id', PROJECT_A))
        assert row_of(owner_host, image_id)['handler'] == 'volume_linking'
        assert compare_raw(own_path, image_files['disk.raw'])
    finally:
        cleanup(env, image_id, [volume])
        cleanup(owner_host, image_id)
    assert cache_rows(env) == [] and cache_rows(owner_host) == []


# -- 3. an image updated in Glance --------------------------------------------
def test_image_updated_in_glance_is_retired_from_the_cache(
        env, real_glance, image_files, tmp_path):
    record = real_glance.create_image('to-update', image_files['disk.qcow2'],
                                      disk_format='qcow2',
                                      visibility='public', owner=PROJECT_A)
    image_id = record['id']
    glance_env(env, real_glance, chain=CHAIN)
    volume = None
    try:
        path = last_line(env.cli('fetch', image_id, '--project-id',
                                 PROJECT_B))
        disk = instance_disk(env, path)
        old, = cache_rows(env)
        assert old['state'] == 'fresh'
        assert old['image_updated_at'] == record['updated_at']

        wait_past(record['updated_at'])
        updated = real_glance.update(image_id, os_distro='cirros',
                                     note='rebuilt')
        assert updated['updated_at'] > record['updated_at']
        assert updated['os_hash_value'] == record['os_hash_value']

        # the manager pass asks Glance: the entry is retired but still
        # held by the linked base, which is in use and kept
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert report['cache_retired'] == [image_id]
        assert report['removed'] == []
        assert [u['filename'] for u in report['in_use']] == [sha1(image_id)]
        entry, = cache_rows(env)
        assert entry['volume_id'] == old['volume_id']
        assert entry['state'] == 'stale'
        assert entry['holders'] == old['holders']
        assert os.path.islink(path)
        assert same_content(disk, image_files['disk.raw'])

        # no new clone from the stale template: a miss makes a fresh one
        # from the image as Glance has it now
        volume = last_line(env.cli('volume', 'create', '--image', image_id,
                                   '--size', '1'))
        rows = {r['volume_id']: r for r in cache_rows(env)}
        assert rows[old['volume_id']]['state'] == 'stale'
        new, = [r for v, r in rows.items() if v != old['volume_id']]
        assert new['state'] == 'fresh'
        assert new['image_updated_at'] == updated['updated_at']
        vol = {v['id']: v for v in env.cli_json('volume', 'list')}[volume]
        assert vol['metadata']['source_volume'] == new['volume_id']
        status = env.cli_json('status')['image_volume_cache']
        assert status['stale'] == 1 and status['events']['miss'] == 2

        # released: the instance is gone, the base and the retired entry go
        os.unlink(disk)
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert [r['image_id'] for r in report['removed']] == [image_id]
        assert report['cache_retired'] == []
        assert [(r['volume_id'], r['state']) for r in cache_rows(env)] == [
            (new['volume_id'], 'fresh')]
        assert env.base_files() == []
    finally:
        cleanup(env, image_id, [volume])
    assert cache_rows(env) == []


def test_unheld_entry_of_an_updated_image_is_deleted_by_prune(
        env, real_glance, image_files):
    record = real_glance.create_image('to-update-unheld',
                                      image_files['disk.raw'],
                                      visibility='public', owner=PROJECT_A)
    image_id = record['id']
    glance_env(env, real_glance, chain=CHAIN)
    volume = last_line(env.cli('volume', 'create', '--image', image_id,
                               '--size', '1'))
    try:
        entry, = cache_rows(env)
        assert entry['holders'] == [] and entry['state'] == 'fresh'
        # nothing changed in Glance: prune keeps it
        assert env.cli_json('prune', '--yes')['cache_retired'] == []
        wait_past(record['updated_at'])
        real_glance.update(image_id, note='changed')
        assert env.cli_json('prune', '--yes')['cache_retired'] == [image_id]
        assert cache_rows(env) == []
        # the volume cloned from it earlier is the user's and stays
        assert volume in {v['id'] for v in env.cli_json('volume', 'list')}
    finally:
        cleanup(env, image_id, [volume])


# -- 4. an image deleted in Glance --------------------------------------------
@pytest.mark.parametrize('chain', ['downloading', CHAIN])
def test_image_deleted_in_glance_keeps_the_base_while_in_use(
        env, real_glance, image_files, tmp_path, chain):
    record = real_glance.create_image('to-delete', image_files['disk.vmdk'],
                                      disk_format='vmdk',
                                      visibility='public', owner=PROJECT_A)
    image_id = record['id']
    glance_env(env, real_glance, chain=chain)
    linked = chain == CHAIN
    try:
        path = last_line(env.cli('fetch', image_id))
        assert os.path.islink(path) == linked
        disk = instance_disk(env, path)

        real_glance.delete(image_id)
        assert real_glance.session.get(
            '%s/v2/images/%s' % (real_glance.url, image_id),
            timeout=30).status_code == 404

        # a new fetch (another host) fails clearly, leaving nothing
        other = glance_env(AgentEnv(tmp_path / 'other-host'), real_glance,
                           chain=chain)
        proc = other.cli('fetch', image_id, check=False)
        assert proc.returncode == 1
        assert 'not found' in proc.stderr and image_id in proc.stderr
        assert 'Traceback' not in proc.stderr
        assert other.base_files() == [] and cache_rows(other) == []

        # this host keeps serving its base while an instance uses it
        assert last_line(env.cli('fetch', image_id)) == path
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert report['removed'] == []
        assert [u['filename'] for u in report['in_use']] == [sha1(image_id)]
        if linked:
            # its cache entry is retired, still held by the link
            assert report['cache_retired'] == [image_id]
            entry, = cache_rows(env)
            assert entry['state'] == 'stale' and entry['holders']
        assert os.path.lexists(path)
        assert same_content(disk, image_files['disk.raw'])

        # the instance is gone: prune removes the base (and the entry)
        os.unlink(disk)
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert [r['image_id'] for r in report['removed']] == [image_id]
        assert env.base_files() == []
        assert cache_rows(env) == []
        # and now this host cannot fetch it either
        proc = env.cli('fetch', image_id, check=False)
        assert proc.returncode == 1 and 'not found' in proc.stderr
        assert env.base_files() == []
    finally:
        cleanup(env, image_id)


# -- 5. Glance stopped mid-download -------------------------------------------
def test_glance_killed_mid_download_fails_after_bounded_retries(
        env, own_real_glance, big_image):
    glance = own_real_glance
    record = glance.create_image('big', big_image)
    image_id = record['id']
    glance_env(env, glance, num_retries=2, read_timeout=1)
    killed_at = []

    def progress(done, total):
        if not killed_at and done >= 16 * MiB:
            killed_at.append(done)
            glance.kill()       # master and workers, SIGKILL

    agent = env.agent()
    try:
        start = time.monotonic()
        with pytest.raises(errors.DownloadFailed) as info:
            agent.fetch_image(image_id, progress=progress)
        elapsed = time.monotonic() - start
    finally:
        agent.close()
    assert killed_at and killed_at[0] < record['size']
    message = str(info.value)
    assert image_id in message and 'after 3 attempt(s)' in message
    assert 'Nothing was published' in message
    # 2 retries after 0.5 s and 1 s, refused at once
    assert elapsed < 20, elapsed
    assert env.base_files() == []           # no base, no .part
    assert not glance.running

    # Glance back on the same port: the next fetch succeeds
    glance.start()
    path = last_line(env.cli('fetch', image_id))
    assert compare_raw(path, big_image)
    env.cli('remove', image_id)


def test_glance_hung_mid_download_fails_after_bounded_retries(
        env, own_real_glance, big_image):
    """Glance frozen (SIGSTOP) while it streams: connections are accepted
    but nothing comes; each attempt ends after ``read_timeout``."""
    glance = own_real_glance
    record = glance.create_image('big', big_image)
    image_id = record['id']
    glance_env(env, glance, num_retries=2, read_timeout=1)
    proc = subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--config-file', env.conf_path,
         'fetch', image_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if any(st.st_size >= MiB
                   for st in files_written(proc.pid, env.base_dir)):
                break
            time.sleep(0.001)
        glance.freeze()
        frozen_at = time.monotonic()
        written = max((st.st_size for st in files_written(
            proc.pid, env.base_dir)), default=None)
        _, stderr = proc.communicate(timeout=120)
        elapsed = time.monotonic() - frozen_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        glance.thaw()
    assert written is not None and written < record['size'], \
        'the download was not caught mid-way (it finished first)'
    assert proc.returncode == 1, stderr
    assert 'after 3 attempt(s)' in stderr and image_id in stderr
    assert 'Nothing was published' in stderr
    assert 'Traceback' not in stderr
    # three attempts of read_timeout = 1 s each, backoff 0.5 s + 1 s
    assert elapsed < 20, elapsed
    assert env.base_files() == []

    path = last_line(env.cli('fetch', image_id))
    assert compare_raw(path, big_image)
    env.cli('remove', image_id)
