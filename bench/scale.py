"""How `list` and a prune pass scale with bases and instances.

Builds a node in a temporary directory: N sparse bases in ``_base`` (as the
agent's index knows them after ``init``), M instances, each a qcow2 overlay
``instances/<uuid>/disk`` on one of the bases and a libvirt domain (libvirt's
test driver, a node XML file) whose disk is that overlay. Then times, each in
a fresh process (cold: imports and all), ``template-agent --direct list``
and ``template-agent --direct prune --yes`` (a real pass: usage, touches,
age checks; the bases are too young to be removed, so every pass does the
same work), and prints the time per base and per instance so linear growth
shows.

    sudo .venv/bin/python bench/scale.py                 # 1k/100 and 10k/1k
    .venv/bin/python bench/scale.py --scenes 2000/200

Targets at 10,000 bases and 1,000 instances: list <= 1 s, prune <= 5 s.
Exit status 0 whether the targets are met or not.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qcow2_overlay(path, backing, virtual_size):
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw',
                    '-b', backing, '-u', path, str(virtual_size)],
                   check=True)


def build(root, bases, instances):
    base_dir = os.path.join(root, 'instances', '_base')
    os.makedirs(base_dir)
    names = []
    for n in range(bases):
        name = hashlib.sha1(b'image-%d' % n).hexdigest()
        with open(os.path.join(base_dir, name), 'wb') as f:
            f.truncate(1024 ** 3)
        names.append(name)
    domains = []
    template = os.path.join(root, 'template.qcow2')
    for n in range(instances):
        backing = os.path.join(base_dir, names[n % len(names)])
        disk_dir = os.path.join(root, 'instances', str(uuid.UUID(int=n)))
        os.makedirs(disk_dir)
        disk = os.path.join(disk_dir, 'disk')
        if n == 0:
            qcow2_overlay(template, backing, 1024 ** 3)
            with open(template, 'rb') as f:
                header = bytearray(f.read())
            offset = int.from_bytes(header[8:16], 'big')
        # a thousand qemu-img processes would dominate the set-up: every
        # base path has the same length, so the first overlay's bytes with
        # another backing name are what qemu-img would have written
        name = backing.encode()
        header[offset:offset + len(name)] = name
        with open(disk, 'wb') as f:
            f.write(header)
        domains.append(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/"
            "domain/test/1.0'><name>instance-%08x</name><memory>65536"
            "</memory><os><type>hvm</type></os><devices><disk type='file' "
            "device='disk'><driver name='qemu' type='qcow2'/><source "
            "file='%s'/><target dev='vda'/></disk></devices>"
            "<test:runstate>1</test:runstate></domain>" % (n, disk))
    node = os.path.join(root, 'node.xml')
    with open(node, 'w') as f:
        f.write('<node>\n%s\n</node>\n' % '\n'.join(domains))
    conf = os.path.join(root, 'agent.conf')
    with open(conf, 'w') as f:
        f.write('[DEFAULT]\ninstances_path = %s\nstate_path = %s\n'
                '[libvirt]\nconnection_uri = test://%s\n'
                '[api]\nsocket_path = %s\n' % (
                    os.path.join(root, 'instances'),
                    os.path.join(root, 'state'), node,
                    os.path.join(root, 'agent.sock')))
    return conf


def timed(conf, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    started = time.monotonic()
    subprocess.run([sys.executable, '-m', 'agent.cli', '--direct',
                    '--config-file', conf] + list(args), check=True,
                   stdout=subprocess.DEVNULL, env=env)
    return time.monotonic() - started


def scene(tmpdir, bases, instances, runs):
    root = tempfile.mkdtemp(prefix='scale-', dir=tmpdir)
    try:
        started = time.monotonic()
        conf = build(root, bases, instances)
        built = time.monotonic() - started
        timed(conf, 'init')  # the index learns the bases, as on a host
        lists = [timed(conf, 'list', '--format', 'json')
                 for _ in range(runs)]
        prunes = [timed(conf, 'prune', '--yes') for _ in range(runs)]
        return built, statistics.median(lists), statistics.median(prunes)
    finally:
        shutil.rmtree(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scenes', nargs='+',
                        default=['1000/100', '10000/1000'],
                        help='BASES/INSTANCES pairs')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--tmpdir', default=None)
    args = parser.parse_args()
    rows = []
    for spec in args.scenes:
        bases, instances = (int(x) for x in spec.split('/'))
        built, list_s, prune_s = scene(args.tmpdir, bases, instances,
                                       args.runs)
        rows.append((bases, instances, list_s, prune_s))
        print('scene %d bases / %d instances (built in %.1f s): list %.2f s '
              '(%.0f us/base), prune pass %.2f s (%.0f us/base, %.2f ms/'
              'instance)' % (bases, instances, built, list_s,
                             list_s / bases * 1e6, prune_s,
                             prune_s / bases * 1e6,
                             prune_s / instances * 1e3))
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        growth = big[0] / small[0]
        print('growth x%.0f in size: list x%.1f, prune x%.1f (linear = '
              'x%.0f)' % (growth, big[2] / small[2], big[3] / small[3],
                          growth))
    big = rows[-1]
    print('scale: bases=%d instances=%d list_s=%.2f (target 1) '
          'prune_s=%.2f (target 5)' % big)


if __name__ == '__main__':
    main()
