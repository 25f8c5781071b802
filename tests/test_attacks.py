"""Attacks by the owner of ``instances_path`` on the agent running as root.

The attacker is an unprivileged user (created for the session) that owns
``$instances_path``, as ``nova`` does on a hypervisor: it may plant
symlinks, FIFOs and files there, swap ``_base`` and ``locks/`` and race the
agent from its own process. The agent is started as root, both as the CLI
(``--direct``) and as the real service (``template-agent serve``). Each test
plants a root-owned victim (known content, mode, owner, times) out of the
attacker's reach and checks after the attack that:

- the victim is unchanged (content, mode, owner, mtime), and so is every
  root-owned directory the attacker pointed the agent at;
- no root-owned file appeared anywhere (the agent works as the owner);
- no victim byte is in any file under ``instances_path``;
- the agent answered with a clear error or succeeded safely, in bounded
  time (every call has a timeout).

Each test says which behaviour of the code before privilege separation
(commit a55caa0, which worked as root, on names) it catches, or why it has
no counterpart there.
"""

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import REPO, AgentEnv, make_raw, same_content
from tests.glance_standin import image_record
from tests.test_service import Service

MiB = 1024 * 1024
OP_TIMEOUT = 60          # seconds any single agent call may take
RACE_SECONDS = 20        # upper bound of an attacker's race loop
TOKEN = hashlib.sha1(b'template-agent victim').hexdigest().encode()
VICTIM_DATA = (b'ROOT-ONLY-VICTIM-' + TOKEN + b'\n') * 1200   # ~70 KiB
OLD_TIME = 1000000000    # 2001: any touch of a victim shows


def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


# -- the attacker ------------------------------------------------------------

@pytest.fixture(scope='session')
def attacker():
    """A dedicated unprivileged user, removed after the session."""
    name = 'tattack%d' % (os.getpid() % 100000)
    subprocess.run(['userdel', name], capture_output=True)
    for _ in range(20):  # /etc/passwd may be locked by a concurrent useradd
        proc = subprocess.run(
            ['useradd', '--system', '--no-create-home', '--user-group',
             '--shell', '/usr/sbin/nologin', name], capture_output=True,
            text=True)
        if proc.returncode == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail('useradd %s failed: %s' % (name, proc.stderr))
    try:
        yield pwd.getpwnam(name)
    finally:
        for _ in range(20):
            if subprocess.run(['userdel', name], capture_output=True) \
                    .returncode in (0, 6):  # 6: no such user
                break
            time.sleep(0.5)
        subprocess.run(['groupdel', name], capture_output=True)


def _demote(user):
    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    return demote


# The attacker's race loops, run as the attacker in its own process until
# ``seconds`` pass or ``stop_file`` appears; each prints how many times it
# got its plant in place.
RACER = r'''
import json, os, sys, time
spec = json.loads(sys.argv[1])
deadline = time.monotonic() + spec['seconds']
stop = spec['stop_file']
def done():
    return time.monotonic() > deadline or os.path.exists(stop)
def quietly(fn, *args):
    try:
        fn(*args)
        return True
    except OSError:
        return False
n = 0
mode = spec['mode']
open(stop + '.ready', 'w').close()
if mode == 'symlink':        # keep each name a symlink to target
    while not done():
        for name in spec['names']:
            try:
                if os.readlink(name) == spec['target']:
                    continue
            except OSError:
                pass
            tmp = name + '.attack'
            quietly(os.unlink, tmp)
            if quietly(os.symlink, spec['target'], tmp) and \
                    quietly(os.rename, tmp, name):
                n += 1
        time.sleep(0.0002)
elif mode == 'replace':      # keep each name a hard link to source
    while not done():
        for name in spec['names']:
            try:
                st, src = os.lstat(name), os.stat(spec['source'])
                if (st.st_ino, st.st_dev) == (src.st_ino, src.st_dev):
                    continue
            except OSError:
                pass
            tmp = name + '.attack'
            quietly(os.unlink, tmp)
            if quietly(os.link, spec['source'], tmp) and \
                    quietly(os.rename, tmp, name):
                n += 1
        time.sleep(0.0005)
elif mode == 'swapdir':      # swap each directory for a symlink and back
    def put_back(d, aside):
        if os.path.islink(d):
            quietly(os.unlink, d)
        if os.path.isdir(aside) and not quietly(os.rename, aside, d):
            # the agent made a new one meanwhile: keep the old content
            for name in os.listdir(aside):
                quietly(os.rename, os.path.join(aside, name),
                        os.path.join(d, name))
            quietly(os.rmdir, aside)
    while not done():
        for d in spec['names']:
            aside = d + '.real'
            if quietly(os.rename, d, aside):
                if quietly(os.symlink, spec['target'], d):
                    n += 1
                time.sleep(0.003)
            put_back(d, aside)
        time.sleep(0.003)
    for d in spec['names']:  # leave the real directories in place
        put_back(d, d + '.real')
print(n)
'''


