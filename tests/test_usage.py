"""Who uses a base image, and the rule that follows: a base in use is never
removed, by ``prune`` or by ``remove``.

Everything here is real: base images made by the CLI (local catalog import +
fetch) or written into ``_base`` as nova would, qcow2 overlays made with
qemu-img, libvirt's test driver reading a node XML file (so the CLI
subprocesses see the same domains as the test), processes that really hold a
base open, and real loop devices.
"""

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
import uuid

import pytest

from agent import errors
from tests.conftest import make_raw

DAY = 86400


# -- helpers ------------------------------------------------------------------
def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


def nova_base(env, image_id, suffix='', seed=7, mtime=None):
    """A base written straight into ``_base`` as nova would have made it."""
    os.makedirs(env.base_dir, exist_ok=True)
    path = os.path.join(env.base_dir, sha1(image_id) + suffix)
    make_raw(path, data_mib=1, total_mib=2, seed=seed)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@contextlib.contextmanager
def in_process(env):
    """The same core calls the CLI makes, in this process (no interpreter
    start-up per call); the usage scan excludes only this process."""
    agent = env.agent()
    try:
        yield agent
    finally:
        agent.close()


def fetched_base(env, tmp_path, image_id, seed=3, cli=False):
    """A base prepared by the agent: imported into the local catalog, then
    fetched (by the CLI, or by the same core calls in this process)."""
    raw = make_raw(str(tmp_path / ('%s.raw' % image_id)), data_mib=1,
                   total_mib=2, seed=seed)
    if cli:
        env.cli('images', 'import', raw, '--id', image_id)
        path = env.cli('fetch', image_id).stdout.strip().splitlines()[-1]
    else:
        from agent.images.local_catalog import LocalCatalog
        with in_process(env) as agent:
            LocalCatalog(agent.conf.image_source.local_path).import_image(
                raw, image_id)
            path = agent.fetch_image(image_id)
    assert path == os.path.join(env.base_dir, sha1(image_id))
    assert os.path.isfile(path)
    return path


def prune_here(env, **kwargs):
    with in_process(env) as agent:
        return agent.prune(**kwargs)


def listing_here(env):
    with in_process(env) as agent:
        rows, _warnings = agent.list_images()
    return {row['filename']: row for row in rows}


