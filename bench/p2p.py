"""Peer-to-peer benchmark: N hypervisors fetch one image, as a swarm and
as a herd (every host downloads from Glance), side by side in one run.

Run from the repository root, as root (network namespaces)::

    .venv/bin/python bench/p2p.py [--sizes-n 1,4,8] [--size-mib 64]
                                  [--glance-mbit 200] [--host-mbit 800]
                                  [--runs 1]

For each N it builds N hosts in network namespaces (``tests/netns.py``:
veth pairs on a bridge, ``tc`` token buckets on every link, Glance's
capped at ``--glance-mbit``, the hosts' at ``--host-mbit``), serves a
pseudo-random raw image of ``--size-mib`` MiB from the Glance stand-in in
its own namespace, and times, from the moment ``template-agent fetch ID``
is started on every host at once until the last one returns, with every
base verified (sha512 against Glance's hash, fsync, rename, by the agent
itself; the benchmark compares each base with the image again):

* herd: agents with ``[p2p] enabled = false``: N downloads from Glance;
* swarm: agents with ``[p2p] enabled = true`` (4 MiB segments).

Fresh agents, ``instances_path`` and page cache for every run; the order
alternates between runs. It prints per N the median wall time of each,
their ratio, and the bytes Glance served per image; the last line is
``p2p: N=4 time_ratio=X glance_bytes_per_image=Y`` (swarm / herd, and the
swarm's Glance bytes over the image size). It exits 0 whether targets are
met or not.
"""

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from agent import naming  # noqa: E402
from tests import netns  # noqa: E402
from tests.glance_standin import GlanceStandIn  # noqa: E402

MiB = 1024 * 1024


def drop_caches():
    os.sync()
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
    except OSError:
        pass


def one_run(root, net, glance, image_id, certs, enabled, want):
    before = glance.bytes_served.get(image_id, 0)
    with netns.PeerAgents(root, net, glance.url, certs,
                          enabled='true' if enabled else 'false',
                          stall_timeout=15) as agents:
        drop_caches()
        started = time.monotonic()
        results = agents.fetch_all(image_id)
        wall = time.monotonic() - started
        for ns, (code, out, _) in results.items():
            if code:
                raise SystemExit('%s: fetch failed: %s' % (ns, out))
        for env in agents.envs:
            path = os.path.join(env.base_dir, naming.base_filename(image_id))
            h = hashlib.sha512()
            with open(path, 'rb') as f:
                for chunk in iter(lambda: f.read(MiB), b''):
                    h.update(chunk)
            if h.hexdigest() != want:
                raise SystemExit('%s: the base differs' % env.namespace)
        per_host = sorted(r[2] for r in results.values())
    served = glance.bytes_served.get(image_id, 0) - before
    return wall, served, per_host


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes-n', default='1,4,8')
    parser.add_argument('--size-mib', type=int, default=64)
    parser.add_argument('--glance-mbit', type=int, default=200)
    parser.add_argument('--host-mbit', type=int, default=800)
    parser.add_argument('--runs', type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit('run as root: it makes network namespaces')
    sizes = [int(n) for n in args.sizes_n.split(',')]
    summary = {}
    with tempfile.TemporaryDirectory(prefix='bench-p2p-') as tmp:
        certs = netns.make_certificates(os.path.join(tmp, 'certs'))
        image = os.path.join(tmp, 'image.raw')
        with open(image, 'wb') as f:
            rnd = random.Random(1)
            for _ in range(args.size_mib):
                f.write(rnd.randbytes(MiB))
        size = os.path.getsize(image)
        print('image %d MiB; Glance link %d mbit/s, host links %d mbit/s; '
              'one download alone takes about %.1f s at the link rate'
              % (args.size_mib, args.glance_mbit, args.host_mbit,
                 size * 8 / (args.glance_mbit * 1e6)), flush=True)
        for n in sizes:
            with netns.Network(n, args.glance_mbit, args.host_mbit) as net:
                with netns.entered(net.glance_ns):
                    glance = GlanceStandIn(host=net.glance_ip)
                with glance:
                    image_id = glance.add(None, image)['id']
                    want = glance.images[image_id][0]['os_hash_value']
                    times = {'herd': [], 'swarm': []}
                    served = {'herd': [], 'swarm': []}
                    for run in range(args.runs):
                        order = ['herd', 'swarm'] if run % 2 == 0 \
                            else ['swarm', 'herd']
                        for mode in order:
                            root = os.path.join(tmp, 'n%d-%s-%d'
                                                % (n, mode, run))
                            wall, got, per_host = one_run(
                                root, net, glance, image_id, certs,
                                mode == 'swarm', want)
                            times[mode].append(wall)
                            served[mode].append(got / size)
                            print('  N=%d %-5s run %d: %.2f s (hosts: %s), '
                                  'Glance bytes per image %.3f' % (
                                      n, mode, run + 1, wall, ' '.join(
                                          '%.1f' % t for t in per_host),
                                      got / size), flush=True)
            herd = statistics.median(times['herd'])
            swarm = statistics.median(times['swarm'])
            summary[n] = (swarm / herd, max(served['swarm']))
            print('N=%d: herd %.2f s (Glance bytes per image %.2f), swarm '
                  '%.2f s (Glance bytes per image %.3f), time ratio %.2f'
                  % (n, herd, max(served['herd']), swarm,
                     max(served['swarm']), swarm / herd), flush=True)
    n = 4 if 4 in summary else sizes[-1]
    ratio, per_image = summary[n]
    print('p2p: N=%d time_ratio=%.2f glance_bytes_per_image=%.3f'
          % (n, ratio, per_image))


if __name__ == '__main__':
    main()