class Racer:
    """An attacker process racing the agent, stopped in ``finally``."""

    def __init__(self, world, mode, names, as_root=False, **spec):
        self.stop_file = os.path.join(world.attacker_dir, 'stop-%s' % mode)
        spec.update(mode=mode, names=names, seconds=RACE_SECONDS,
                    stop_file=self.stop_file)
        self.proc = subprocess.Popen(
            [sys.executable, '-c', RACER, json.dumps(spec)],
            preexec_fn=None if as_root else _demote(world.user), cwd='/',
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.planted = None
        deadline = time.monotonic() + 30
        while not os.path.exists(self.stop_file + '.ready'):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                self.proc.communicate()
            time.sleep(0.01)
        os.unlink(self.stop_file + '.ready')

    def stop(self):
        with open(self.stop_file, 'w'):
            pass
        try:
            out, err = self.proc.communicate(timeout=RACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        os.unlink(self.stop_file)
        assert self.proc.returncode == 0, err
        self.planted = int(out.strip() or 0)
        return self.planted


@contextlib.contextmanager
def racing(world, mode, names, **spec):
    racer = Racer(world, mode, names, **spec)
    try:
        yield racer
    finally:
        if racer.planted is None:
            if racer.proc.poll() is None:
                racer.stop()
            else:
                racer.proc.wait()


def as_attacker(world, *argv):
    """Run a command as the attacker (to plant files as it would)."""
    subprocess.run(list(argv), preexec_fn=_demote(world.user), check=True,
                   capture_output=True, timeout=60, cwd='/')


# -- the world: instances_path owned by the attacker, victims owned by root

class World:
    def __init__(self, top, user, glance):
        self.top = top
        self.user = user
        self.glance = glance
        self.env = AgentEnv(top, instances=os.path.join(top, 'instances'))
        self.env.configure(
            image_source={'driver': 'glance'},
            glance={'api_servers': glance.url, 'read_timeout': 30},
            image_cache={'manager_interval': -1})
        self.instances = self.env.instances
        self.base_dir = self.env.base_dir
        self.lock_dir = os.path.join(self.instances, 'locks')
        for d in (self.instances, self.base_dir, self.lock_dir):
            os.makedirs(d, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        # files the attacker may read (its own copies of things)
        self.attacker_dir = os.path.join(top, 'attacker')
        os.mkdir(self.attacker_dir)
        os.chown(self.attacker_dir, user.pw_uid, user.pw_gid)
        # root's secrets, out of the attacker's reach
        self.private_dir = os.path.join(top, 'root-private')
        os.mkdir(self.private_dir, 0o700)
        self.victim = os.path.join(self.private_dir, 'secret')
        self._write_victim(self.victim, VICTIM_DATA, 0o600)
        # a root-owned directory others can read (as /etc), holding files
        # named like bases: the target of a swapped _base or locks/
        self.root_dir = os.path.join(top, 'root-public')
        os.mkdir(self.root_dir, 0o755)
        for image_id in ('img', 'other', 'third'):
            self._write_victim(os.path.join(self.root_dir, sha1(image_id)),
                               VICTIM_DATA, 0o644)
        self._write_victim(os.path.join(self.root_dir, 'shadow'),
                           VICTIM_DATA, 0o600)
        # as large as the test image, so that a volume linked to it looks
        # big enough
        self._write_victim(os.path.join(self.root_dir, 'disk-secret'),
                           VICTIM_DATA * (8 * MiB // len(VICTIM_DATA) + 1),
                           0o600)
        self.victims = [self.victim] + [
            os.path.join(self.root_dir, n) for n in os.listdir(self.root_dir)]
        self.baseline = self.snapshot()

    @staticmethod
    def _write_victim(path, data, mode):
        with open(path, 'wb') as f:
            f.write(data)
        os.chmod(path, mode)
        os.utime(path, (OLD_TIME, OLD_TIME))

    def victim_inodes(self):
        keys = set()
        for path in self.victims:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                keys.add((st.st_dev, st.st_ino))
        return keys

    def snapshot(self):
        """What must never change: every victim file (content, mode,
        owner, mtime), the listings of root's directories."""
        state = {}
        for path in self.victims:
            st = os.lstat(path)
            with open(path, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            state[path] = (digest, stat.S_IMODE(st.st_mode),
                           stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid,
                           st.st_mtime_ns)
        for d in (self.private_dir, self.root_dir):
            st = os.lstat(d)
            state[d] = (sorted(os.listdir(d)), stat.S_IMODE(st.st_mode),
                        st.st_uid)
        return state

    def root_owned(self):
        """Every file under the test's top directory that belongs to root
        (victims aside), as ``{(device, inode): path}``: renaming a
        directory does not make its files new."""
        victims = self.victim_inodes()
        found = {}
        for root, dirs, names in os.walk(self.top):
            for name in dirs + names:
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    key = (st.st_dev, st.st_ino)
                    if st.st_uid == 0 and key not in victims:
                        found[key] = path
        return found

    def files_with_victim_bytes(self):
        """Regular files under instances_path (not the victim's own other
        names) whose content holds victim bytes."""
        victims = self.victim_inodes()
        found = []
        for root, _dirs, names in os.walk(self.instances):
            for name in names:
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode) or \
                            (st.st_dev, st.st_ino) in victims:
                        continue
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW |
                                 os.O_NONBLOCK)
                except OSError:
                    continue
                with os.fdopen(fd, 'rb') as f:
                    if TOKEN in f.read():
                        found.append(path)
        return found

    def check(self, root_owned_before):
        """The invariants every attack must leave intact."""
        assert self.snapshot() == self.baseline, 'a victim changed'
        assert self.files_with_victim_bytes() == [], \
            'victim bytes under instances_path'
        new = [path for key, path in self.root_owned().items()
               if key not in root_owned_before]
        assert not new, 'root-owned files appeared: %s' % sorted(new)

    # -- the agent, as root ---------------------------------------------
    def cli(self, *args, timeout=OP_TIMEOUT):
        """``template-agent --direct ARGS`` as root; (rc, stdout, stderr)."""
        try:
            proc = subprocess.run(
                [sys.executable, '-m', 'agent.cli', '--config-file',
                 self.env.conf_path, '--direct'] + [str(a) for a in args],
                capture_output=True, text=True, timeout=timeout,
                env=dict(os.environ, PYTHONPATH=REPO))
        except subprocess.TimeoutExpired:
            pytest.fail('template-agent --direct %s hung for %d s'
                        % (' '.join(map(str, args)), timeout))
        assert 'Traceback' not in proc.stderr, proc.stderr
        said = '\n'.join(line for line in proc.stderr.splitlines()
                         if line.startswith(('error:', 'warning:')))
        return proc.returncode, proc.stdout, said


@pytest.fixture
def world(attacker, glance):
    """A top directory others can enter (pytest's are 0700): the agent
    works there as the attacker once it dropped root."""
    top = tempfile.mkdtemp(prefix='agent-attack-', dir='/tmp')
    try:
        os.chmod(top, 0o755)
        yield World(top, attacker, glance)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope='session')
def images(tmp_path_factory):
    """A qcow2 image (converted to raw on fetch) and its raw content."""
    d = tmp_path_factory.mktemp('attack-images')
    raw = make_raw(str(d / 'disk.raw'), data_mib=3, total_mib=8, seed=7)
    subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw,
                    str(d / 'disk.qcow2')], check=True, capture_output=True)
    return {'raw': raw, 'qcow2': str(d / 'disk.qcow2')}


