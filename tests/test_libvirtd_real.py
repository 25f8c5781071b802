"""In-use detection against a real libvirtd + QEMU.

A base is prepared by each handler (``downloading``: a raw file;
``volume_linking``: a symlink to the read-only loop device of a template
volume), from an image whose boot sector prints a token on the serial port.
Two domains run on it, each from a qcow2 overlay backed by the base as nova
builds them: one overlay outside ``instances_path``, one at
``instances_path/<uuid>/disk``. Then:

* libvirt's live XML shows the backing chain, QEMU's block layer
  (``query-block``) has the base as backing image, each QEMU holds the base
  (file or device) open, and the guests print the token: QEMU read the boot
  sector of the base through the overlay;
* ``list`` shows the base in use by both domains (live XML), the instance
  disk and both QEMU processes (open descriptors, also without libvirt);
* ``prune --min-age 0`` removes nothing and ``remove`` exits 1;
* destroyed but still defined, the domains keep the base in use (inactive
  XML, no process);
* undefined and with the overlays gone, ``prune --min-age 0`` removes it,
  and a linked base's loop device is released.

Everything runs as nova's compute host would: QEMU as ``libvirt-qemu``
through libvirt's DAC relabelling, so the work directory is world-traversable.
"""

import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import MiB, AgentEnv
from tests.real_libvirtd import DOMAIN_PREFIX, domain_type, qemu_pid
from tests.real_libvirtd import real_libvirtd  # noqa: F401 (the fixture)

BOOT_TIMEOUT = 60


# -- helpers ------------------------------------------------------------------
def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


def boot_sector(message):
    """A 512-byte MBR whose code writes ``message`` to COM1 and halts."""
    code = bytes([
        0xFA,                   # cli
        0xFC,                   # cld
        0x31, 0xC0,             # xor ax, ax
        0x8E, 0xD8,             # mov ds, ax
        0xBE, 0x17, 0x7C,       # mov si, 0x7c17 (message)
        0xBA, 0xF8, 0x03,       # mov dx, 0x3f8 (COM1)
        0xAC,                   # loop: lodsb
        0x84, 0xC0,             # test al, al
        0x74, 0x03,             # jz done
        0xEE,                   # out dx, al
        0xEB, 0xF8,             # jmp loop
        0xF4,                   # done: hlt
        0xEB, 0xFD,             # jmp done
    ])
    assert len(code) == 0x17
    sector = code + message.encode() + b'\r\n\0'
    assert len(sector) <= 446
    # one bootable Linux partition from 1 MiB to the end of the 8 MiB disk,
    # as a real disk has (an MBR without partitions is refused as unsafe)
    partition = struct.pack('<B3BB3BII', 0x80, 0, 0, 0, 0x83, 0, 0, 0,
                            2048, 14336)
    return sector.ljust(446, b'\0') + partition + b'\0' * 48 + b'\x55\xaa'


def make_bootable_raw(path, message, seed):
    """8 MiB raw disk: the boot sector, 1 MiB of random data at 1 MiB."""
    rnd = random.Random(seed)
    with open(path, 'wb') as f:
        f.write(boot_sector(message))
        f.seek(MiB)
        f.write(rnd.randbytes(MiB))
        f.truncate(8 * MiB)
    return path


def make_overlay(base, path):
    """A qcow2 overlay recording ``base`` as its raw backing file, as nova
    makes an instance disk."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-F', 'raw', '-b',
                    base, path], check=True, capture_output=True)
    return path


def domain_xml(name, dtype, disk, serial, bus):
    target = 'vda' if bus == 'virtio' else 'hda'
    return """
