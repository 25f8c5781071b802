"""Cinder benchmark: N hosts get a base for the same image, either each
downloading it from Glance, or through one shared Cinder template.

Run from the repository root, as root::

    .venv/bin/python bench/cinder.py [--size-mib 1024] [--hosts 1,4,8]

It starts a real Glance (``tests/real_glance.py``) and a real Cinder 29
with the RBD driver on a one-node memstore Ceph, RabbitMQ and MariaDB
(``tests/real_cinder.py``), all on loopback and under one temporary
directory, stopped by PID and removed at the end. Glance is reached through
a counting TCP proxy, so the bytes every host reads from Glance are
measured, not estimated; the proxy also caps what Glance sends, all hosts
together, at ``--glance-rate`` MB/s (default 100, a Glance behind a
gigabit link: on loopback, N downloads would only measure this machine's
two cores). The image is raw, ``--size-mib`` MiB of
pseudo-random 1 MiB blocks of which about a quarter are zeros.

For each N, N agents act as N hypervisors (own ``state_path``,
``instances_path`` and ``[DEFAULT] host``), and all of them run
``template-agent fetch ID`` at the same moment (CLI processes):

* ``download``: ``template_image_handler = downloading``: every host
  streams the image from Glance, verifies, writes its own ``_base`` file;
* ``cinder``: ``volume_linking,downloading`` with ``[volume_linking]
  backend = cinder``, on a new image (so that the first fetch is a miss):
  one host downloads it into the template volume, the others wait for it,
  and every host attaches it read-only (a ``qemu-storage-daemon`` export
  and a loop device on this kernel) and links it.

It prints the wall time of both per N, their ratio, the Glance bytes per
host and per image; the last line is exactly ``cinder: N=<largest N>
time_ratio=X glance_bytes_per_image=Y`` (Y: bytes read from Glance in the
cinder run / image size). Targets at N = 8: time_ratio <= 0.2,
glance_bytes_per_image <= 1.05. It exits 0 whether they are met or not.
"""

import argparse
import concurrent.futures
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.real_cinder import (RealCinder, end_exports,  # noqa: E402
                               ensure_installed)
from tests.real_glance import RealGlance  # noqa: E402
from tests.real_glance import ensure_installed as glance_installed  # noqa
from tests.netns import Relay  # noqa: E402

MiB = 1024 * 1024


def make_image(path, size_mib, zero_fraction=0.26):
    rnd = random.Random(7)
    with open(path, 'wb') as f:
        for _ in range(size_mib):
            if rnd.random() < zero_fraction:
                f.seek(MiB, 1)
            else:
                f.write(rnd.randbytes(MiB))
        f.truncate(size_mib * MiB)


def write_conf(path, sections):
    with open(path, 'w') as f:
        for name, values in sections.items():
            f.write('[%s]\n' % name)
            for k, v in values.items():
                f.write('%s = %s\n' % (k, v))


def host_conf(root, name, glance_url, cinder=None):
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, 'instances'), exist_ok=True)
    sections = {
        'DEFAULT': {'instances_path': os.path.join(d, 'instances'),
                    'state_path': os.path.join(d, 'state'), 'host': name,
                    'template_image_handler': 'downloading'},
        'image_source': {'driver': 'glance'},
        'glance': {'api_servers': glance_url},
        'libvirt': {'connection_uri': ''},
        'api': {'socket_path': os.path.join(d, 'api.sock')},
        'volume_linking': {'device_links_path': os.path.join(d, 'devices')},
    }
    if cinder is not None:
        opts = cinder.agent_options()
        opts['exports_path'] = os.path.join(d, 'exports')
        sections['DEFAULT']['template_image_handler'] = \
            'volume_linking,downloading'
        sections['volume_linking']['backend'] = 'cinder'
        sections['cinder'] = opts
    conf = os.path.join(d, 'agent.conf')
    write_conf(conf, sections)
    return conf


def cli(conf, *args, check=True):
    proc = subprocess.run(
        [sys.executable, '-m', 'agent.cli', '--config-file', conf] +
        list(args), capture_output=True, text=True, timeout=3600,
        env=dict(os.environ, PYTHONPATH=REPO))
    if check and proc.returncode:
        raise RuntimeError('template-agent %s failed: %s'
                           % (' '.join(args), proc.stderr[-2000:]))
    return proc