@pytest.fixture
def service(world):
    svc = Service(world.env)
    try:
        yield svc
    finally:
        svc.close()


def call(svc, method, path, body=None):
    """One API call, bounded: ``(status, payload)``."""
    data = json.dumps(body).encode() if body is not None else None
    try:
        return svc.raw(method, path, data,
                       {'Content-Type': 'application/json'} if data else {})
    except OSError as exc:  # socket.timeout included
        pytest.fail('%s %s did not answer: %s\n%s' % (method, path, exc,
                                                       svc.log()))


def service_fetch(svc, image_id, timeout=OP_TIMEOUT):
    """POST a fetch job and follow it: the finished job."""
    status, job = call(svc, 'POST', '/v1/images/%s/fetch' % image_id, {})
    assert status == 202, job
    deadline = time.monotonic() + timeout
    while job['state'] == 'running':
        if time.monotonic() > deadline:
            pytest.fail('fetch of %s hung for %d s' % (image_id, timeout))
        status, job = call(svc, 'GET', '/v1/jobs/%s?wait=1' % job['id'])
    return job


def start_service(world, svc):
    svc.start()
    return svc


def base_path(world, image_id):
    return os.path.join(world.base_dir, sha1(image_id))


def assert_good_base(world, image_id, images):
    path = base_path(world, image_id)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), path
    assert st.st_uid == world.user.pw_uid
    assert same_content(path, images['raw'])


def fetch(world, svc, via, image_id):
    """Fetch as the CLI (--direct) or through the service: ``(ok, error
    message)``."""
    if via == 'cli':
        rc, out, err = world.cli('fetch', image_id)
        return rc == 0, err.strip()
    job = service_fetch(svc, image_id)
    if job['state'] == 'succeeded':
        return True, ''
    return False, '%s: %s' % (job['error']['type'], job['error']['message'])


# -- 1. links planted at the temporary names -----------------------------

