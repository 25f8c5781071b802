"""The agent beside a real nova: nova 34.0.0's own libvirt image backends
(``nova.virt.libvirt.imagebackend``) and image cache manager
(``nova.virt.libvirt.imagecache``), run by ``tests/nova_driver.py`` in
nova's venv (``tests/real_nova.py``).

For ``qcow2``, ``flat`` and ``raw`` and bases made by both handlers, nova's
``Image.cache()`` is called as the libvirt driver's
``_try_fetch_image_cache`` calls it, with a ``fetch_func`` that records the
call and fails: nova must never download a base the agent made. Then the
instance disk must be what the backend promises, nova's lock and the
agent's must hold each other off, and neither nova's ``update()`` nor the
agent's ``prune`` may remove a base the other side's instance uses.
"""

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import MiB, REPO, AgentEnv
from tests.real_nova import real_nova  # noqa: F401 (the fixture)

CHAINS = {'downloading': 'downloading',
          'volume_linking': 'volume_linking,downloading'}


def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


def qemu_info(path):
    return json.loads(subprocess.run(
        ['qemu-img', 'info', '-U', '--output=json', path], check=True,
        capture_output=True, text=True).stdout)


def same_content(a, b, fa, fb):
    return subprocess.run(['qemu-img', 'compare', '-U', '-f', fa, '-F', fb,
                           a, b], capture_output=True).returncode == 0


def loops_under(root):
    out = subprocess.run(['losetup', '-l', '-n', '-O', 'NAME,BACK-FILE'],
                         capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(' ')
        if back.strip().startswith(str(root).rstrip('/') + '/'):
            found.append(name)
    return found


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %s s waiting for %s'
                                 % (timeout, what))
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_leaked_loop_devices(tmp_path):
    """Loop devices left over a test's files are detached at the end (and
    fail the test): the agent's own remove and prune must detach them."""
    leaked = []
    try:
        yield
    finally:
        leaked = loops_under(tmp_path)
        for device in leaked:
            subprocess.run(['losetup', '-d', device], capture_output=True)
    assert leaked == [], 'loop devices left attached: %s' % leaked


@pytest.fixture
def nenv(tmp_path):
    return AgentEnv(tmp_path, api={'socket_path': tmp_path / 'api.sock'})


def nova_request(env, op, images_type='qcow2', **fields):
    req = {'op': op, 'instances_path': env.instances,
           'images_type': images_type, 'use_cow_images': True}
    req.update(fields)
    return req


def instance(image_id, n=1):
    return {'id': n, 'uuid': str(uuid.UUID(int=n)), 'image_id': image_id}


def row_of(env, image_id):
    rows = {r['filename']: r for r in env.cli_json('list')}
    return rows.get(sha1(image_id))


