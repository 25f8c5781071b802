"""SIGKILL at many points of fetch, link, clone and volume create, then
``init``: nothing is leaked (no loop device that no base links, no volume
left half made, no orphan template, no temporary file, no stray name in
``_base``), and what was complete is intact."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, AgentEnv, make_raw, qemu_img
from tests.test_volume_linking import loops_under, unplug

MiB = 1024 * 1024
KILLS_PER_OPERATION = 6
OPERATIONS = {
    # name: (CLI arguments, image id prefix)
    'fetch-linked-miss': (['fetch'], 'lm'),
    'fetch-downloading': (['fetch', '--handler', 'downloading'], 'dl'),
    'volume-create-miss': (['volume', 'create', '--size', '1', '--image'],
                           'vm'),
    'volume-create-clone': (['volume', 'create', '--size', '1', '--image'],
                            'cached'),
}


@pytest.fixture
def crash_env(tmp_path):
    env = AgentEnv(tmp_path, DEFAULT={'template_image_handler':
                                      'volume_linking,downloading'})
    raw = make_raw(str(tmp_path / 'img.raw'), data_mib=24, total_mib=48)
    qcow2 = str(tmp_path / 'img.qcow2')
    qemu_img('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2)
    env.image = qcow2
    try:
        yield env
    finally:
        unplug('%s/' % tmp_path)


def run_cli(env, args):
    return subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--direct', '--config-file',
         env.conf_path] + args, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=REPO))


def duration(env, args):
    started = time.monotonic()
    proc = run_cli(env, args)
    assert proc.wait(timeout=120) == 0, args
    return time.monotonic() - started


def leaks(env, tmp_path):
    """What is left that nothing accounts for."""
    found = []
    linked = set()
    for name in env.base_files():
        path = os.path.join(env.base_dir, name)
        if not (len(name) == 40 or '_' in name):
            found.append('stray name in _base: %s' % name)
        elif os.path.islink(path):
            linked.add(os.path.realpath(path))
    for device in loops_under(tmp_path):
        if device not in linked:
            found.append('loop device linked from nowhere: %s' % device)
    for name in os.listdir(env.state):
        if name.startswith('tmp-'):
            found.append('temporary file: %s' % name)
    tmp_dir = os.path.join(env.state, 'image-volume-cache', 'tmp')
    if os.path.isdir(tmp_dir):
        found += ['cache temporary file: %s' % n for n in os.listdir(tmp_dir)]
    volumes = env.cli_json('volume', 'list')
    templates = {e['volume_id'] for e in env.cli_json('cache', 'list')}
    for volume in volumes:
        meta = volume['metadata']
        if meta.get('status') == 'creating':
            found.append('volume never finished: %s' % volume['id'])
        if meta.get('kind') == 'template' and volume['id'] not in templates:
            found.append('orphan template: %s' % volume['id'])
    volume_dir = os.path.join(env.state, 'volumes')
    names = set(os.listdir(volume_dir)) if os.path.isdir(volume_dir) else ()
    for name in names:
        if name.startswith('volume-') and not name.endswith('.json') and \
                name + '.json' not in names:
            found.append('volume data without metadata: %s' % name)
    listed = {row['filename'] for row in env.cli_json('list')}
    if listed != {n for n in env.base_files()}:
        found.append('index and _base disagree: %s vs %s'
                     % (sorted(listed), env.base_files()))
    return found


def test_sigkill_anywhere_then_init_leaks_nothing(crash_env, tmp_path):
    env = crash_env
    env.cli('images', 'import', env.image, '--id', 'cached')
    env.cli('fetch', 'cached')  # its template, for the clones
    spans = {}
    for name, (args, prefix) in OPERATIONS.items():
        env.cli('images', 'import', env.image, '--id', prefix + '-timing')
        image = [] if prefix == 'cached' else [prefix + '-timing']
        spans[name] = duration(env, args + (image or ['cached']))
    kills = 0
    for name, (args, prefix) in OPERATIONS.items():
        for n in range(KILLS_PER_OPERATION):
            image_id = prefix if prefix == 'cached' else '%s-%d' % (prefix,
                                                                    n)
            if prefix != 'cached':
                env.cli('images', 'import', env.image, '--id', image_id)
            # spread the kills over the operation, start-up included
            delay = spans[name] * (n + 0.5) / KILLS_PER_OPERATION
            proc = run_cli(env, args + [image_id])
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
            report = env.cli_json('init')
            assert leaks(env, tmp_path) == [], (name, n, delay, report)
    assert kills >= 20
    # what survived still works: every base reads back as the image
    for name in env.base_files():
        path = os.path.join(env.base_dir, name)
        assert subprocess.run(['qemu-img', 'compare', '-f', 'raw', '-F',
                               'qcow2', path, env.image],
                              capture_output=True).returncode == 0, name


def test_reclaim_cleans_a_dead_writer_s_leftovers_without_a_restart(env):
    dead = subprocess.Popen(['true'])
    dead.wait()
    os.makedirs(env.state, exist_ok=True)
    left = 'tmp-%d-0123.part' % dead.pid
    live = 'tmp-%d-4567.part' % os.getpid()    # this test is alive
    for name in (left, live):
        with open(os.path.join(env.state, name), 'wb') as f:
            f.write(b'half an image')
    report = env.cli_json('reclaim')
    assert report['temporary_files'] == [left]
    assert sorted(n for n in os.listdir(env.state)
                  if n.startswith('tmp-')) == [live]