def overlay(backing, path, relative_to=None):
    """A qcow2 overlay on a raw ``backing``; with ``relative_to`` the
    backing file is recorded as a path relative to that directory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recorded = os.path.relpath(backing, relative_to) if relative_to \
        else backing
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-F', 'raw', '-b',
                    recorded, path], check=True, capture_output=True)
    return path


def qcow2_overlay_on_qcow2(backing, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-F', 'qcow2', '-b',
                    backing, path], check=True, capture_output=True)
    return path


def recorded_backing(path):
    info = json.loads(subprocess.run(
        ['qemu-img', 'info', '-U', '--output=json', path], check=True,
        capture_output=True, text=True).stdout)
    return info.get('backing-filename')


RUNNING, SHUTOFF = 1, 5   # virDomainState


def write_node_xml(path, domains):
    """A libvirt test-driver node file.

    :param domains: ``[(name, state, [disk_xml, ...]), ...]``; ``state`` is
        written as ``<test:runstate>``, which the test driver honours.
    """
    parts = ['<node>']
    for name, state, disks in domains:
        parts.append(
            "<domain type='test' "
            "xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
            "<name>%s</name><memory>65536</memory><os><type>hvm</type></os>"
            "<devices>%s</devices><test:runstate>%d</test:runstate>"
            "</domain>" % (name, ''.join(disks), state))
    parts.append('</node>')
    with open(path, 'w') as f:
        f.write('\n'.join(parts))
    return 'test://' + os.path.abspath(path)


def file_disk(source, fmt, dev='vda', backing=None):
    backing_xml = ''
    if backing:
        backing_xml = ("<backingStore type='file'><format type='raw'/>"
                       "<source file='%s'/><backingStore/></backingStore>"
                       % backing)
    return ("<disk type='file' device='disk'><driver name='qemu' type='%s'/>"
            "<source file='%s'/>%s<target dev='%s'/></disk>"
            % (fmt, source, backing_xml, dev))


def block_disk(device, dev='vda'):
    return ("<disk type='block' device='disk'><driver name='qemu' "
            "type='raw'/><source dev='%s'/><target dev='%s'/></disk>"
            % (device, dev))


def listing(env):
    """``list --format json`` as ``{filename: row}``."""
    return {row['filename']: row for row in env.cli_json('list')}


def prune(env, *args):
    return env.cli_json('prune', '--yes', *args)


def removed_names(report):
    return sorted(item['filename'] for item in report['removed'])


def in_use_names(report):
    return sorted(item['filename'] for item in report['in_use'])


@contextlib.contextmanager
def holding_open(path):
    """A separate process holding ``path`` open read-only until the end."""
    proc = subprocess.Popen(
        [sys.executable, '-c',
         'import os, sys, time\n'
         'fd = os.open(sys.argv[1], os.O_RDONLY)\n'
         'print("ready", flush=True)\n'
         'time.sleep(300)\n', path],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'ready'
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def loop_device(path):
    """A read-only loop device over ``path``, always detached at the end."""
    dev = subprocess.run(['losetup', '-r', '-f', '--show', path], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        assert dev.startswith('/dev/loop')
        yield dev
    finally:
        subprocess.run(['losetup', '-d', dev], capture_output=True)


# -- 1. libvirt domains -------------------------------------------------------
def test_libvirt_domains_running_and_shutoff_protect_their_bases(
        env, tmp_path):
    import libvirt
    elsewhere = tmp_path / 'elsewhere'      # outside instances_path
    elsewhere.mkdir()
    running = fetched_base(env, tmp_path, 'img-running', seed=1, cli=True)
    shutoff = nova_base(env, 'img-shutoff', seed=2)
    direct = nova_base(env, 'img-direct', seed=3)
    declared = nova_base(env, 'img-declared', seed=4)
    unused = nova_base(env, 'img-unused', seed=5)

    # vm-running: a two-level chain, top -> mid -> base, all outside
    # instances_path, so only libvirt + qemu-img can find the base
    mid = overlay(running, str(elsewhere / 'running-mid.qcow2'))
    top = qcow2_overlay_on_qcow2(mid, str(elsewhere / 'running-top.qcow2'))
    # vm-shutoff: defined, not running, on an overlay of its base
    off_disk = overlay(shutoff, str(elsewhere / 'shutoff.qcow2'),
                       relative_to=str(elsewhere))
    uri = write_node_xml(str(tmp_path / 'node.xml'), [
        ('vm-running', RUNNING, [file_disk(top, 'qcow2')]),
        ('vm-shutoff', SHUTOFF, [file_disk(off_disk, 'qcow2')]),
        # the base itself as the disk of a shut-off domain
        ('vm-direct', SHUTOFF, [file_disk(direct, 'raw')]),
        # the chain only as libvirt records it (<backingStore>): the top
        # image is not on this host, qemu-img cannot read it
        ('vm-declared', RUNNING, [file_disk(
            str(elsewhere / 'not-here.qcow2'), 'qcow2', backing=declared)]),
    ])
    env.configure(libvirt={'connection_uri': uri})

    # the test driver really has one running and one defined, shut-off domain
    conn = libvirt.openReadOnly(uri)
    try:
        states = {d.name(): (d.state()[0], d.isActive(), d.isPersistent())
                  for d in conn.listAllDomains(0)}
    finally:
        conn.close()
    assert states['vm-running'] == (libvirt.VIR_DOMAIN_RUNNING, 1, 1)
    assert states['vm-shutoff'] == (libvirt.VIR_DOMAIN_SHUTOFF, 0, 1)
    assert states['vm-direct'] == (libvirt.VIR_DOMAIN_SHUTOFF, 0, 1)
    assert recorded_backing(off_disk) == os.path.relpath(shutoff,
                                                         str(elsewhere))

    rows = listing(env)
    expected = {running: ['domain:vm-running'],
                shutoff: ['domain:vm-shutoff'],
                direct: ['domain:vm-direct'],
                declared: ['domain:vm-declared'],
                unused: []}
    for path, users in expected.items():
        row = rows[os.path.basename(path)]
        assert row['users'] == users, row
        assert row['in_use'] is bool(users)
    assert rows[os.path.basename(running)]['image_id'] == 'img-running'

    report = prune(env, '--min-age', '0')
    assert removed_names(report) == [os.path.basename(unused)]
    assert in_use_names(report) == sorted(
        os.path.basename(p) for p in (running, shutoff, direct, declared))
    assert report['warnings'] == []
    assert not os.path.lexists(unused)
    for path in (running, shutoff, direct, declared):
        assert os.path.isfile(path)

    for image_id, domain in (('img-running', 'vm-running'),
                             ('img-shutoff', 'vm-shutoff')):
        proc = env.cli('remove', image_id, check=False)
        assert proc.returncode == 1
        assert 'in use' in proc.stderr
        assert 'domain:%s' % domain in proc.stderr
        assert os.path.isfile(os.path.join(env.base_dir, sha1(image_id)))

    # once the domains are undefined, the same bases go
    write_node_xml(str(tmp_path / 'node.xml'), [])
    report = prune_here(env, min_age=0)
    assert removed_names(report) == sorted(
        os.path.basename(p) for p in (running, shutoff, direct, declared))
    assert env.base_files() == []
    assert os.path.isfile(top) and os.path.isfile(mid)


def test_libvirt_symlinks_are_resolved_both_ways(env, tmp_path):
    """A domain's disk that is a symlink to a base, and a base that is a
    symlink to the file a domain names, are both the same base."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    via_link = nova_base(env, 'img-via-link', seed=1)
    domain_link = str(elsewhere / 'disk-link')
    os.symlink(via_link, domain_link)

    store_file = make_raw(str(elsewhere / 'store.raw'), 1, 2, seed=2)
    linked_base = os.path.join(env.base_dir, sha1('img-linked-base'))
    os.symlink(store_file, linked_base)

    # and a domain whose overlay is backed by the base through a symlink
    chain_link = str(elsewhere / 'chain-link')
    chained = nova_base(env, 'img-chained', seed=3)
    os.symlink(chained, chain_link)
    chain_disk = overlay(chain_link, str(elsewhere / 'chain.qcow2'))
    unused = nova_base(env, 'img-unused', seed=4)

    uri = write_node_xml(str(tmp_path / 'node.xml'), [
        ('vm-link', SHUTOFF, [file_disk(domain_link, 'raw')]),
        ('vm-store', RUNNING, [file_disk(store_file, 'raw')]),
        ('vm-chain', RUNNING, [file_disk(chain_disk, 'qcow2')]),
    ])
    env.configure(libvirt={'connection_uri': uri})

    rows = listing(env)
    assert rows[sha1('img-via-link')]['users'] == ['domain:vm-link']
    assert rows[sha1('img-linked-base')]['users'] == ['domain:vm-store']
    assert rows[sha1('img-linked-base')]['target'] == store_file
    assert rows[sha1('img-chained')]['users'] == ['domain:vm-chain']
    assert rows[sha1('img-unused')]['in_use'] is False

    report = prune_here(env, min_age=0)
    assert removed_names(report) == [sha1('img-unused')]
    assert not os.path.lexists(unused)
    assert os.path.islink(linked_base) and os.path.isfile(via_link)
    assert os.path.isfile(chained)

    proc = env.cli('remove', 'img-linked-base', check=False)
    assert proc.returncode == 1
    assert 'domain:vm-store' in proc.stderr
    assert os.path.islink(linked_base)