def fetch_all(confs, image_id):
    """``fetch`` on every host at once; wall time and the handlers."""
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(confs)) as pool:
        procs = list(pool.map(lambda c: cli(c, 'fetch', image_id), confs))
    elapsed = time.monotonic() - t0
    linked = 0
    for proc in procs:
        if os.path.islink(proc.stdout.strip().splitlines()[-1]):
            linked += 1
        else:  # why the next handler served
            for line in proc.stderr.splitlines():
                if 'trying the next' in line or 'cannot serve' in line:
                    print('  fell through: %s' % line[-300:], flush=True)
    return elapsed, linked


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mib', type=int, default=1024)
    parser.add_argument('--hosts', default='1,4,8')
    parser.add_argument('--glance-rate', type=float, default=100,
                        help="Glance's uplink in MB/s, shared by every "
                        "host (0: uncapped, loopback speed)")
    parser.add_argument('--tmpdir', default=None)
    args = parser.parse_args()
    counts = [int(n) for n in args.hosts.split(',')]
    root = tempfile.mkdtemp(prefix='bench-cinder-', dir=args.tmpdir)
    glance = cinder = proxy = None
    rows = []
    try:
        glance = RealGlance(venv=glance_installed(),
                            workdir=os.path.join(root, 'glance'))
        glance.start()
        proxy = Relay(None, '127.0.0.1', ('127.0.0.1', glance.port),
                      rate=args.glance_rate * 1e6 or None).start()
        cinder = RealCinder(venv=ensure_installed(),
                            workdir=os.path.join(root, 'cinder'),
                            glance_url=glance.url,
                            # 2 images' room; not 4 GiB: this memstore's
                            # usage count wrapped around there in a run
                            memstore_bytes=(2 * args.size_mib + 1024) * MiB)
        t0 = time.monotonic()
        cinder.start()
        print('stack up in %.0f s (Ceph, RabbitMQ, MariaDB, Cinder)'
              % (time.monotonic() - t0), flush=True)
        image_path = os.path.join(root, 'image.raw')
        make_image(image_path, args.size_mib)
        size = os.path.getsize(image_path)
        download_image = glance.create_image('bench-download', image_path,
                                             visibility='public')['id']
        for n in counts:
            # each host downloads
            confs = [host_conf(root, 'dl%d-%d' % (n, i), proxy.url)
                     for i in range(n)]
            before = proxy.sent
            dl_time, _ = fetch_all(confs, download_image)
            dl_bytes = proxy.sent - before
            for conf in confs:
                cli(conf, 'remove', download_image, check=False)
            for i in range(n):
                shutil.rmtree(os.path.join(root, 'dl%d-%d' % (n, i)), True)
            # one shared template (a miss: a new image)
            image_id = glance.create_image('bench-cinder-%d' % n, image_path,
                                           visibility='public')['id']
            confs = [host_conf(root, 'cv%d-%d' % (n, i), proxy.url, cinder)
                     for i in range(n)]
            before = proxy.sent
            cv_time, linked = fetch_all(confs, image_id)
            cv_bytes = proxy.sent - before
            for conf in confs:
                cli(conf, 'remove', image_id, check=False)
            cli(confs[0], 'cache', 'evict', image_id, check=False)
            rows.append((n, dl_time, cv_time, dl_bytes, cv_bytes, linked))
            print('N=%d: download %.1f s (%.2f images from Glance), cinder '
                  '%.1f s (%.2f images from Glance, %d/%d hosts linked)'
                  % (n, dl_time, dl_bytes / size, cv_time, cv_bytes / size,
                     linked, n), flush=True)
    finally:
        end_exports(glob.glob(os.path.join(root, '*', 'exports')))
        if cinder is not None:
            cinder.stop()
        if proxy is not None:
            proxy.close()
        if glance is not None:
            glance.stop()
        shutil.rmtree(root, ignore_errors=True)
    print()
    print('Image: raw %d MiB. Wall time of N hosts fetching at once; Glance '
          'bytes counted by a proxy, Glance capped at %s.' % (
              args.size_mib, '%g MB/s' % args.glance_rate
              if args.glance_rate else 'nothing (loopback)'))
    print('%4s %12s %12s %10s %18s %18s' % (
        'N', 'download s', 'cinder s', 'time ratio',
        'glance B/host dl', 'glance B/host cv'))
    for n, dl_time, cv_time, dl_bytes, cv_bytes, _ in rows:
        print('%4d %12.1f %12.1f %10.2f %18.2f %18.2f' % (
            n, dl_time, cv_time, cv_time / dl_time,
            dl_bytes / size / n, cv_bytes / size / n))
    n, dl_time, cv_time, dl_bytes, cv_bytes, _ = rows[-1]
    print('Targets at N=8: time_ratio <= 0.2, glance_bytes_per_image <= 1.05')
    print('cinder: N=%d time_ratio=%.2f glance_bytes_per_image=%.2f'
          % (n, cv_time / dl_time, cv_bytes / size))


if __name__ == '__main__':
    main()