@pytest.mark.parametrize('suffix', ['.part', '.converted'])
@pytest.mark.parametrize('plant', ['symlink', 'hardlink'])
@pytest.mark.parametrize('via', ['cli', 'service'])
def test_links_planted_at_temporary_names_are_never_followed(
        world, images, service, via, plant, suffix):
    # Old behaviour caught: the download was written to _base/<sha1>.part
    # by name (O_CREAT | O_TRUNC, following a symlink) and qemu-img wrote
    # _base/<sha1>.converted by name, both as root, and .converted was then
    # renamed to the base: a link planted there after the leftover cleanup
    # made root overwrite the victim with the image and publish a
    # root-owned base. Now both files have no name (O_TMPFILE) and the
    # agent works as the owner: nothing planted is ever opened.
    world.glance.add('img', images['qcow2'], disk_format='qcow2')
    world.glance.fail('img', stall_after=MiB, stall_seconds=2, times=1)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    names = [os.path.join(world.base_dir, sha1('img') + suffix)]
    if plant == 'symlink':
        racer = Racer(world, 'symlink', names, target=world.victim)
    else:
        # fs.protected_hardlinks (on by default) keeps the attacker from
        # linking a file it cannot read and write; a root process plants
        # the hard links instead, standing for a host without that
        # protection
        racer = Racer(world, 'replace', names, source=world.victim,
                      as_root=True)
    try:
        ok, error = fetch(world, service, via, 'img')
    finally:
        planted = racer.stop()
    world.check(before)
    assert ok, error
    assert planted > 0, 'the attacker never got its link in place'
    assert_good_base(world, 'img', images)



@pytest.mark.parametrize('via', ['cli', 'service'])
def test_symlink_at_the_base_path_to_the_victim(world, images, service, via):
    # The base's own name is a symlink to the victim. Old behaviour
    # caught: fetch checked, as root, that the link led to a usable file,
    # and took the victim as the image's base (its bytes served to
    # nova). Now the check runs as the owner, who cannot open the victim:
    # the link counts as dead, is unlinked (never followed) and a real,
    # verified base takes its name. prune only ever unlinks a link.
    world.glance.add('img', images['qcow2'], disk_format='qcow2')
    world.glance.add('other', images['raw'])
    as_attacker(world, 'ln', '-s', world.victim, base_path(world, 'img'))
    as_attacker(world, 'ln', '-s', world.victim, base_path(world, 'other'))
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    ok, error = fetch(world, service, via, 'img')
    world.check(before)
    assert ok, error
    assert_good_base(world, 'img', images)
    ok, error = operate(world, service, via, 'prune')
    world.check(before)
    assert ok, error
    assert os.listdir(world.base_dir) == []


# -- 2. _base and locks/ replaced by symlinks to a root-owned directory --

def prepare_bases(world, images):
    """Two bases made normally before the attack; 'new' is fetchable."""
    for image_id in ('img', 'other', 'new'):
        world.glance.add(image_id, images['raw'])
    for image_id in ('img', 'other'):
        rc, _, err = world.cli('fetch', image_id)
        assert rc == 0, err


def swap_for_symlink(world, directory):
    """The attacker replaces ``directory`` with a symlink to root's."""
    path = os.path.join(world.instances, directory)
    as_attacker(world, 'mv', path, path + '.real')
    as_attacker(world, 'ln', '-s', world.root_dir, path)


OPERATIONS = {
    # op: (CLI arguments, API request)
    'fetch': (('fetch', 'new'), None),
    'prune': (('prune', '--min-age', '0', '--yes'),
              ('POST', '/v1/prune', {'min_age': 0})),
    'remove': (('remove', 'img'), ('DELETE', '/v1/images/img', None)),
    'list': (('list',), ('GET', '/v1/images', None)),
}


def operate(world, svc, via, op):
    """Run ``op``: ``(ok, error message)``; prune's per-base failures
    count as errors."""
    args, request = OPERATIONS[op]
    if op == 'fetch':
        return fetch(world, svc, via, args[1])
    if via == 'cli':
        rc, out, err = world.cli(*args)
        return rc == 0, err.strip()
    status, payload = call(svc, *request)
    if status >= 400:
        return False, '%s: %s' % (payload['error']['type'],
                                  payload['error']['message'])
    if op == 'prune' and payload['failed']:
        return False, '; '.join('%s: %s' % (f['filename'], f['reason'])
                                for f in payload['failed'])
    return True, ''


@pytest.mark.parametrize('op', sorted(OPERATIONS))
@pytest.mark.parametrize('directory', ['_base', 'locks'])
@pytest.mark.parametrize('via', ['cli', 'service'])
def test_base_or_locks_symlinked_before_an_operation(
        world, images, service, via, directory, op):
    # Old behaviour caught: _base and locks/ were used by name as root, so
    # a symlink to root's directory made prune and remove unlink the
    # sha1-named files there, fetch write .part and the base there, and
    # oslo.concurrency create root-owned lock files there. Now each is
    # opened O_NOFOLLOW | O_DIRECTORY and checked to be the owner's.
    prepare_bases(world, images)
    if via == 'service':
        start_service(world, service)
    # a base nova made meanwhile: list adopts it, under its lock
    as_attacker(world, 'cp', '/dev/null', base_path(world, 'third'))
    before = world.root_owned()
    swap_for_symlink(world, directory)
    ok, error = operate(world, service, via, op)
    world.check(before)
    assert not ok, '%s went on with %s a symlink' % (op, directory)
    assert 'Refusing %s' % os.path.join(world.instances, directory) \
        in error and 'symlink' in error, error


ROUNDS = 4