<domain type='%(dtype)s'>
  <name>%(name)s</name>
  <uuid>%(uuid)s</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='%(disk)s'/>
      <target dev='%(target)s' bus='%(bus)s'/>
    </disk>
    <serial type='file'><source path='%(serial)s'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>""" % dict(dtype=dtype, name=name, uuid=uuid.uuid4(), disk=disk,
                    serial=serial, target=target, bus=bus)


def backing_chain_of(xml):
    """``[(type, format, path), ...]`` of the first disk's backingStore
    chain in a domain XML (top first)."""
    disk = ET.fromstring(xml).find('devices/disk')
    chain = []
    store = disk.find('backingStore')
    while store is not None and store.get('type'):
        source = store.find('source')
        fmt = store.find('format')
        chain.append((store.get('type'),
                      fmt.get('type') if fmt is not None else None,
                      source.get('file') or source.get('dev')))
        store = store.find('backingStore')
    return chain


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %d s waiting for %s'
                                 % (timeout, what))
        time.sleep(0.1)


def read_text(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def fd_targets(pid):
    """(kind, id) of every descriptor ``pid`` holds: ('blk', rdev) for block
    devices, ('file', dev, ino) for regular files."""
    keys = set()
    fd_dir = '/proc/%d/fd' % pid
    for fd in os.listdir(fd_dir):
        try:
            st = os.stat(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o060000:
            keys.add(('blk', st.st_rdev))
        elif (st.st_mode & 0o170000) == 0o100000:
            keys.add(('file', st.st_dev, st.st_ino))
    return keys


def exited(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] in 'ZX'
    except OSError:
        return True


def key_of(path):
    st = os.stat(path)
    if (st.st_mode & 0o170000) == 0o060000:
        return ('blk', st.st_rdev)
    return ('file', st.st_dev, st.st_ino)


def query_block_backing(dom):
    """Filenames of the backing images QEMU's block layer has under each
    disk (``query-block`` on the QEMU monitor)."""
    import libvirt_qemu
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(
        dom, json.dumps({'execute': 'query-block'}), 0))
    found = []
    for device in reply['return']:
        image = (device.get('inserted') or {}).get('image') or {}
        backing = image.get('backing-image')
        while backing:
            found.append((backing['filename'], backing.get('format')))
            backing = backing.get('backing-image')
    return found


def loops():
    """``{device: backing file}`` of every attached loop device
    (``losetup -a``)."""
    out = subprocess.run(['losetup', '-l', '-n', '-O', 'NAME,BACK-FILE'],
                         capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        name, _, back = line.strip().partition(' ')
        result[name] = back.strip()
    return result


def listing(env):
    return {row['filename']: row for row in env.cli_json('list')}


def process_users(users):
    return sorted(u for u in users if u.startswith('process:'))


# -- fixtures -----------------------------------------------------------------
@pytest.fixture
def workdir():
    """A world-traversable directory (QEMU runs as libvirt-qemu and must
    reach the overlays and bases); loop devices over its files are detached
    and the directory removed at the end, also when the test fails."""
    path = tempfile.mkdtemp(prefix='tia-real-libvirt-', dir='/var/tmp')
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for device, back in loops().items():
            if back.startswith(path + '/'):
                subprocess.run(['losetup', '-d', device], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def libvirt_conn(real_libvirtd):  # noqa: F811
    import libvirt
    conn = libvirt.open(real_libvirtd)
    try:
        yield conn
    finally:
        conn.close()


# -- the test -----------------------------------------------------------------
HANDLERS = {
    'downloading': 'downloading',
    'volume_linking': 'volume_linking,downloading',
}


@pytest.mark.parametrize('handler', sorted(HANDLERS))
def test_running_domains_protect_their_base_until_undefined(
        real_libvirtd, libvirt_conn, workdir, handler):  # noqa: F811
    import libvirt
    env = AgentEnv(os.path.join(workdir, 'agent'),
                   DEFAULT={'template_image_handler': HANDLERS[handler]},
                   libvirt={'connection_uri': real_libvirtd})
    os.chmod(env.root, 0o755)
    image_id = 'real-%s-%s' % (handler.replace('_', '-'),
                               uuid.uuid4().hex[:8])
    token = 'TIA-BOOT-OK %s' % image_id
    src = make_bootable_raw(os.path.join(workdir, 'src.raw'), token,
                            seed=len(handler))

    # -- a base prepared by the handler ------------------------------------
    env.cli('images', 'import', src, '--id', image_id)
    base = env.cli('fetch', image_id).stdout.strip().splitlines()[-1]
    assert base == os.path.join(env.base_dir, sha1(image_id))
    device = volume_file = None
    if handler == 'volume_linking':
        assert os.path.islink(base)
        device = os.path.realpath(base)
        assert re.match(r'^/dev/loop\d+$', device), device
        volume_file = loops()[device]
        assert volume_file.startswith(env.state + '/'), volume_file
        expected_type = 'block'
    else:
        assert os.path.isfile(base) and not os.path.islink(base)
        expected_type = 'file'
    row = listing(env)[sha1(image_id)]
    assert row['handler'] == handler and row['in_use'] is False

    dtype = domain_type(libvirt_conn)
    suffix = uuid.uuid4().hex[:6]
    instance_uuid = str(uuid.uuid4())
    overlays = {
        # overlay outside instances_path: only libvirt and QEMU know it
        DOMAIN_PREFIX + 'ext-' + suffix: (
            make_overlay(base, os.path.join(workdir, 'overlays',
                                            'ext.qcow2')), 'virtio'),
        # nova's instance disk: the instance-disk scan knows it too
        DOMAIN_PREFIX + 'inst-' + suffix: (
            make_overlay(base, os.path.join(env.instances, instance_uuid,
                                            'disk')), 'ide'),
    }
    inst_disk = os.path.join(env.instances, instance_uuid, 'disk')
    serials = {name: os.path.join(workdir, '%s.serial' % name)
               for name in overlays}
    domains = {}
    try:
        # -- define and start both domains ----------------------------------
        for name, (disk, bus) in overlays.items():
            dom = libvirt_conn.defineXML(
                domain_xml(name, dtype, disk, serials[name], bus))
            domains[name] = dom
            dom.create()
        for name, dom in domains.items():
            wait_for(lambda dom=dom: dom.state()[0] ==
                     libvirt.VIR_DOMAIN_RUNNING,
                     30, '%s running' % name)

        # libvirt's live XML has the chain overlay -> base
        for name, dom in domains.items():
            chain = backing_chain_of(dom.XMLDesc(0))
            assert chain and chain[0] == (expected_type, 'raw', base), \
                (name, chain)
            assert len(chain) == 1, chain

        # QEMU's block layer opened the base as the overlay's backing image
        # and each QEMU holds the base (file, or the loop device) open
        pids = {}
        for name, dom in domains.items():
            backing = query_block_backing(dom)
            assert [os.path.realpath(f) for f, _ in backing] == \
                [os.path.realpath(base)], backing
            assert backing[0][1] == 'raw'
            pids[name] = wait_for(lambda name=name: qemu_pid(name), 5,
                                  'pid file of %s' % name)
            assert key_of(base) in fd_targets(pids[name]), \
                'QEMU %d of %s does not hold %s open' % (pids[name], name,
                                                         base)

        # the guests boot from the base's boot sector, read through the
        # empty overlay: QEMU reads the disk through the chain
        for name in domains:
            wait_for(lambda name=name: token in read_text(serials[name]),
                     BOOT_TIMEOUT,
                     'the boot token on the serial port of %s (got %r)'
                     % (name, read_text(serials[name])[-200:]))
        for disk, _ in overlays.values():
            # nothing was written: the sector came from the base
            info = json.loads(subprocess.run(
                ['qemu-img', 'map', '-U', '--output=json', disk],
                check=True, capture_output=True, text=True).stdout)
            assert not any(e['data'] and e['depth'] == 0 for e in info), \
                info

        # -- in use: live XML, instance disk, QEMU's open descriptors -------
        names = sorted(domains)
        row = listing(env)[sha1(image_id)]
        assert row['in_use'] is True
        users = row['users']
        for name in names:
            assert 'domain:%s' % name in users, users
        assert 'disk:%s' % inst_disk in users, users
        procs = process_users(users)
        assert len(procs) == 2, users
        for name in names:
            assert any(re.match(r'^process:%d\(qemu-system-x86' % pids[name],
                                p) for p in procs), (pids[name], procs)

        # the descriptors alone protect it (libvirt not asked)
        env.configure(libvirt={'connection_uri': ''})
        row = listing(env)[sha1(image_id)]
        assert sorted(row['users']) == sorted(['disk:%s' % inst_disk]
                                              + procs), row['users']
        env.configure(libvirt={'connection_uri': real_libvirtd})

        # -- prune and remove refuse while the domains run -------------------
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert report['removed'] == [] and report['failed'] == [], report
        assert report['warnings'] == [], report
        assert [e['filename'] for e in report['in_use']] == [sha1(image_id)]
        proc = env.cli('remove', image_id, check=False)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert 'in use' in proc.stderr, proc.stderr
        assert os.path.lexists(base) and os.path.exists(base)
        if device:
            assert loops().get(device) == volume_file

        # -- destroyed but defined: the inactive XML still protects it ------
        for name, dom in domains.items():
            dom.destroy()
            wait_for(lambda name=name: exited(pids[name]), 10,
                     'QEMU of %s to exit' % name)
        row = listing(env)[sha1(image_id)]
        assert process_users(row['users']) == [], row['users']
        for name in names:
            assert 'domain:%s' % name in row['users'], row['users']
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert report['removed'] == [], report
        assert os.path.exists(base)

        # -- undefined, overlays deleted: prune removes it -------------------
        for name, dom in list(domains.items()):
            dom.undefine()
            del domains[name]
        os.unlink(overlays[names[0]][0])
        shutil.rmtree(os.path.join(env.instances, instance_uuid))
        row = listing(env)[sha1(image_id)]
        assert row['in_use'] is False and row['users'] == [], row
        report = env.cli_json('prune', '--min-age', '0', '--yes')
        assert [e['filename'] for e in report['removed']] == \
            [sha1(image_id)], report
        assert report['in_use'] == [] and report['failed'] == [], report
        assert not os.path.lexists(base)
        assert sha1(image_id) not in listing(env)
        if device:
            # the template volume's loop device is detached (the device
            # name itself may already serve someone else's new attachment)
            attached = subprocess.run(['losetup', '-a'], capture_output=True,
                                      text=True, check=True).stdout
            assert '(%s)' % volume_file not in attached, attached
            assert not any(b.startswith(env.state + '/')
                           for b in loops().values())
    finally:
        for dom in domains.values():
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