# -- 2. instance disks --------------------------------------------------------
def test_instance_disks_with_absolute_and_relative_backing_files(env):
    absolute = nova_base(env, 'img-abs', seed=1)
    relative = nova_base(env, 'img-rel', seed=2)
    resized = nova_base(env, 'img-resized', suffix='_2097152', seed=3)
    unused = nova_base(env, 'img-unused', seed=4)
    unused_resized = nova_base(env, 'img-unused', suffix='_4194304', seed=5)

    def instance_disk():
        return os.path.join(env.instances, str(uuid.uuid4()), 'disk')

    abs_disk = overlay(absolute, instance_disk())
    rel_disk = instance_disk()
    overlay(relative, rel_disk, relative_to=os.path.dirname(rel_disk))
    resized_disk = overlay(resized, instance_disk())
    assert recorded_backing(abs_disk) == absolute
    assert recorded_backing(rel_disk) == '../_base/' + sha1('img-rel')

    rows = listing(env)
    assert rows[sha1('img-abs')]['users'] == ['disk:' + abs_disk]
    assert rows[sha1('img-rel')]['users'] == ['disk:' + rel_disk]
    assert rows[os.path.basename(resized)]['users'] == ['disk:' + resized_disk]
    assert rows[os.path.basename(resized)]['resized'] is True
    assert rows[sha1('img-unused')]['in_use'] is False
    assert rows[os.path.basename(unused_resized)]['in_use'] is False

    report = prune(env, '--min-age', '0')
    assert removed_names(report) == sorted(
        [os.path.basename(unused), os.path.basename(unused_resized)])
    for path in (absolute, relative, resized):
        assert os.path.isfile(path)

    proc = env.cli('remove', 'img-rel', check=False)
    assert proc.returncode == 1
    assert 'disk:' + rel_disk in proc.stderr
    assert os.path.isfile(relative)

    # the instance is deleted: its base is free
    os.unlink(abs_disk)
    os.rmdir(os.path.dirname(abs_disk))
    report = prune_here(env, min_age=0)
    assert removed_names(report) == [sha1('img-abs')]
    assert sorted(env.base_files()) == sorted(
        os.path.basename(p) for p in (relative, resized))


def test_two_names_of_one_file_are_both_in_use(env):
    """Two names in ``_base`` for the same inode (a hard link): whichever
    name a disk is backed by, both are reported in use and touched."""
    first = nova_base(env, 'img-hardlink-a', mtime=time.time() - DAY)
    second = os.path.join(env.base_dir, sha1('img-hardlink-b'))
    os.link(first, second)
    names = sorted([first, second])
    # back the disk on the name that sorts first: the scan must not lose it
    disk = overlay(names[0], os.path.join(env.instances, 'inst-1', 'disk'))

    rows = listing_here(env)
    for path in names:
        assert rows[os.path.basename(path)]['users'] == ['disk:' + disk]

    before = time.time()
    report = prune_here(env, min_age=0)
    assert report['removed'] == []
    assert in_use_names(report) == [os.path.basename(p) for p in names]
    for item in report['in_use']:
        assert item['users'] == ['disk:' + disk]
    assert os.lstat(names[0]).st_mtime >= before - 1


# -- 3. open descriptors ------------------------------------------------------
def test_process_holding_a_base_open_protects_it(env):
    held = nova_base(env, 'img-held', seed=1)
    unused = nova_base(env, 'img-unused', seed=2)

    with holding_open(held) as proc:
        rows = listing(env)
        users = rows[sha1('img-held')]['users']
        assert len(users) == 1
        assert users[0].startswith('process:%d(' % proc.pid)
        assert users[0].endswith(')')
        assert rows[sha1('img-unused')]['users'] == []

        report = prune(env, '--min-age', '0')
        assert removed_names(report) == [os.path.basename(unused)]
        assert in_use_names(report) == [os.path.basename(held)]

        removal = env.cli('remove', 'img-held', check=False)
        assert removal.returncode == 1
        assert 'process:%d(' % proc.pid in removal.stderr
        assert os.path.isfile(held)

    report = prune_here(env, min_age=0)
    assert removed_names(report) == [os.path.basename(held)]
    assert env.base_files() == []