@pytest.mark.parametrize('op', sorted(OPERATIONS))
@pytest.mark.parametrize('via', ['cli', 'service'])
def test_base_and_locks_swapped_during_operations(world, images, service,
                                                  via, op):
    # Old behaviour caught: every step named its file by path under
    # _base and locks/, as root, so whenever the attacker's swap was in
    # place root wrote, renamed or unlinked files in root's directory
    # instead. Now each directory is opened once, checked, and used by
    # descriptor: an operation either works in the real directory or is
    # refused; it never touches what the symlink points at. (Against the
    # old code this is a race the old agent loses in most runs, not in
    # every one.)
    prepare_bases(world, images)
    for i in range(ROUNDS):
        world.glance.add('new%d' % i, images['qcow2'], disk_format='qcow2')
        world.glance.fail('new%d' % i, stall_after=MiB, stall_seconds=0.5,
                          times=1)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    outcomes = []
    with racing(world, 'swapdir', [world.base_dir, world.lock_dir],
                target=world.root_dir) as racer:
        started = time.monotonic()
        while len(outcomes) < ROUNDS or time.monotonic() - started < 3:
            if op == 'fetch':
                outcomes.append(fetch(world, service, via,
                                      'new%d' % (len(outcomes) % ROUNDS)))
            else:
                outcomes.append(operate(world, service, via, op))
        planted = racer.stop()
    assert planted > 0, 'the attacker never swapped a directory'
    world.check(before)
    # refused, already gone, or kept as in use (a base seen under the
    # directory's name while it was swapped aside counts as an instance
    # disk using itself: removal errs on the safe side)
    for ok, error in outcomes:
        assert ok or 'Refusing' in error or 'No base image' in error or \
            ' is in use by ' in error, \
            (error, service.log() if via == 'service' else '')


# -- 3. the lock file ------------------------------------------------------

@pytest.mark.parametrize('plant', ['symlink', 'symlink-own', 'fifo'])
@pytest.mark.parametrize('op', ['fetch', 'remove'])
@pytest.mark.parametrize('via', ['cli', 'service'])
def test_planted_lock_file_is_not_followed_nor_waited_on(
        world, images, service, via, op, plant):
    # Old behaviour caught: oslo.concurrency opened locks/nova-<sha1> by
    # name with O_CREAT as root, following a symlink: root created the
    # file it points at (here in root's directory, where the attacker
    # cannot write), and a FIFO there blocked the open for ever, holding
    # up the fetch. Now the lock is opened O_NOFOLLOW | O_NONBLOCK and must
    # be a regular file. ('symlink-own' points into a directory the
    # attacker may write, so that only O_NOFOLLOW, not the drop, keeps the
    # file from being made.)
    prepare_bases(world, images)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    target = os.path.join(world.attacker_dir if plant == 'symlink-own'
                          else world.root_dir, 'made-by-the-lock')
    image_id = 'new' if op == 'fetch' else 'img'
    lock = os.path.join(world.lock_dir, 'nova-' + sha1(image_id))
    as_attacker(world, 'rm', '-f', lock)
    if plant == 'fifo':
        as_attacker(world, 'mkfifo', lock)
    else:
        as_attacker(world, 'ln', '-s', target, lock)
    ok, error = operate(world, service, via, op)
    world.check(before)
    assert not os.path.lexists(target)
    assert not ok
    assert 'Refusing %s' % lock in error, error
    assert ('not a regular file' if plant == 'fifo'
            else 'cannot be opened safely') in error, error
    # nothing else happened under the lock
    assert os.path.exists(base_path(world, 'img'))
    assert not os.path.exists(base_path(world, 'new'))


# -- 4. qcow2 images whose backing file is the victim ---------------------

def make_backed_qcow2(world, path, backing):
    """A qcow2 (8 MiB, as the test image) backed by ``backing``, which
    qemu-img does not open now (-u); readable by the attacker."""
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-u', '-F', 'raw',
                    '-b', backing, path, '8M'], check=True,
                   capture_output=True)
    os.chmod(path, 0o644)
    os.chown(path, world.user.pw_uid, world.user.pw_gid)
    return path


@pytest.mark.parametrize('via', ['cli', 'service'])
def test_download_swapped_for_a_qcow2_backed_by_the_victim(
        world, images, service, via):
    # Old behaviour caught: the download went to _base/<sha1>.part and,
    # once hashed and inspected, qemu-img (as root) converted .part by
    # name: the attacker, renaming a qcow2 backed by the victim over
    # .part meanwhile, had root read the victim through the backing file
    # and publish its bytes in the base. Now qemu-img reads the very
    # descriptor that was hashed (/dev/fd/N) of a file with no name.
    world.glance.add('img', images['qcow2'], disk_format='qcow2')
    world.glance.fail('img', stall_after=MiB, stall_seconds=2, times=1)
    evil = make_backed_qcow2(world, os.path.join(world.attacker_dir,
                                                 'evil.qcow2'), world.victim)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    part = os.path.join(world.base_dir, sha1('img') + '.part')
    with racing(world, 'replace', [part], source=evil) as racer:
        ok, error = fetch(world, service, via, 'img')
        planted = racer.stop()
    world.check(before)
    assert ok, error
    assert planted > 0
    assert_good_base(world, 'img', images)