# -- nova builds instance disks on the agent's bases -------------------------
@pytest.mark.parametrize('images_type', ['qcow2', 'flat', 'raw'])
@pytest.mark.parametrize('handler', sorted(CHAINS))
def test_nova_builds_instance_disks_on_agent_bases_without_downloading(
        real_nova, nenv, image_files, handler, images_type):  # noqa: F811
    env = nenv
    env.configure(DEFAULT={'template_image_handler': CHAINS[handler]},
                  libvirt={'images_type': images_type})
    image_id = 'img-%s-%s' % (handler.replace('_', '-'), images_type)
    src = image_files['disk.qcow2']
    env.cli('images', 'import', src, '--id', image_id)
    base = env.cli('fetch', image_id).stdout.strip().splitlines()[-1]
    assert base == os.path.join(env.base_dir, sha1(image_id))
    linked = handler == 'volume_linking' and images_type == 'qcow2'
    row = row_of(env, image_id)
    assert row['handler'] == ('volume_linking' if linked else 'downloading')
    assert os.path.islink(base) is linked
    assert stat.S_ISBLK(os.stat(base).st_mode) is linked

    inst = instance(image_id)
    answer = real_nova.run(nova_request(
        env, 'cache', images_type, instance=inst, size=16 * MiB,
        forbid_fetch=True))
    assert answer['fetched'] == [], 'nova downloaded a base the agent made'
    assert answer['error'] is None, answer['error']
    disk = os.path.join(env.instances, inst['uuid'], 'disk')
    assert answer['disk'] == disk
    assert answer['backend'] == ('Qcow2' if images_type == 'qcow2'
                                 else 'Flat')
    lst = os.lstat(disk)
    assert stat.S_ISREG(lst.st_mode), 'the instance disk is not a file'
    info = qemu_info(disk)
    assert info['virtual-size'] == 16 * MiB   # cache() grew it as asked
    if images_type == 'qcow2':
        # an overlay whose backing file is the base, by its _base name
        assert info['format'] == 'qcow2'
        assert info['backing-filename'] == base
        assert info.get('backing-filename-format') in (None, 'raw')
        assert same_content(disk, src, 'qcow2', 'qcow2')
        users = row_of(env, image_id)['users']
        assert users == ['disk:' + disk], users
    else:
        # an independent regular file: not a link, its own inode, no
        # backing file, and qemu-img can grow it
        assert info['format'] == 'raw' and 'backing-filename' not in info
        assert lst.st_nlink == 1
        assert (lst.st_dev, lst.st_ino) != (os.stat(base).st_dev,
                                            os.stat(base).st_ino)
        subprocess.run(['qemu-img', 'resize', '-f', 'raw', disk,
                        str(24 * MiB)], check=True, capture_output=True)
        assert os.stat(disk).st_size == 24 * MiB
        assert same_content(disk, src, 'raw', 'qcow2')
        assert row_of(env, image_id)['users'] == []

    # nova's cache manager, told of the instance, keeps the base (min ages
    # 0: only usage keeps it)
    ages = {'remove_unused_original_minimum_age_seconds': 0,
            'remove_unused_resized_minimum_age_seconds': 0}
    update = real_nova.run(nova_request(
        env, 'update', images_type, instances=[inst], image_cache=ages))
    assert update['removed'] == [], update
    assert base in update['active'], update
    assert os.path.lexists(base) and os.path.exists(base)

    # the agent's pass with its default ages keeps it too: nova just
    # touched it, as nova's manager does for every base it counts in use
    report = env.cli_json('prune', '--yes')
    assert report['removed'] == [] and report['failed'] == [], report
    assert os.path.exists(base)

    if images_type == 'qcow2':
        # the overlay needs its base: never removed while it exists
        report = env.cli_json('prune', '--yes', '--min-age', '0')
        assert report['removed'] == [], report
        assert [e['filename'] for e in report['in_use']] == [sha1(image_id)]
        proc = env.cli('remove', image_id, check=False)
        assert proc.returncode == 1 and 'disk:' + disk in proc.stderr
        assert os.path.exists(base)
        assert same_content(disk, src, 'qcow2', 'qcow2')
        # the instance goes: so may its base
        subprocess.run(['rm', '-rf', os.path.dirname(disk)], check=True)
    report = env.cli_json('prune', '--yes', '--min-age', '0')
    assert [e['filename'] for e in report['removed']] == [sha1(image_id)]
    assert not os.path.lexists(base)
    if images_type != 'qcow2':
        # a flat or raw disk does not depend on its base
        assert same_content(disk, src, 'raw', 'qcow2')
    assert loops_under(env.root) == []


@pytest.mark.parametrize('images_type', ['flat', 'raw'])
def test_why_flat_and_raw_need_a_file_nova_copies_a_link_as_a_link(
        real_nova, nenv, image_files, images_type):  # noqa: F811
    """What the rule above prevents: a base linked while the agent was
    told qcow2, then used by nova's flat or raw backend. nova's ``cp -r``
    copies the symlink: the instance disk is a link to the read-only
    device of the template, not a disk of its own."""
    env = nenv
    env.configure(DEFAULT={'template_image_handler': CHAINS['volume_linking']},
                  libvirt={'images_type': 'qcow2'})
    image_id = 'img-linked-' + images_type
    env.cli('images', 'import', image_files['disk.qcow2'], '--id', image_id)
    base = env.cli('fetch', image_id).stdout.strip().splitlines()[-1]
    assert os.path.islink(base)
    inst = instance(image_id, 6)
    answer = real_nova.run(nova_request(env, 'cache', images_type,
                                        instance=inst, forbid_fetch=True))
    disk = answer['disk']
    assert os.path.islink(disk) and \
        os.path.realpath(disk) == os.path.realpath(base)
    # and the agent sees that disk as a user of the base
    assert row_of(env, image_id)['users'] == ['disk:' + disk]
    proc = env.cli('remove', image_id, check=False)
    assert proc.returncode == 1 and 'disk:' + disk in proc.stderr
    subprocess.run(['rm', '-rf', os.path.dirname(disk)], check=True)
    env.cli('remove', image_id)