def test_linked_block_device_held_open_by_device_path(env, tmp_path):
    """A linked base (``_base/<sha1>`` -> ``/dev/loopN``) is in use while a
    process holds the device, an instance disk is backed by it, or a
    domain has the device as a disk; all compared by device number."""
    volume = make_raw(str(tmp_path / 'volume.raw'), 1, 4, seed=9)
    os.makedirs(env.base_dir)
    base = os.path.join(env.base_dir, sha1('img-linked'))
    other = nova_base(env, 'img-unused', seed=2)

    with loop_device(volume) as dev:
        os.symlink(dev, base)

        with holding_open(dev) as proc:
            rows = listing(env)
            row = rows[sha1('img-linked')]
            assert row['target'] == dev
            assert len(row['users']) == 1
            assert row['users'][0].startswith('process:%d(' % proc.pid)

            report = prune(env, '--min-age', '0')
            assert removed_names(report) == [os.path.basename(other)]
            removal = env.cli('remove', 'img-linked', check=False)
            assert removal.returncode == 1
            assert 'process:%d(' % proc.pid in removal.stderr
            assert os.path.islink(base)

        # a libvirt domain with the device as a block disk
        uri = write_node_xml(str(tmp_path / 'node.xml'), [
            ('vm-block', SHUTOFF, [block_disk(dev)])])
        env.configure(libvirt={'connection_uri': uri})
        assert listing_here(env)[sha1('img-linked')]['users'] == [
            'domain:vm-block']
        env.configure(libvirt={'connection_uri': ''})

        # an instance disk backed by the link
        disk = overlay(base, os.path.join(env.instances, 'inst-1', 'disk'))
        report = prune_here(env, min_age=0)
        assert report['removed'] == []
        assert report['in_use'] == [{'filename': sha1('img-linked'),
                                     'users': ['disk:' + disk]}]

        # nothing uses it: the link goes, the device and the volume stay
        os.unlink(disk)
        report = prune_here(env, min_age=0)
        assert removed_names(report) == [sha1('img-linked')]
        assert not os.path.lexists(base)
        assert os.path.exists(dev)
    assert os.path.isfile(volume)


def test_link_whose_target_is_missing_stays_while_a_disk_names_it(
        env, tmp_path):
    """After a host restart, a linked base can point at a device that is not
    attached yet: qemu-img cannot open the chain, but the instance disk
    still names the base, so it is in use and kept."""
    volume = make_raw(str(tmp_path / 'volume.raw'), 1, 2, seed=4)
    os.makedirs(env.base_dir)
    base = os.path.join(env.base_dir, sha1('img-linked'))
    os.symlink(volume, base)
    disk = overlay(base, os.path.join(env.instances, 'inst-1', 'disk'))
    top = qcow2_overlay_on_qcow2(
        disk, os.path.join(env.instances, 'inst-2', 'disk'))
    os.rename(volume, volume + '.detached')     # the link now dangles
    assert not os.path.exists(base) and os.path.islink(base)

    report = prune(env, '--min-age', '0')
    assert report['removed'] == []
    assert report['in_use'] == [{'filename': sha1('img-linked'),
                                 'users': ['disk:' + disk, 'disk:' + top]}]
    assert os.path.islink(base)
    proc = env.cli('remove', 'img-linked', check=False)
    assert proc.returncode == 1 and 'disk:' + disk in proc.stderr
    assert os.path.islink(base)


# -- 4. unreachable libvirt ---------------------------------------------------
@pytest.mark.parametrize('uri_kind', ['test-driver', 'qemu-daemon'])
def test_unreachable_libvirt_refuses_removal_but_lists(env, tmp_path,
                                                       uri_kind):
    if uri_kind == 'test-driver':
        uri = 'test://' + str(tmp_path / 'nonexistent.xml')
    else:
        # qemu:///system through a socket no libvirtd listens on, whether or
        # not someone runs a libvirtd on this machine
        uri = 'qemu+unix:///system?socket=%s' % (tmp_path / 'no-libvirt-sock')
    env.configure(libvirt={'connection_uri': uri})
    base = nova_base(env, 'img-unknown', mtime=time.time() - 30 * DAY)

    for args in (('prune', '--min-age', '0', '--yes'),
                 ('remove', 'img-unknown')):
        proc = env.cli(*args, check=False)
        assert proc.returncode != 0, args
        assert 'Cannot tell whether base images are in use' in proc.stderr
        assert 'libvirt' in proc.stderr
        assert 'Nothing is removed' in proc.stderr
        assert os.path.isfile(base)

    with in_process(env) as agent:
        with pytest.raises(errors.UsageUnknown):
            agent.prune()                      # the configured ages
        with pytest.raises(errors.UsageUnknown):
            agent.prune(dry_run=True, min_age=0)
    assert os.path.isfile(base)

    proc = env.cli('list', '--format', 'json')
    assert 'warning:' in proc.stderr and 'libvirt' in proc.stderr
    rows = {r['filename']: r for r in json.loads(proc.stdout)}
    assert rows[sha1('img-unknown')]['in_use'] is False
    assert env.base_files() == [sha1('img-unknown')]


# -- 5. options: remove_unused_base_images, minimum ages, touching ------------
def test_remove_unused_base_images_false_removes_nothing(env):
    env.configure(image_cache={'remove_unused_base_images': 'False'})
    old = time.time() - 30 * DAY
    unused = nova_base(env, 'img-unused', mtime=old)
    resized = nova_base(env, 'img-unused', suffix='_4194304', mtime=old)
    used = nova_base(env, 'img-used', mtime=old)
    disk = overlay(used, os.path.join(env.instances, 'inst-1', 'disk'))

    before = time.time()
    report = prune_here(env, min_age=0)
    assert report['remove_unused_base_images'] is False
    assert report['removed'] == []
    assert report['in_use'] == [{'filename': sha1('img-used'),
                                 'users': ['disk:' + disk]}]
    assert os.path.isfile(unused) and os.path.isfile(resized)
    assert os.stat(unused).st_mtime == pytest.approx(old, abs=1)
    # in-use bases are still touched
    assert os.stat(used).st_mtime >= before - 1

    proc = env.cli('prune', '--yes')
    assert 'remove_unused_base_images is False' in proc.stdout
    assert sorted(env.base_files()) == sorted(
        os.path.basename(p) for p in (unused, resized, used))