@pytest.mark.parametrize('via', ['cli', 'service'])
def test_tenant_qcow2_backed_by_the_victim_is_refused(world, service, via):
    # The image itself is a qcow2 whose backing file is the victim (a
    # tenant uploads it to Glance). This was refused before privilege
    # separation too (the format inspector predates it): the test guards
    # the inspection of every download, whatever the source.
    evil = make_backed_qcow2(world, os.path.join(world.attacker_dir,
                                                 'evil.qcow2'), world.victim)
    world.glance.add('evil', evil, disk_format='qcow2')
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    ok, error = fetch(world, service, via, 'evil')
    world.check(before)
    assert not ok
    assert 'refused' in error and 'backing_file' in error, error
    assert os.listdir(world.base_dir) == []


def catalog_record(image_id, path, disk_format):
    return image_record(image_id, path, disk_format=disk_format)


def test_catalog_entry_written_by_the_owner_is_inspected_again(world):
    # The local catalog lives in state_path, which the agent hands to the
    # owner of instances_path: the owner can write catalog entries
    # directly, skipping the checks of 'images import'. A qcow2 backed by
    # the victim, with a correct record and hashes, is still refused when
    # fetched, since every download is inspected. (Before privilege
    # separation state_path stayed root's; the fetch-time inspection was
    # the same.)
    world.env.configure(image_source={'driver': 'local'})
    rc, _, err = world.cli('list')  # makes state_path the owner's
    assert rc == 0, err
    catalog = os.path.join(world.env.state, 'catalog')
    evil = make_backed_qcow2(world, os.path.join(world.attacker_dir,
                                                 'evil.qcow2'), world.victim)
    record = os.path.join(world.attacker_dir, 'evil.json')
    with open(record, 'w') as f:
        json.dump(catalog_record('evil', evil, 'qcow2'), f)
    as_attacker(world, 'mkdir', '-p', catalog)
    as_attacker(world, 'cp', evil, os.path.join(catalog, 'evil.data'))
    as_attacker(world, 'cp', record, os.path.join(catalog, 'evil.json'))
    before = world.root_owned()
    rc, _, err = world.cli('fetch', 'evil')
    world.check(before)
    assert rc == 1 and 'backing_file' in err, err
    assert os.listdir(world.base_dir) == []


# -- 5. hard links to root's files at base paths --------------------------

def make_overlay(world, name, backing):
    """An instance disk (qcow2 overlay) of the attacker's, backed by
    ``backing``: ``instances/<name>/disk``."""
    d = os.path.join(world.instances, name)
    as_attacker(world, 'mkdir', d)
    disk = os.path.join(d, 'disk')
    as_attacker(world, 'qemu-img', 'create', '-f', 'qcow2', '-u', '-F',
                'raw', '-b', backing, disk, '8M')
    return disk


@pytest.mark.parametrize('via', ['cli', 'service'])
def test_hard_links_to_root_files_at_base_paths(world, images, service, via):
    # fs.protected_hardlinks (on by default) keeps the attacker from
    # linking a file it cannot read and write; root plants the links
    # here, standing for a host without that protection.
    # Old behaviour caught: the cache manager pass touched in-use bases
    # (utime) as root, so a hard link to a root file, made "in use" by an
    # instance disk backed by it, had root change the victim's times (and
    # every lock file and base the old agent made was root's).
    # Now the agent works as the owner: it cannot touch, write, chmod or
    # chown root's file, and unlinking the name in _base (what the owner
    # could do itself) leaves the victim intact.
    world.glance.add('hl', images['raw'])
    shadow = os.path.join(world.root_dir, 'shadow')
    os.link(world.victim, base_path(world, 'hl'))
    os.link(shadow, base_path(world, 'hl-used'))
    make_overlay(world, 'inst-1', base_path(world, 'hl-used'))
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    if via == 'cli':
        rc, out, err = world.cli('list', '--format', 'json')
        assert rc == 0, err
        rows = {r['filename']: r for r in json.loads(out)}
    else:
        status, payload = call(service, 'GET', '/v1/images')
        assert status == 200, payload
        rows = {r['filename']: r for r in payload['images']}
    assert rows[sha1('hl-used')]['in_use'] and \
        not rows[sha1('hl')]['in_use'], rows
    world.check(before)
    # fetch finds a base already there and changes nothing
    ok, error = fetch(world, service, via, 'hl')
    assert ok, error
    world.check(before)
    # prune unlinks the unused name, and cannot touch the used one
    ok, error = operate(world, service, via, 'prune')
    world.check(before)
    assert not ok and sha1('hl-used') in error and \
        'Operation not permitted' in error, error
    assert not os.path.lexists(base_path(world, 'hl'))
    assert os.path.samefile(base_path(world, 'hl-used'), shadow)
    # remove refuses the used one
    if via == 'cli':
        rc, _, error = world.cli('remove', 'hl-used')
        ok = rc == 0
    else:
        status, payload = call(service, 'DELETE', '/v1/images/hl-used')
        ok, error = status < 400, str(payload)
    world.check(before)
    assert not ok and 'in use' in error, error
    assert os.stat(shadow).st_nlink == 2


