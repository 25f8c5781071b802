"""Shared fixtures: real images made with qemu-img, a per-test agent setup,
the Glance stand-in on loopback, and a CLI runner."""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from agent import config, core
from tests.glance_standin import GlanceStandIn

MiB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_DIR = os.path.join(REPO, 'tests', 'unit')


def pytest_collection_modifyitems(items):
    """Two tiers: ``-m unit`` (tests/unit: pure logic, no root, seconds)
    and ``-m real`` (the rest: real components, as root)."""
    for item in items:
        unit = str(item.path).startswith(UNIT_DIR + os.sep)
        item.add_marker(pytest.mark.unit if unit else pytest.mark.real)


def qemu_img(*args):
    subprocess.run(['qemu-img'] + list(args), check=True,
                   capture_output=True)


def make_raw(path, data_mib=2, total_mib=8, seed=1):
    """A raw disk: ``data_mib`` of pseudo-random bytes, then zeros."""
    import random
    rnd = random.Random(seed)
    with open(path, 'wb') as f:
        f.write(rnd.randbytes(data_mib * MiB))
        f.truncate(total_mib * MiB)
    return path


@pytest.fixture(scope='session')
def image_files(tmp_path_factory):
    """Images built once per session, by file name (``disk.qcow2``, ...);
    tests must not modify them."""
    d = tmp_path_factory.mktemp('images')
    raw = make_raw(str(d / 'disk.raw'))
    qemu_img('convert', '-f', 'raw', '-O', 'qcow2', raw, str(d / 'disk.qcow2'))
    qemu_img('convert', '-f', 'raw', '-O', 'vmdk', '-o',
             'subformat=monolithicSparse', raw, str(d / 'disk.vmdk'))
    # malicious and broken ones
    qemu_img('create', '-f', 'qcow2', '-F', 'raw', '-b', '/etc/hostname',
             str(d / 'backing.qcow2'))
    qemu_img('create', '-f', 'qcow2', '-o',
             'data_file=%s' % (d / 'external.data'), str(d / 'datafile.qcow2'),
             '8M')
    qemu_img('create', '-f', 'qcow2', str(d / 'big.qcow2'), '100G')
    qemu_img('convert', '-f', 'raw', '-O', 'vpc', raw, str(d / 'disk.vhd'))
    return {name: str(d / name) for name in os.listdir(d)}


class AgentEnv:
    """A private instances_path, state_path and config file."""

    def __init__(self, root, instances=None, **sections):
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        self.instances = instances or os.path.join(self.root, 'instances')
        os.makedirs(self.instances, exist_ok=True)  # nova's, as on a host
        self.state = os.path.join(self.root, 'state')
        self.base_dir = os.path.join(self.instances, '_base')
        self.conf_path = os.path.join(self.root, 'agent.conf')
        self.sections = {
            'DEFAULT': {'instances_path': self.instances,
                        'state_path': self.state},
            'libvirt': {'connection_uri': ''},
            'glance': {'num_retries': '2', 'read_timeout': '2'},
            'api': {'socket_path': os.path.join(self.root, 'agent.sock')},
            'volume_linking': {'device_links_path':
                               os.path.join(self.root, 'run', 'devices')},
        }
        self.configure(**sections)

    def configure(self, **sections):
        for name, values in sections.items():
            self.sections.setdefault(name, {}).update(
                {k: str(v) for k, v in values.items()})
        with open(self.conf_path, 'w') as f:
            for name, values in self.sections.items():
                f.write('[%s]\n' % name)
                for k, v in values.items():
                    f.write('%s = %s\n' % (k, v))

    def agent(self):
        return core.TemplateAgent(config.load([self.conf_path]))

    def cli(self, *args, check=True, env=None):
        """Run the real CLI in a subprocess; returns CompletedProcess."""
        full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        proc = subprocess.run(
            [sys.executable, '-m', 'agent.cli', '--config-file',
             self.conf_path] + [str(a) for a in args],
            capture_output=True, text=True, env=full_env, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError('CLI %s failed (%d): %s' % (
                args, proc.returncode, proc.stderr))
        return proc

    def cli_json(self, *args):
        return json.loads(self.cli(*args, '--format', 'json').stdout)

    def base_files(self):
        if not os.path.isdir(self.base_dir):
            return []
        return sorted(os.listdir(self.base_dir))


@pytest.fixture
def env(tmp_path):
    return AgentEnv(tmp_path)


@pytest.fixture
def glance():
    with GlanceStandIn() as server:
        yield server


@pytest.fixture
def glance_env(env, glance):
    env.configure(image_source={'driver': 'glance'},
                  glance={'api_servers': glance.url})
    return env


def same_content(a, b):
    """Compare two disks' guest-visible content with qemu-img compare."""
    proc = subprocess.run(['qemu-img', 'compare', a, b], capture_output=True,
                          text=True)
    return proc.returncode == 0


def overlay_equals(base, original, workdir):
    """A qcow2 overlay on ``base`` (as nova builds an instance disk) reads
    back as ``original``."""
    overlay = os.path.join(str(workdir), 'ovl-%s.qcow2' % uuid.uuid4().hex)
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-F', 'raw', '-b',
                    base, overlay], check=True, capture_output=True)
    try:
        return same_content(overlay, original)
    finally:
        os.unlink(overlay)


def files_written(pid, directory):
    """stat results of the files process ``pid`` has open in
    ``directory`` (named or not)."""
    found = []
    fd_dir = '/proc/%d/fd' % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.path.realpath(os.path.join(fd_dir, fd))
            if target.startswith(directory + '/'):
                found.append(os.stat(os.path.join(fd_dir, fd)))
        except OSError:
            continue
    return found


@pytest.fixture(scope='session', autouse=True)
def _tools_present():
    for tool in ('qemu-img', 'losetup'):
        if not shutil.which(tool):
            pytest.fail('%s is missing: run scripts/setup.sh (apt-get '
                        'install qemu-utils util-linux)' % tool)