# -- bases nova made ----------------------------------------------------------
@pytest.mark.parametrize('handler', sorted(CHAINS))
def test_agent_adopts_and_keeps_the_bases_nova_made(
        real_nova, nenv, image_files, handler):  # noqa: F811
    env = nenv
    env.configure(DEFAULT={'template_image_handler': CHAINS[handler]})
    image_id = 'img-nova-made'
    inst = instance(image_id, 2)
    answer = real_nova.run(nova_request(
        env, 'cache', instance=inst, source=image_files['disk.raw'],
        source_format='raw'))
    assert answer['error'] is None, answer['error']
    assert len(answer['fetched']) == 1     # nova downloaded it itself
    base = os.path.join(env.base_dir, sha1(image_id))
    disk = answer['disk']
    assert qemu_info(disk)['backing-filename'] == base

    # the agent adopts it, finds it in use, and neither removes nor
    # replaces it
    row = row_of(env, image_id)
    assert row['adopted'] is True and row['handler'] == 'downloading'
    assert row['users'] == ['disk:' + disk]
    env.cli('images', 'import', image_files['disk.raw'], '--id', image_id)
    st = os.stat(base)
    env.cli('fetch', image_id)
    assert (os.stat(base).st_ino, os.path.islink(base)) == (st.st_ino, False)
    report = env.cli_json('prune', '--yes', '--min-age', '0')
    assert report['removed'] == [] and report['warnings'] == [], report
    proc = env.cli('remove', image_id, check=False)
    assert proc.returncode == 1 and 'in use' in proc.stderr
    assert os.path.isfile(base)
    assert same_content(disk, image_files['disk.raw'], 'qcow2', 'raw')


# -- a base the agent linked and nova's cache manager -------------------------
def test_nova_update_never_removes_linked_bases_or_used_ones(
        real_nova, nenv, image_files):  # noqa: F811
    """nova's manager removes unused regular-file bases older than its
    ages, whoever made them (the agent then forgets them); a linked base
    is not a file to nova and is left to the agent; a used one stays."""
    env = nenv
    env.configure(DEFAULT={'template_image_handler': CHAINS['volume_linking']})
    for image_id in ('img-used', 'img-linked-unused'):
        env.cli('images', 'import', image_files['disk.qcow2'], '--id',
                image_id)
        env.cli('fetch', image_id)
    env.cli('images', 'import', image_files['disk.raw'], '--id',
            'img-downloaded-unused')
    env.cli('fetch', 'img-downloaded-unused', '--handler', 'downloading')
    bases = {i: os.path.join(env.base_dir, sha1(i)) for i in
             ('img-used', 'img-linked-unused', 'img-downloaded-unused')}
    assert os.path.islink(bases['img-used'])
    assert os.path.islink(bases['img-linked-unused'])
    assert not os.path.islink(bases['img-downloaded-unused'])

    inst = instance('img-used', 3)
    answer = real_nova.run(nova_request(env, 'cache', instance=inst,
                                        forbid_fetch=True))
    assert answer['fetched'] == [] and answer['error'] is None, answer
    ages = {'remove_unused_original_minimum_age_seconds': 0,
            'remove_unused_resized_minimum_age_seconds': 0}
    update = real_nova.run(nova_request(env, 'update', instances=[inst],
                                        image_cache=ages))
    assert update['removed'] == [sha1('img-downloaded-unused')], update
    assert bases['img-used'] in update['active']
    assert os.path.exists(bases['img-used'])
    assert os.path.exists(bases['img-linked-unused'])
    rows = {r['image_id']: r for r in env.cli_json('list')}
    assert 'img-downloaded-unused' not in rows
    assert rows['img-used']['users'] == ['disk:' + answer['disk']]
    # the agent's pass removes the unused link (and detaches its device),
    # never the used one
    report = env.cli_json('prune', '--yes', '--min-age', '0')
    assert [e['filename'] for e in report['removed']] == [
        sha1('img-linked-unused')], report
    assert os.path.exists(bases['img-used'])
    assert same_content(answer['disk'], image_files['disk.qcow2'], 'qcow2',
                        'qcow2')
    subprocess.run(['rm', '-rf', os.path.dirname(answer['disk'])],
                   check=True)
    env.cli('remove', 'img-used')
    assert loops_under(env.root) == []