# -- 6. FIFOs at a base path and as backing files ---------------------------

@pytest.mark.parametrize('via', ['cli', 'service'])
def test_fifos_never_hang_list_prune_remove_fetch(world, images, service,
                                                  via):
    # Old behaviour caught: usage was read with 'qemu-img info
    # --backing-chain' on every instance disk, as root and without a
    # timeout: an overlay whose backing file is a FIFO (under the
    # instance's directory, or at a base path) made qemu-img block in
    # open(), hanging list and prune for ever (and the old lock open
    # followed by name too). Now backing names are read from the qcow2
    # header in process, opening only regular files, without blocking;
    # a FIFO under a base's name is no base.
    prepare_bases(world, images)            # 'img' and 'other', unused
    world.glance.add('fifo', images['raw'])
    fifo_base = base_path(world, 'fifo')
    as_attacker(world, 'mkfifo', fifo_base)
    disk1 = make_overlay(world, 'inst-1', os.path.join(
        world.instances, 'inst-1', 'backing'))
    as_attacker(world, 'mkfifo', os.path.join(world.instances, 'inst-1',
                                              'backing'))
    make_overlay(world, 'inst-2', fifo_base)
    as_attacker(world, 'mkfifo', os.path.join(world.instances, 'inst-3'))
    assert os.path.exists(disk1)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()

    # list: the FIFO is no base
    if via == 'cli':
        rc, out, err = world.cli('list', '--format', 'json')
        assert rc == 0, err
        rows = json.loads(out)
    else:
        status, payload = call(service, 'GET', '/v1/images')
        assert status == 200, payload
        rows = payload['images']
    assert sorted(r['image_id'] for r in rows) == ['img', 'other'], rows
    # fetch and remove refuse it, saying why
    ok, error = fetch(world, service, via, 'fifo')
    assert not ok and 'Refusing %s' % fifo_base in error and \
        'neither a file nor a symlink' in error, error
    if via == 'cli':
        rc, _, error = world.cli('remove', 'fifo')
        ok = rc == 0
    else:
        status, payload = call(service, 'DELETE', '/v1/images/fifo')
        ok, error = status < 400, payload['error']['message']
    assert not ok and 'neither a file nor a symlink' in error, error
    # prune removes the unused bases and leaves the FIFO alone
    ok, error = operate(world, service, via, 'prune')
    assert ok, error
    assert sorted(os.listdir(world.base_dir)) == [sha1('fifo')]
    assert stat.S_ISFIFO(os.lstat(fifo_base).st_mode)
    world.check(before)
    if via == 'service':
        assert call(service, 'GET', '/v1/health')[1]['status'] == 'ok'


# -- 7. the owner's own state: the local catalog ---------------------------

@pytest.mark.parametrize('plant', ['data-symlink', 'data-fifo',
                                   'record-fifo'])
@pytest.mark.parametrize('via', ['cli', 'service'])
def test_catalog_files_planted_by_the_owner(world, images, service, via,
                                            plant):
    # state_path is handed to the owner of instances_path, so the local
    # catalog in it is the owner's to write: an image's bits may be a
    # symlink to the victim (with a record carrying no hash, as the
    # attacker cannot know the victim's), or a FIFO, and so may its
    # record. Before privilege separation state_path stayed root's, so
    # none of this could be planted (the test cannot even set itself up
    # there). Reading as the owner, the agent cannot get the victim's
    # bytes; the FIFOs hung the fetch for ever (holding nova's lock) until
    # the catalog opened its files without blocking. A record without a
    # hash is refused before any byte is read unless weak hashes are
    # allowed: they are, so that the attack reaches the catalog's files.
    world.env.configure(image_source={'driver': 'local'},
                        glance={'allow_weak_hashes': True})
    rc, _, err = world.cli('list')  # makes state_path the owner's
    assert rc == 0, err
    catalog = os.path.join(world.env.state, 'catalog')
    as_attacker(world, 'mkdir', '-p', catalog)
    record = catalog_record('evil', images['raw'], 'raw')
    for key in ('checksum', 'os_hash_algo', 'os_hash_value', 'size'):
        record[key] = None
    staged = os.path.join(world.attacker_dir, 'evil.json')
    with open(staged, 'w') as f:
        json.dump(record, f)
    data = os.path.join(catalog, 'evil.data')
    if plant == 'record-fifo':
        as_attacker(world, 'mkfifo', os.path.join(catalog, 'evil.json'))
        shutil.copy(images['raw'], data)
        os.chown(data, world.user.pw_uid, world.user.pw_gid)
    else:
        as_attacker(world, 'cp', staged, os.path.join(catalog,
                                                      'evil.json'))
        if plant == 'data-fifo':
            as_attacker(world, 'mkfifo', data)
        else:
            as_attacker(world, 'ln', '-s', world.victim, data)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    ok, error = fetch(world, service, via, 'evil')
    world.check(before)
    assert not ok
    assert 'local catalog' in error and 'is unavailable' in error, error
    assert os.listdir(world.base_dir) == []
    if via == 'service':
        assert call(service, 'GET', '/v1/health')[1]['status'] == 'ok'