def test_minimum_ages_of_originals_and_resized_variants(env):
    env.configure(image_cache={
        'remove_unused_original_minimum_age_seconds': 3600,
        'remove_unused_resized_minimum_age_seconds': 600})
    now = time.time()
    orig_young = nova_base(env, 'img-orig-young', mtime=now - 1800)
    orig_old = nova_base(env, 'img-orig-old', mtime=now - 7200)
    res_young = nova_base(env, 'img-res-young', suffix='_1073741824',
                          mtime=now - 300)
    # 1800 s: too young for an original, old enough for a resized variant
    res_old = nova_base(env, 'img-res-old', suffix='_1073741824',
                        mtime=now - 1800)

    report = prune(env)
    assert removed_names(report) == sorted(
        os.path.basename(p) for p in (orig_old, res_old))
    assert sorted(report['too_young']) == sorted(
        os.path.basename(p) for p in (orig_young, res_young))
    assert sorted(env.base_files()) == sorted(
        os.path.basename(p) for p in (orig_young, res_young))

    # --min-age overrides both
    report = prune_here(env, min_age=60)
    assert removed_names(report) == sorted(
        os.path.basename(p) for p in (orig_young, res_young))


def test_in_use_bases_are_touched_by_a_prune_pass(env, tmp_path):
    old = time.time() - 10 * DAY
    used = fetched_base(env, tmp_path, 'img-used')
    os.utime(used, (old, old))
    overlay(used, os.path.join(env.instances, 'inst-1', 'disk'))
    nova_used = nova_base(env, 'img-nova-used', mtime=old)
    overlay(nova_used, os.path.join(env.instances, 'inst-2', 'disk'))

    # a dry run changes nothing
    report = prune_here(env, dry_run=True)
    assert in_use_names(report) == sorted([sha1('img-used'),
                                           sha1('img-nova-used')])
    assert os.stat(used).st_mtime == pytest.approx(old, abs=1)

    before = time.time()
    report = prune(env)
    assert report['removed'] == []
    for path in (used, nova_used):
        assert os.stat(path).st_mtime >= before - 1
    rows = listing_here(env)
    assert rows[sha1('img-used')]['last_used'] >= before - 1
    assert rows[sha1('img-nova-used')]['last_used'] >= before - 1


# -- 6. dry run, symlinks, foreign files --------------------------------------
def test_prune_dry_run_removes_nothing_and_reports(env):
    unused = nova_base(env, 'img-unused', mtime=time.time() - 2 * DAY)
    used = nova_base(env, 'img-used')
    overlay(used, os.path.join(env.instances, 'inst-1', 'disk'))

    report = env.cli_json('prune', '--dry-run', '--min-age', '0')
    assert report['dry_run'] is True
    assert removed_names(report) == [sha1('img-unused')]
    assert report['removed'][0]['path'] == unused
    assert report['reclaimed_bytes'] == os.stat(unused).st_blocks * 512 > 0
    assert in_use_names(report) == [sha1('img-used')]

    proc = env.cli('prune', '--dry-run')   # default age: 1 day < 2 days
    assert 'would remove %s' % unused in proc.stdout
    assert os.path.isfile(unused) and os.path.isfile(used)
    assert sorted(env.base_files()) == sorted([sha1('img-unused'),
                                               sha1('img-used')])