# -- locks --------------------------------------------------------------------
def start_cli(env, *args):
    return subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--config-file', env.conf_path]
        + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, PYTHONPATH=REPO))


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out, time.time()


def test_nova_holding_its_lock_holds_off_the_agent(
        real_nova, glance_env, glance, image_files, tmp_path):  # noqa: F811
    """nova is downloading a base under its lock: the agent's fetch waits,
    then adopts nova's base instead of downloading it again."""
    env = glance_env
    image_id = str(uuid.uuid4())
    glance.add(image_id, image_files['disk.raw'])
    fetching, go = str(tmp_path / 'fetching'), str(tmp_path / 'go')
    inst = instance(image_id, 4)
    nova = real_nova.start(nova_request(
        env, 'cache', instance=inst, source=image_files['disk.raw'],
        source_format='raw', fetching_file=fetching,
        fetch_wait={'until': go, 'timeout': 60}))
    agent = None
    base = os.path.join(env.base_dir, sha1(image_id))
    try:
        wait_for(lambda: os.path.exists(fetching), 60, 'nova to fetch')
        agent = start_cli(env, 'fetch', image_id)
        time.sleep(2)
        assert agent.poll() is None, 'the agent did not wait for nova'
        assert not os.path.lexists(base)
    finally:
        with open(go, 'w'):
            pass
        answer = real_nova.wait(nova)
        if agent is not None:
            out, _ = finish(agent)
    assert answer['error'] is None and len(answer['fetched']) == 1
    fetched_at = [e['at'] for e in answer['events']
                  if e['event'] == 'fetched'][0]
    assert out.strip().splitlines()[-1] == base
    assert glance.downloads(image_id) == 0   # the agent never downloaded
    row = row_of(env, image_id)
    assert row['adopted'] is True and row['source'] == 'nova'
    assert row['last_used'] > fetched_at   # it went on once nova was done
    assert row['users'] == ['disk:' + answer['disk']]


@pytest.mark.parametrize('handler', sorted(CHAINS))
def test_the_agent_holding_the_lock_holds_off_nova(
        real_nova, glance_env, glance, image_files, handler):  # noqa: F811
    """The agent is making a base (its download stalls for a while, under
    nova's lock): nova's cache() waits for the lock, then builds the
    instance disk on the agent's base without downloading."""
    env = glance_env
    env.configure(DEFAULT={'template_image_handler': CHAINS[handler]},
                  glance={'read_timeout': 30})
    image_id = str(uuid.uuid4())
    glance.add(image_id, image_files['disk.qcow2'], disk_format='qcow2')
    glance.fail(image_id, stall_after=4096, stall_seconds=6, times=1)
    agent = start_cli(env, 'fetch', image_id)
    nova = None
    try:
        lock = os.path.join(env.instances, 'locks', 'nova-' + sha1(image_id))
        wait_for(lambda: glance.downloads(image_id) == 1, 30,
                 'the agent to download')
        assert os.path.exists(lock)
        inst = instance(image_id, 5)
        nova = real_nova.start(nova_request(env, 'cache', instance=inst,
                                            forbid_fetch=True))
        finish(agent)
    finally:
        if agent.poll() is None:   # the test failed before it finished
            agent.kill()
            agent.communicate()
        if nova is not None:
            answer = real_nova.wait(nova)
    assert answer['fetched'] == [], 'nova downloaded a base the agent made'
    assert answer['error'] is None, answer['error']
    # nova asked for the base before the agent had published it (it would
    # have called fetch_func had it not waited for the lock), and finished
    # after
    created = row_of(env, image_id)['created']
    assert answer['started'] < created < answer['finished']
    base = os.path.join(env.base_dir, sha1(image_id))
    assert qemu_info(answer['disk'])['backing-filename'] == base
    assert same_content(answer['disk'], image_files['disk.qcow2'], 'qcow2',
                        'qcow2')
    assert row_of(env, image_id)['handler'] == handler
    subprocess.run(['rm', '-rf', os.path.dirname(answer['disk'])],
                   check=True)
    env.cli('remove', image_id)