def test_catalog_import_replaces_planted_temporary_files(world, images):
    # The same for 'images import': its temporary names in the catalog
    # (<id>.data.part, <id>.json.part) were opened for writing by name,
    # so a FIFO planted there hung the import and a symlink was written
    # through (as the owner, since the drop). Now they are made afresh,
    # O_EXCL | O_NOFOLLOW.
    world.env.configure(image_source={'driver': 'local'})
    rc, _, err = world.cli('list')  # makes state_path the owner's
    assert rc == 0, err
    catalog = os.path.join(world.env.state, 'catalog')
    as_attacker(world, 'mkdir', '-p', catalog)
    as_attacker(world, 'mkfifo', os.path.join(catalog, 'img.data.part'))
    elsewhere = os.path.join(world.attacker_dir, 'written-through')
    as_attacker(world, 'ln', '-s', elsewhere,
                os.path.join(catalog, 'img.json.part'))
    source = os.path.join(world.attacker_dir, 'disk.raw')
    shutil.copy(images['raw'], source)
    os.chmod(source, 0o644)
    before = world.root_owned()
    rc, _, err = world.cli('images', 'import', source, '--id', 'img')
    assert rc == 0, err
    assert not os.path.lexists(elsewhere)
    rc, out, err = world.cli('fetch', 'img')
    assert rc == 0, err
    world.check(before)
    assert_good_base(world, 'img', images)


# -- 8. volume linking: the volume file behind a loop device ---------------

def loops_under(top):
    """``[(device, backing file)]`` of loop devices over files under
    ``top`` (the backing file as the kernel names it)."""
    out = subprocess.run(['losetup', '-n', '-O', 'NAME,BACK-FILE', '-l'],
                         capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(top + '/'):
            found.append((parts[0], parts[1].strip()))
    return found


@pytest.fixture
def linking_world(world):
    world.env.configure(
        DEFAULT={'template_image_handler': 'volume_linking,downloading'},
        image_source={'driver': 'local'})
    try:
        yield world
    finally:
        for device, _ in loops_under(world.top):
            subprocess.run(['losetup', '-d', device], capture_output=True)


@pytest.mark.parametrize('plant', ['symlink', 'hardlink', 'fifo'])
@pytest.mark.parametrize('via', ['cli', 'service'])
def test_volume_file_replaced_before_it_is_attached(linking_world, images,
                                                    service, via, plant):
    # The local volume backend keeps volumes in state_path, which is the
    # owner's since the drop: the attacker replaces the file of a
    # volume-backed image with a link to root's file before the agent
    # exports it as a loop device and links the base to it. Before
    # privilege separation state_path stayed root's, so this could not be
    # planted at all (the old code attached by path as root, following
    # anything); now what keeps root's file from being exported is the
    # privsep daemon, which opens the file O_NOFOLLOW itself and attaches
    # only a regular file with one name owned by the agent's user, and
    # the downloading fallback, which reads the volume as the owner. A
    # FIFO there hung that fallback for ever, until volumes were opened
    # without blocking. (A hard link to root's file stands for a host
    # without fs.protected_hardlinks: root plants it.)
    world = linking_world
    source = os.path.join(world.attacker_dir, 'disk.raw')
    shutil.copy(images['raw'], source)
    os.chmod(source, 0o644)
    rc, out, err = world.cli('images', 'import', source, '--id', 'vb',
                             '--volume-backed', '--owner', 'p1', '--format',
                             'json')
    assert rc == 0, err
    volume_id = json.loads(out)['locations'][0]['url'].split('/')[-1]
    volume = os.path.join(world.env.state, 'volumes', 'volume-' + volume_id)
    assert os.path.isfile(volume)
    if via == 'service':
        start_service(world, service)
    before = world.root_owned()
    as_attacker(world, 'rm', volume)
    victim = os.path.join(world.root_dir, 'disk-secret')
    if plant == 'symlink':
        as_attacker(world, 'ln', '-s', victim, volume)
    elif plant == 'fifo':
        as_attacker(world, 'mkfifo', volume)
    else:
        os.link(victim, volume)
    if via == 'cli':
        rc, _, error = world.cli('fetch', 'vb', '--project-id', 'p1')
        ok = rc == 0
    else:
        status, job = call(service, 'POST', '/v1/images/vb/fetch',
                           {'project_id': 'p1'})
        assert status == 202, job
        deadline = time.monotonic() + OP_TIMEOUT
        while job['state'] == 'running' and time.monotonic() < deadline:
            status, job = call(service, 'GET', '/v1/jobs/%s?wait=1'
                               % job['id'])
        assert job['state'] != 'running', 'fetch hung'
        ok = job['state'] == 'succeeded'
        error = str(job['error'])
    attached = loops_under(world.top)
    world.check(before)
    assert attached == [], 'the victim was exported: %s' % attached
    assert not ok, 'a base was made of the victim'
    assert not os.path.lexists(base_path(world, 'vb'))
    assert 'Refusing %s' % volume in error, error