def test_prune_unlinks_symlinks_and_never_follows_them(env, tmp_path):
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    target = make_raw(str(elsewhere / 'image.raw'), 1, 2, seed=5)
    with open(target, 'rb') as f:
        content = hashlib.sha256(f.read()).hexdigest()
    target_dir = elsewhere / 'images'
    target_dir.mkdir()
    (target_dir / 'keep.raw').write_bytes(b'keep me')
    os.makedirs(env.base_dir)
    to_file = os.path.join(env.base_dir, sha1('img-link-file'))
    to_dir = os.path.join(env.base_dir, sha1('img-link-dir'))
    dangling = os.path.join(env.base_dir, sha1('img-dangling'))
    os.symlink(target, to_file)
    os.symlink(str(target_dir), to_dir)
    os.symlink(str(elsewhere / 'gone.raw'), dangling)

    report = prune(env, '--min-age', '0')
    assert removed_names(report) == sorted(
        os.path.basename(p) for p in (to_file, to_dir, dangling))
    assert env.base_files() == []
    with open(target, 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == content
    assert (target_dir / 'keep.raw').read_bytes() == b'keep me'


def test_prune_never_removes_files_that_are_not_bases(env):
    old = time.time() - 30 * DAY
    unused = nova_base(env, 'img-unused', mtime=old)
    sha = sha1('img-unused')
    foreign = {
        'README': b'hello',
        'foo.part': b'someone else downloading',
        sha1('img-downloading') + '.part': b'nova downloading',
        sha1('img-converting') + '.converted': b'nova converting',
        sha.upper(): b'not a lowercase sha1',
        sha + '_small': b'not a size',
        sha + '.info': b'{}',
        sha[:39]: b'39 hex digits',
    }
    for name, data in foreign.items():
        path = os.path.join(env.base_dir, name)
        with open(path, 'wb') as f:
            f.write(data)
        os.utime(path, (old, old))
    # a directory named like a base is not a base either
    base_named_dir = os.path.join(env.base_dir, sha1('img-dir'))
    os.mkdir(base_named_dir)
    with open(os.path.join(base_named_dir, 'inside'), 'w') as f:
        f.write('x')
    other = nova_base(env, 'img-other', mtime=old)

    report = prune(env, '--min-age', '0')
    assert removed_names(report) == sorted([os.path.basename(unused),
                                            os.path.basename(other)])
    for name, data in foreign.items():
        with open(os.path.join(env.base_dir, name), 'rb') as f:
            assert f.read() == data
    assert os.path.isfile(os.path.join(base_named_dir, 'inside'))
    assert sorted(env.base_files()) == sorted(
        list(foreign) + [os.path.basename(base_named_dir)])
    assert sha1('img-dir') not in listing_here(env)


# -- 7. instance disks in every shape a nova user can leave ------------------
def test_instance_disks_that_are_links_to_a_base_file(env):
    """A symlink and a hard link to a base, as instance disks: the base is
    in use through either (compared by device and inode)."""
    by_symlink = nova_base(env, 'img-symlinked', seed=1)
    by_hardlink = nova_base(env, 'img-hardlinked', seed=2)
    unused = nova_base(env, 'img-unused', seed=3)
    os.makedirs(os.path.join(env.instances, 'inst-1'))
    os.makedirs(os.path.join(env.instances, 'inst-2'))
    sym_disk = os.path.join(env.instances, 'inst-1', 'disk')
    hard_disk = os.path.join(env.instances, 'inst-2', 'disk')
    os.symlink(by_symlink, sym_disk)
    os.link(by_hardlink, hard_disk)

    rows = listing_here(env)
    assert rows[sha1('img-symlinked')]['users'] == ['disk:' + sym_disk]
    assert rows[sha1('img-hardlinked')]['users'] == ['disk:' + hard_disk]
    report = prune_here(env, min_age=0)
    assert removed_names(report) == [os.path.basename(unused)]
    assert os.path.isfile(by_symlink) and os.path.isfile(by_hardlink)


def test_instance_disk_that_is_a_link_to_the_device_of_a_linked_base(
        env, tmp_path):
    """nova's flat and raw backends copy a base with ``cp -r``: a linked
    base (a symlink to ``/dev/loopN``) becomes an instance disk that is a
    symlink to the same device. That device is in use."""
    volume = make_raw(str(tmp_path / 'volume.raw'), 1, 2, seed=4)
    os.makedirs(env.base_dir)
    base = os.path.join(env.base_dir, sha1('img-linked'))
    with loop_device(volume) as dev:
        os.symlink(dev, base)
        disk = os.path.join(env.instances, 'inst-1', 'disk')
        os.makedirs(os.path.dirname(disk))
        os.symlink(dev, disk)

        assert listing_here(env)[sha1('img-linked')]['users'] == [
            'disk:' + disk]
        report = prune(env, '--min-age', '0')
        assert report['removed'] == []
        assert os.path.islink(base)
        proc = env.cli('remove', 'img-linked', check=False)
        assert proc.returncode == 1 and 'disk:' + disk in proc.stderr
        assert os.path.islink(base)

        # the copy nova's cp makes of the base link itself
        os.unlink(disk)
        subprocess.run(['cp', '-r', base, disk], check=True)
        assert os.readlink(disk) == dev
        assert listing_here(env)[sha1('img-linked')]['users'] == [
            'disk:' + disk]


def test_instance_disk_that_is_a_device_node_of_a_linked_base(
        env, tmp_path):
    """A block device node of the linked base's device (another name of
    the same device number) as an instance disk."""
    volume = make_raw(str(tmp_path / 'volume.raw'), 1, 2, seed=5)
    os.makedirs(env.base_dir)
    base = os.path.join(env.base_dir, sha1('img-linked'))
    with loop_device(volume) as dev:
        os.symlink(dev, base)
        disk = os.path.join(env.instances, 'inst-1', 'disk')
        os.makedirs(os.path.dirname(disk))
        os.mknod(disk, 0o600 | stat.S_IFBLK, os.stat(dev).st_rdev)

        assert listing_here(env)[sha1('img-linked')]['users'] == [
            'disk:' + disk]
        report = prune_here(env, min_age=0)
        assert report['removed'] == []
        assert os.path.islink(base)


def test_disks_in_a_symlinked_instance_directory(env, tmp_path):
    """An instance directory that is a symlink (e.g. moved to another
    filesystem) is followed: its overlays and links keep their bases."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    overlaid = nova_base(env, 'img-overlaid', seed=1)
    linked = nova_base(env, 'img-linked', seed=2)
    unused = nova_base(env, 'img-unused', seed=3)
    real_dir = elsewhere / 'inst-moved'
    disk = overlay(overlaid, str(real_dir / 'disk'))
    os.symlink(linked, str(real_dir / 'disk.eph0'))
    os.symlink(str(real_dir), os.path.join(env.instances, 'inst-moved'))
    shown = os.path.join(env.instances, 'inst-moved')

    rows = listing_here(env)
    assert rows[sha1('img-overlaid')]['users'] == [
        'disk:' + os.path.join(shown, 'disk')]
    assert rows[sha1('img-linked')]['users'] == [
        'disk:' + os.path.join(shown, 'disk.eph0')]
    report = prune(env, '--min-age', '0')
    assert removed_names(report) == [os.path.basename(unused)]
    assert os.path.isfile(overlaid) and os.path.isfile(linked)
    assert os.path.isfile(disk)


def test_symlinked_directories_into_base_locks_or_loops_are_not_followed(
        env, tmp_path):
    """Symlinks that lead back into ``_base`` or ``locks``, or around in a
    loop, are not instance directories: the walk ends, and the bases in
    ``_base`` are not their own users."""
    base = nova_base(env, 'img-a', seed=1)
    os.makedirs(os.path.join(env.instances, 'locks'), exist_ok=True)
    os.symlink(env.base_dir, os.path.join(env.instances, 'inst-base'))
    os.symlink(os.path.join(env.instances, 'locks'),
               os.path.join(env.instances, 'inst-locks'))
    os.symlink(env.instances, os.path.join(env.instances, 'inst-loop'))
    nested = tmp_path / 'nested'
    (nested / 'deeper').mkdir(parents=True)
    os.symlink(str(nested), str(nested / 'deeper' / 'up'))
    os.symlink(str(nested), os.path.join(env.instances, 'inst-nested'))

    rows = listing_here(env)
    assert rows[sha1('img-a')]['in_use'] is False
    report = prune_here(env, min_age=0)
    assert removed_names(report) == [os.path.basename(base)]
    assert report['warnings'] == []


@contextlib.contextmanager
def as_nobody():
    """Work as ``nobody`` for a moment (effective ids only): directories
    mode 000 are unreadable then, as for the agent after it dropped to
    nova."""
    import pwd
    nobody = pwd.getpwnam('nobody')
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_instance_directory_makes_usage_unknown(tmp_path):
    """An instance directory of the owner of instances_path that cannot be
    read may hold a disk on any base: prune removes nothing, and list
    warns."""
    import tempfile
    from tests.conftest import AgentEnv
    # a tree ``nobody`` can walk (pytest's own tmp_path is root's, 0700)
    root = tempfile.mkdtemp(prefix='usage-unreadable-')
    try:
        os.chmod(root, 0o755)
        env = AgentEnv(root)
        base = nova_base(env, 'img-hidden', seed=1)
        hidden = os.path.join(env.instances, 'inst-hidden')
        overlay(base, os.path.join(hidden, 'disk'))
        # the tree is nobody's, as instances_path is nova's on a host
        import pwd
        nobody = pwd.getpwnam('nobody')
        for top, dirs, names in os.walk(env.instances):
            for name in [top] + [os.path.join(top, n) for n in dirs + names]:
                os.lchown(name, nobody.pw_uid, nobody.pw_gid)
        os.chmod(hidden, 0)
        # the scanner as the dropped agent sees the tree (this process
        # must not drop for good: only its effective ids change)
        from agent import config
        from agent.hypervisor.usage import UsageScanner
        scanner = UsageScanner(config.load([env.conf_path]))
        with as_nobody():
            with pytest.raises(errors.UsageUnknown) as caught:
                scanner.scan([base], strict=True)
            assert hidden in str(caught.value)
            usage = scanner.scan([base], strict=False)
        assert usage.users[base] == []
        assert len(usage.warnings) == 1 and hidden in usage.warnings[0]
        # the CLI, started as root, drops to nobody (the owner) and refuses
        for args in (('prune', '--min-age', '0', '--yes'),
                     ('remove', 'img-hidden')):
            proc = env.cli(*args, check=False)
            assert proc.returncode == 1, (args, proc.stderr)
            assert 'Cannot tell whether base images are in use' in \
                proc.stderr and hidden in proc.stderr, proc.stderr
            assert os.path.isfile(base)
        proc = env.cli('list', '--format', 'json')
        assert 'warning:' in proc.stderr and hidden in proc.stderr
        assert json.loads(proc.stdout)[0]['in_use'] is False
    finally:
        os.chmod(os.path.join(root, 'instances', 'inst-hidden'), 0o755)
        import shutil
        shutil.rmtree(root)


def test_unreadable_disk_of_the_owner_makes_usage_unknown(tmp_path):
    """An instance disk of the owner of instances_path whose header cannot
    be read may be an overlay on any base: nothing is removed. A file of
    another user (libvirt's root-owned console.log, 0600) is not nova's
    disk and changes nothing."""
    import pwd
    import shutil
    import tempfile
    from agent import config
    from agent.hypervisor.usage import UsageScanner
    from tests.conftest import AgentEnv
    root = tempfile.mkdtemp(prefix='usage-unreadable-disk-')
    try:
        os.chmod(root, 0o755)
        env = AgentEnv(root)
        base = nova_base(env, 'img-hidden', seed=1)
        disk = overlay(base, os.path.join(env.instances, 'inst-1', 'disk'))
        console = os.path.join(env.instances, 'inst-1', 'console.log')
        with open(console, 'w') as f:
            f.write('boot\n')
        nobody = pwd.getpwnam('nobody')
        for top, dirs, names in os.walk(env.instances):
            for name in [top] + [os.path.join(top, n) for n in dirs + names]:
                os.lchown(name, nobody.pw_uid, nobody.pw_gid)
        os.chown(console, 0, 0)
        os.chmod(console, 0o600)
        scanner = UsageScanner(config.load([env.conf_path]))
        os.utime(disk)   # just written: read each time, never remembered
        with as_nobody():
            usage = scanner.scan([base], strict=False)
        assert usage.users[base] == ['disk:' + disk]
        assert usage.warnings == []        # console.log is not a problem
        os.chmod(disk, 0)
        with as_nobody():
            with pytest.raises(errors.UsageUnknown) as caught:
                scanner.scan([base], strict=True)
            usage = scanner.scan([base], strict=False)
        assert 'instance disk %s cannot be read' % disk in str(caught.value)
        assert usage.users[base] == [] and len(usage.warnings) == 1
        proc = env.cli('prune', '--min-age', '0', '--yes', check=False)
        assert proc.returncode == 1 and disk in proc.stderr, proc.stderr
        assert os.path.isfile(base)
    finally:
        shutil.rmtree(root)


# -- 8. libvirt volumes in storage pools --------------------------------------
def write_pool_node_xml(path, pools, domains):
    """A test-driver node file with storage pools: ``pools`` is
    ``[(pool, target dir, [(volume, path), ...]), ...]``."""
    parts = ['<node>']
    for name, target, volumes in pools:
        parts.append("<pool type='dir'><name>%s</name><target><path>%s"
                     "</path></target>" % (name, target))
        for vol, vol_path in volumes:
            parts.append("<volume type='file'><name>%s</name><key>%s</key>"
                         "<capacity unit='bytes'>1048576</capacity><target>"
                         "<path>%s</path></target></volume>"
                         % (vol, vol_path, vol_path))
        parts.append('</pool>')
    for name, state, disks in domains:
        parts.append(
            "<domain type='test' "
            "xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
            "<name>%s</name><memory>65536</memory><os><type>hvm</type></os>"
            "<devices>%s</devices><test:runstate>%d</test:runstate>"
            "</domain>" % (name, ''.join(disks), state))
    parts.append('</node>')
    with open(path, 'w') as f:
        f.write('\n'.join(parts))
    return 'test://' + os.path.abspath(path)


def volume_disk(pool, volume, dev='vda', fmt='raw'):
    return ("<disk type='volume' device='disk'><driver name='qemu' "
            "type='%s'/><source pool='%s' volume='%s'/><target dev='%s'/>"
            "</disk>" % (fmt, pool, volume, dev))


def test_libvirt_volume_disks_resolve_through_their_pool(env, tmp_path):
    """``<disk type='volume'>`` names a pool and a volume: the path the
    pool gives (a base itself, an overlay on a base, or the device of a
    linked base) decides which base is in use."""
    pool_dir = tmp_path / 'pool'
    pool_dir.mkdir()
    direct = nova_base(env, 'img-direct', seed=1)
    overlaid = nova_base(env, 'img-overlaid', seed=2)
    unused = nova_base(env, 'img-unused', seed=3)
    top = overlay(overlaid, str(pool_dir / 'top.qcow2'))
    volume = make_raw(str(tmp_path / 'volume.raw'), 1, 2, seed=4)
    linked = os.path.join(env.base_dir, sha1('img-linked'))
    with loop_device(volume) as dev:
        os.symlink(dev, linked)
        uri = write_pool_node_xml(str(tmp_path / 'node.xml'), [
            ('images', str(pool_dir), [('direct', direct),
                                       ('top.qcow2', top),
                                       ('dev', dev)])], [
            ('vm-direct', SHUTOFF, [volume_disk('images', 'direct')]),
            ('vm-overlay', RUNNING, [volume_disk('images', 'top.qcow2',
                                                 fmt='qcow2')]),
            ('vm-device', RUNNING, [volume_disk('images', 'dev')]),
        ])
        env.configure(libvirt={'connection_uri': uri})
        rows = listing(env)
        assert rows[sha1('img-direct')]['users'] == ['domain:vm-direct']
        assert rows[sha1('img-overlaid')]['users'] == ['domain:vm-overlay']
        assert rows[sha1('img-linked')]['users'] == ['domain:vm-device']
        report = prune(env, '--min-age', '0')
        assert removed_names(report) == [os.path.basename(unused)]
        assert report['warnings'] == []
        assert os.path.isfile(direct) and os.path.isfile(overlaid)
        assert os.path.islink(linked)
        os.unlink(linked)


@pytest.mark.parametrize('missing', ['volume', 'pool'])
def test_libvirt_volume_that_cannot_be_looked_up_makes_usage_unknown(
        env, tmp_path, missing):
    pool_dir = tmp_path / 'pool'
    pool_dir.mkdir()
    used = nova_base(env, 'img-used', seed=1)
    base = nova_base(env, 'img-maybe', seed=2)
    disk = (volume_disk('images', 'gone') if missing == 'volume'
            else volume_disk('no-such-pool', 'direct'))
    uri = write_pool_node_xml(str(tmp_path / 'node.xml'), [
        ('images', str(pool_dir), [('direct', used)])], [
        ('vm-known', RUNNING, [volume_disk('images', 'direct')]),
        ('vm-unknown', RUNNING, [disk])])
    env.configure(libvirt={'connection_uri': uri})

    for args in (('prune', '--min-age', '0', '--yes'),
                 ('remove', 'img-maybe')):
        proc = env.cli(*args, check=False)
        assert proc.returncode != 0, args
        assert 'Cannot tell whether base images are in use' in proc.stderr
        assert 'vm-unknown' in proc.stderr
        assert os.path.isfile(base)

    # list still tells what it knows, and warns about the rest
    proc = env.cli('list', '--format', 'json')
    assert 'warning:' in proc.stderr and 'vm-unknown' in proc.stderr
    rows = {r['filename']: r for r in json.loads(proc.stdout)}
    assert rows[sha1('img-used')]['users'] == ['domain:vm-known']
    assert rows[sha1('img-maybe')]['in_use'] is False


def test_a_disk_rebased_in_place_is_read_again(env):
    """Backing names are remembered by what a disk is and when it was last
    written: ``qemu-img rebase -u`` rewrites the header, and the next scan
    in the same process follows the new base, not the remembered one."""
    from agent import config
    from agent.hypervisor.usage import UsageScanner
    first = nova_base(env, 'img-first', seed=1)
    second = nova_base(env, 'img-second', seed=2)
    disk = overlay(first, os.path.join(env.instances, 'inst-1', 'disk'))
    # written a while ago: its header is remembered (a file written in the
    # last seconds is read again every time)
    os.utime(disk, (time.time() - 60, time.time() - 60))
    scanner = UsageScanner(config.load([env.conf_path]))
    usage = scanner.scan([first, second])
    assert usage.users == {first: ['disk:' + disk], second: []}
    subprocess.run(['qemu-img', 'rebase', '-u', '-f', 'qcow2', '-F', 'raw',
                    '-b', second, disk], check=True, capture_output=True)
    assert recorded_backing(disk) == second
    usage = scanner.scan([first, second])
    assert usage.users == {first: [], second: ['disk:' + disk]}