def test_a_lock_file_nova_deleted_while_the_agent_waited_is_taken_again(
        real_nova, glance_env, glance, image_files, tmp_path):  # noqa: F811
    """nova's cache manager deletes ``locks/nova-<sha1>`` once it removed
    a base. The agent, waiting on the old file, must not count a lock on
    a nameless file: whoever locks the new file (here nova again) holds
    the agent off."""
    env = glance_env
    image_id = str(uuid.uuid4())
    glance.add(image_id, image_files['disk.raw'])
    lock = os.path.join(env.instances, 'locks', 'nova-' + sha1(image_id))
    files = {k: str(tmp_path / k) for k in
             ('ready-a', 'release-a', 'ready-b', 'release-b')}

    def hold(tag):
        return real_nova.start(nova_request(
            env, 'hold_lock', filename=sha1(image_id),
            ready_file=files['ready-' + tag],
            release_file=files['release-' + tag]))

    first = hold('a')
    second = agent = None
    base = os.path.join(env.base_dir, sha1(image_id))
    try:
        wait_for(lambda: os.path.exists(files['ready-a']), 60,
                 'nova to hold its lock')
        agent = start_cli(env, 'fetch', image_id)
        # the agent has the lock file open and waits on it
        wait_for(lambda: holds_open(agent.pid, lock), 30,
                 'the agent to open the lock file')
        os.unlink(lock)                 # as nova's remove_external_lock_file
        second = hold('b')              # a new file, locked at once
        wait_for(lambda: os.path.exists(files['ready-b']), 60,
                 'nova to lock the new file')
        open(files['release-a'], 'w').close()
        real_nova.wait(first)
        time.sleep(1.5)
        assert agent.poll() is None, \
            'the agent went on while nova held the new lock file'
        assert not os.path.lexists(base)
    finally:
        for name in ('release-a', 'release-b'):
            open(files[name], 'w').close()
        if first.returncode is None:
            real_nova.wait(first)
        if second is not None:
            times = real_nova.wait(second)
        if agent is not None:
            finish(agent)
    assert row_of(env, image_id)['created'] > times['released']
    assert glance.downloads(image_id) == 1


def holds_open(pid, path):
    """Whether process ``pid`` has ``path`` open now. Its descriptors come
    and go while it starts (and it drops privileges): one that closes
    between the listing and the look is simply not there."""
    try:
        fds = os.listdir('/proc/%d/fd' % pid)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink('/proc/%d/fd/%s' % (pid, fd)) == path:
                return True
        except OSError:
            continue
    return False


# -- nova's option names ------------------------------------------------------
def test_backend_options_have_novas_names_choices_and_defaults(
        real_nova):  # noqa: F811
    from agent import config
    proc = subprocess.run(
        [real_nova.python, '-W', 'ignore', '-c',
         'import json, nova.conf\n'
         'c = nova.conf.CONF\n'
         'o = c._groups["libvirt"]._opts["images_type"]["opt"]\n'
         'u = c._opts["use_cow_images"]["opt"]\n'
         'print(json.dumps([o.default, list(o.type.choices), u.default]))'],
        capture_output=True, text=True, check=True)
    default, choices, cow = json.loads(proc.stdout)
    conf = config.load([])
    ours = conf._groups['libvirt']._opts['images_type']['opt']
    assert (conf.libvirt.images_type, list(ours.type.choices),
            conf.use_cow_images) == (default, choices, cow)
