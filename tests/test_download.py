"""The downloading handler on real images, a real HTTP server on loopback
(the Glance stand-in) and the local catalog."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from agent import errors
from tests.conftest import (REPO, files_written, make_raw,
                            same_content)

MiB = 1024 * 1024


def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


@pytest.mark.parametrize('name,disk_format', [
    ('disk.raw', 'raw'), ('disk.qcow2', 'qcow2'), ('disk.vmdk', 'vmdk'),
    ('disk.vhd', 'vhd')])
def test_fetch_from_glance_gives_verified_raw_base(glance_env, glance,
                                                    image_files, name,
                                                    disk_format):
    glance.add('img-' + disk_format, image_files[name],
               disk_format=disk_format)
    proc = glance_env.cli('fetch', 'img-' + disk_format)
    path = proc.stdout.strip().splitlines()[-1]
    assert path == os.path.join(glance_env.base_dir, sha1('img-' +
                                                         disk_format))
    info = subprocess.run(['qemu-img', 'info', '--output=json', path],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "raw"' in info
    assert same_content(path, image_files['disk.raw'])
    # sparse: the 6 MiB of zeros at the end take no disk
    assert os.stat(path).st_blocks * 512 < 4 * MiB
    assert glance_env.base_files() == [sha1('img-' + disk_format)]


def test_fetch_is_idempotent_and_lists_json(glance_env, glance, image_files):
    glance.add('img', image_files['disk.raw'])
    first = glance_env.cli('fetch', 'img').stdout.strip()
    second = glance_env.cli('fetch', 'img').stdout.strip()
    assert first == second
    assert glance.downloads('img') == 1
    rows = glance_env.cli_json('list')
    assert len(rows) == 1
    row = rows[0]
    for key in ('image_id', 'path', 'handler', 'size_bytes', 'in_use',
                'users', 'last_used'):
        assert key in row
    assert row['image_id'] == 'img' and row['handler'] == 'downloading'
    assert row['size_bytes'] == os.path.getsize(image_files['disk.raw'])
    assert row['in_use'] is False and row['users'] == []
    assert row['hash_algo'] == 'sha512'


def test_local_catalog_import_and_fetch(env, image_files):
    env.cli('images', 'import', image_files['disk.qcow2'], '--id', 'cirros',
            '--name', 'CirrOS', '--owner', 'p1', '--visibility', 'public')
    catalog = env.cli_json('images', 'list')
    assert catalog[0]['id'] == 'cirros'
    assert catalog[0]['disk_format'] == 'qcow2'
    assert catalog[0]['virtual_size'] == 8 * MiB
    assert catalog[0]['os_hash_algo'] == 'sha512'
    with open(image_files['disk.qcow2'], 'rb') as f:
        assert catalog[0]['checksum'] == hashlib.md5(f.read()).hexdigest()
    path = env.cli('fetch', 'cirros').stdout.strip()
    assert same_content(path, image_files['disk.raw'])


def test_import_refuses_a_format_lie(env, image_files):
    proc = env.cli('images', 'import', image_files['disk.qcow2'], '--id',
                   'liar', '--disk-format', 'raw', check=False)
    assert proc.returncode == 1
    assert 'qcow2' in proc.stderr and 'Traceback' not in proc.stderr
    assert env.cli_json('images', 'list') == []


@pytest.mark.parametrize('name,disk_format,reason', [
    ('disk.qcow2', 'raw', 'content is qcow2'),
    ('disk.raw', 'qcow2', 'content is raw'),
    ('backing.qcow2', 'qcow2', 'backing_file'),
    ('datafile.qcow2', 'qcow2', 'data_file'),
])
def test_unsafe_or_mislabeled_images_are_refused(glance_env, glance,
                                                 image_files, name,
                                                 disk_format, reason):
    glance.add('bad', image_files[name], disk_format=disk_format)
    proc = glance_env.cli('fetch', 'bad', check=False)
    assert proc.returncode == 1
    assert reason in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert glance_env.base_files() == []


def test_virtual_size_limit(glance_env, glance, image_files):
    glance_env.configure(DEFAULT={'max_image_virtual_size_gb': 1})
    glance.add('big', image_files['big.qcow2'], disk_format='qcow2')
    proc = glance_env.cli('fetch', 'big', check=False)
    assert proc.returncode == 1
    assert 'max_image_virtual_size_gb=1' in proc.stderr
    assert glance_env.base_files() == []
    # the metadata's virtual_size is checked before any byte is fetched
    glance.add('big2', image_files['big.qcow2'], disk_format='qcow2',
               virtual_size=100 * 1024 ** 3)
    proc = glance_env.cli('fetch', 'big2', check=False)
    assert proc.returncode == 1 and glance.downloads('big2') == 0


def test_checksum_mismatch(glance_env, glance, image_files):
    glance.add('tampered', image_files['disk.raw'],
               os_hash_value='0' * 128)
    proc = glance_env.cli('fetch', 'tampered', check=False)
    assert proc.returncode == 1
    assert 'sha512' in proc.stderr and 'tampered' in proc.stderr
    assert glance_env.base_files() == []
    # the legacy md5 checksum is verified when there is no multihash and
    # the operator accepts weak hashes (else refused: test_download_trust)
    glance_env.configure(glance={'allow_weak_hashes': True})
    glance.add('md5only', image_files['disk.raw'], os_hash_algo=None,
               os_hash_value=None, checksum='0' * 32)
    proc = glance_env.cli('fetch', 'md5only', check=False)
    assert proc.returncode == 1
    assert 'its md5 is' in proc.stderr and 'tampered' in proc.stderr
    assert glance_env.base_files() == []


@pytest.mark.parametrize('image_id', ['../etc', 'a/b', '..', '', 'x\0y',
                                      '-rf'])
def test_path_tricks_in_ids(env, image_id):
    agent = env.agent()
    with pytest.raises(errors.InvalidImageId):
        agent.fetch_image(image_id)
    assert not os.path.exists(env.base_dir) or env.base_files() == []


def test_cli_rejects_bad_id_without_traceback(env):
    proc = env.cli('fetch', '../../etc/passwd', check=False)
    assert proc.returncode == 2
    assert 'Invalid image id' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_unknown_image(glance_env, env):
    proc = glance_env.cli('fetch', 'nope', check=False)
    assert proc.returncode == 1
    assert 'nope not found' in proc.stderr
    env.configure(image_source={'driver': 'local'})
    proc = env.cli('fetch', 'nope', check=False)
    assert proc.returncode == 1 and 'local catalog' in proc.stderr


def test_glance_500_is_retried_then_succeeds(glance_env, glance,
                                             image_files):
    glance.add('flaky', image_files['disk.raw'])
    glance.fail('flaky', status=503, times=2)
    path = glance_env.cli('fetch', 'flaky').stdout.strip()
    assert same_content(path, image_files['disk.raw'])
    assert glance.downloads('flaky') == 3


def test_glance_500_forever_fails_cleanly(glance_env, glance, image_files):
    glance.add('down', image_files['disk.raw'])
    glance.fail('down', status=500)
    proc = glance_env.cli('fetch', 'down', check=False)
    assert proc.returncode == 1
    assert 'after 3 attempt' in proc.stderr
    assert glance.downloads('down') == 3  # num_retries = 2
    assert glance_env.base_files() == []


def test_glance_404_on_data_is_not_retried(glance_env, glance, image_files):
    glance.add('gone', image_files['disk.raw'])
    glance.fail('gone', status=404)
    proc = glance_env.cli('fetch', 'gone', check=False)
    assert proc.returncode == 1 and 'not found' in proc.stderr
    assert glance.downloads('gone') == 1


def test_truncated_stream_is_resumed_with_range(glance_env, glance,
                                                image_files):
    glance.add('cut', image_files['disk.raw'])
    glance.fail('cut', truncate_after=3 * MiB // 2, times=2)
    path = glance_env.cli('fetch', 'cut').stdout.strip()
    assert same_content(path, image_files['disk.raw'])
    assert glance.downloads('cut') == 3


def test_truncated_stream_forever_fails_cleanly(glance_env, glance,
                                                image_files):
    glance.add('cut', image_files['disk.raw'])
    glance.fail('cut', truncate_after=MiB // 2)
    proc = glance_env.cli('fetch', 'cut', check=False)
    assert proc.returncode == 1 and 'Nothing was published' in proc.stderr
    assert glance_env.base_files() == []


def test_stalled_stream_times_out_and_resumes(glance_env, glance,
                                              image_files):
    glance_env.configure(glance={'read_timeout': '0.5'})
    glance.add('slow', image_files['disk.raw'])
    glance.fail('slow', stall_after=MiB, stall_seconds=5, times=1)
    path = glance_env.cli('fetch', 'slow').stdout.strip()
    assert same_content(path, image_files['disk.raw'])
    assert glance.downloads('slow') == 2


def test_dead_glance(env):
    env.configure(image_source={'driver': 'glance'},
                  glance={'api_servers': 'http://127.0.0.1:9'})
    proc = env.cli('fetch', 'x', check=False)
    assert proc.returncode == 1
    assert 'unavailable' in proc.stderr and 'api_servers' in proc.stderr


def test_failover_to_second_api_server(env, glance, image_files):
    glance.add('img', image_files['disk.raw'])
    env.configure(image_source={'driver': 'glance'},
                  glance={'api_servers': 'http://127.0.0.1:9,' + glance.url})
    path = env.cli('fetch', 'img').stdout.strip()
    assert same_content(path, image_files['disk.raw'])


def test_concurrent_threads_make_one_download(glance_env, glance,
                                              image_files):
    glance.add('shared', image_files['disk.qcow2'], disk_format='qcow2')
    agent = glance_env.agent()
    results, failures = [], []

    def fetch():
        try:
            results.append(agent.fetch_image('shared'))
        except Exception as exc:  # collected and asserted below
            failures.append(exc)
    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(set(results)) == 1 and len(results) == 6
    assert glance.downloads('shared') == 1


def test_concurrent_processes_make_one_download(glance_env, glance,
                                                image_files):
    glance.add('shared', image_files['disk.raw'])
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--config-file',
         glance_env.conf_path, 'fetch', 'shared'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO)) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert glance.downloads('shared') == 1
    # the lock file is nova's: nova-<sha1> under instances_path/locks
    assert os.path.exists(os.path.join(glance_env.instances, 'locks',
                                       'nova-' + sha1('shared')))


def test_sigkill_mid_stream_leaves_nothing_final(glance_env, glance,
                                                 image_files):
    glance.add('killme', image_files['disk.raw'])
    glance.fail('killme', stall_after=MiB, stall_seconds=30, times=1)
    glance_env.configure(glance={'read_timeout': '30'})
    proc = subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--config-file',
         glance_env.conf_path, 'fetch', 'killme'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.time() + 30
    while time.time() < deadline and not any(
            st.st_size >= MiB for st in files_written(proc.pid,
                                                     glance_env.base_dir)):
        time.sleep(0.05)
    try:
        assert files_written(proc.pid, glance_env.base_dir), \
            'the fetch never started writing'
        # the file being written has no name in _base yet
        assert glance_env.base_files() == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sha1('killme') not in glance_env.base_files()
    # the next fetch cleans the leftover and succeeds
    path = glance_env.cli('fetch', 'killme').stdout.strip()
    assert same_content(path, image_files['disk.raw'])
    assert glance_env.base_files() == [sha1('killme')]


def test_init_cleans_leftovers_and_adopts_nova_bases(env, image_files):
    os.makedirs(env.base_dir)
    nova_made = os.path.join(env.base_dir, sha1('made-by-nova'))
    shutil.copy(image_files['disk.raw'], nova_made)
    leftover = os.path.join(env.base_dir, sha1('x') + '.part')
    open(leftover, 'w').close()
    stranger = os.path.join(env.base_dir, 'README')
    open(stranger, 'w').close()
    report = env.cli_json('init')
    assert report['cleaned'] == [sha1('x') + '.part']
    assert report['adopted'] == [sha1('made-by-nova')]
    assert os.path.exists(stranger) and os.path.exists(nova_made)
    rows = env.cli_json('list')
    assert [r['filename'] for r in rows] == [sha1('made-by-nova')]
    assert rows[0]['image_id'] is None and rows[0]['adopted']
    # the file being gone drops its entry
    os.unlink(nova_made)
    assert env.cli_json('init')['dropped'] == [sha1('made-by-nova')]


def test_nova_made_base_is_served_without_download(glance_env, glance,
                                                   image_files):
    os.makedirs(glance_env.base_dir)
    shutil.copy(image_files['disk.raw'],
                os.path.join(glance_env.base_dir, sha1('img')))
    glance.add('img', image_files['disk.raw'])
    glance_env.cli('fetch', 'img')
    assert glance.downloads('img') == 0
    assert glance_env.cli_json('list')[0]['image_id'] == 'img'


@pytest.fixture
def tiny_fs(tmp_path):
    """A 24 MiB ext4 filesystem on a real loop device, for full disks."""
    img = tmp_path / 'fs.img'
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    with open(img, 'wb') as f:
        f.truncate(24 * MiB)
    subprocess.run(['mkfs.ext4', '-q', '-F', str(img)], check=True)
    dev = subprocess.run(['losetup', '-f', '--show', str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(['mount', dev, str(mnt)], check=True)
        try:
            yield str(mnt)
        finally:
            if subprocess.run(['umount', str(mnt)]).returncode != 0:
                subprocess.run(['umount', '-l', str(mnt)], check=True)
    finally:
        subprocess.run(['losetup', '-d', dev], check=True)


def _tiny_env(tiny_fs, glance, tmp_path):
    from tests.conftest import AgentEnv
    env = AgentEnv(tmp_path / 'cfg', instances=tiny_fs)
    env.configure(image_source={'driver': 'glance'},
                  glance={'api_servers': glance.url, 'read_timeout': 30})
    return env


def test_too_big_for_the_disk_is_refused_before_download(tiny_fs, glance,
                                                         tmp_path):
    env = _tiny_env(tiny_fs, glance, tmp_path)
    glance.add('huge', make_raw(str(tmp_path / 'big.raw'), data_mib=40,
                                total_mib=40))
    proc = env.cli('fetch', 'huge', check=False)
    assert proc.returncode == 1
    assert 'Not enough space' in proc.stderr, proc.stderr
    assert env.base_files() == [] and glance.downloads('huge') == 0


def test_disk_filling_up_mid_stream_fails_cleanly(tiny_fs, glance, tmp_path):
    env = _tiny_env(tiny_fs, glance, tmp_path)
    glance.add('img', make_raw(str(tmp_path / 'img.raw'), data_mib=12,
                               total_mib=12))
    glance.fail('img', stall_after=2 * MiB, stall_seconds=2, times=1)
    proc = subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--config-file', env.conf_path,
         'fetch', 'img'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.time() + 20
    while time.time() < deadline and not files_written(proc.pid,
                                                       env.base_dir):
        time.sleep(0.02)
    # while the server stalls, something else fills the disk
    filler = os.path.join(tiny_fs, 'filler')
    free = shutil.disk_usage(tiny_fs).free
    subprocess.run(['fallocate', '-l', str(free - 256 * 1024), filler],
                   check=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        os.unlink(filler)
    assert proc.returncode == 1
    assert 'Not enough space' in stderr, stderr
    assert env.base_files() == []
    assert glance.downloads('img') == 1  # ENOSPC is never retried


# -- structurally damaged images ----------------------------------------------
def truncated(src, path, fraction=3):
    """A copy of ``src`` cut to ``1/fraction`` of its size: its tables
    point past the end of the file."""
    shutil.copyfile(src, path)
    os.truncate(path, os.path.getsize(path) // fraction)
    return path


def leak_one_cluster(src, path):
    """A copy of qcow2 ``src`` with one leaked cluster: a cluster past the
    old end whose refcount is 1 while nothing references it (what a crash
    between a refcount update and the L2 write leaves)."""
    import struct
    shutil.copyfile(src, path)
    with open(path, 'r+b') as f:
        header = f.read(104)
        version, = struct.unpack('>I', header[4:8])
        cluster_size = 1 << struct.unpack('>I', header[20:24])[0]
        table, = struct.unpack('>Q', header[48:56])
        order = struct.unpack('>I', header[96:100])[0] if version >= 3 else 4
        assert order == 4  # 16-bit refcounts, qemu-img's default
        f.seek(table)
        block, = struct.unpack('>Q', f.read(8))
        cluster = -(-os.fstat(f.fileno()).st_size // cluster_size)
        assert cluster < cluster_size // 2   # covered by the first block
        f.seek(block + 2 * cluster)
        f.write(struct.pack('>H', 1))
        f.truncate((cluster + 1) * cluster_size)
    return path


@pytest.fixture(scope='module')
def damaged(tmp_path_factory, image_files):
    d = tmp_path_factory.mktemp('damaged')
    subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'vhdx',
                    image_files['disk.raw'], str(d / 'disk.vhdx')],
                   check=True, capture_output=True)
    return {
        'qcow2': truncated(image_files['disk.qcow2'], str(d / 't.qcow2')),
        'vmdk': truncated(image_files['disk.vmdk'], str(d / 't.vmdk')),
        'vhdx': truncated(str(d / 'disk.vhdx'), str(d / 't.vhdx')),
        'leaky': leak_one_cluster(image_files['disk.qcow2'],
                                  str(d / 'leaky.qcow2')),
    }


@pytest.mark.parametrize('force_raw', [True, False])
@pytest.mark.parametrize('fmt', ['qcow2', 'vmdk', 'vhdx'])
def test_truncated_image_is_refused_not_zero_filled(
        glance_env, glance, damaged, image_files, fmt, force_raw):
    """A truncated image whose bytes match its hash converts without an
    error into zeros where its clusters are missing; qemu-img check finds
    it, and nothing is published."""
    src = damaged[fmt]
    # what the agent used to publish: for qcow2 and vmdk, qemu-img convert
    # succeeds and the result is not the image (vhdx's convert fails)
    probe = os.path.join(os.path.dirname(src), 'probe-%s.raw' % fmt)
    convert = subprocess.run(['qemu-img', 'convert', '-f', fmt, '-O', 'raw',
                              src, probe], capture_output=True)
    if fmt != 'vhdx':
        assert convert.returncode == 0
        assert not same_content(probe, image_files['disk.raw'])
    else:
        assert convert.returncode != 0
    if os.path.exists(probe):
        os.unlink(probe)

    glance_env.configure(DEFAULT={'force_raw_images': force_raw})
    glance.add('cut', src, disk_format=fmt)
    proc = glance_env.cli('fetch', 'cut', check=False)
    assert proc.returncode == 1, proc.stdout
    assert 'refused: qemu-img check finds the %s image damaged' % fmt in \
        proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert glance_env.base_files() == []
    # typed, and never retried or handed to the next handler
    agent = glance_env.agent()
    try:
        with pytest.raises(errors.ImageCorrupt) as caught:
            agent.fetch_image('cut')
    finally:
        agent.close()
    assert isinstance(caught.value, errors.ImageUnacceptable)
    assert not caught.value.falls_through
    assert glance_env.base_files() == []


def test_leaked_clusters_alone_are_accepted(glance_env, glance, damaged,
                                            image_files):
    leaky = damaged['leaky']
    check = subprocess.run(['qemu-img', 'check', '-f', 'qcow2', leaky],
                           capture_output=True, text=True)
    assert check.returncode == 3 and '1 leaked clusters' in check.stdout
    glance.add('leaky', leaky, disk_format='qcow2')
    path = glance_env.cli('fetch', 'leaky').stdout.strip().splitlines()[-1]
    assert same_content(path, image_files['disk.raw'])
