"""Start-up time and memory of the CLI, beside glanceclient and a bare
Python.

Run from the repository root, as root (the agent's CLI works as the owner of
instances_path; here that is root)::

    .venv/bin/python bench/startup.py [--runs 15] [--size-mib 1024]

Start-up (warm page cache, median of ``--runs``):

  * ``python -c pass``                      (the floor: the interpreter)
  * ``glance --help``                       (python-glanceclient's CLI)
  * ``template-agent --help``
  * ``template-agent --direct list``        (an empty node: no bases)

Peak RSS (``wait4`` rusage of the child) while getting a ``--size-mib`` MiB
raw image from a real Glance on loopback (``tests/real_glance.py``: its own
venv from ``scripts/install-glance.sh``, with python-glanceclient):

  * ``curl -o``                             (no Python at all)
  * ``glance image-download --file``        (glanceclient: md5 check)
  * ``template-agent --direct fetch``       (sha512, inspection, sparse
    write, fsync, publish)

Targets: ``--direct list`` starts in <= 0.15 s; the fetch peaks at
<= 48 MiB. It exits 0 whether they are met or not.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import download as dl  # noqa: E402
from tests.real_glance import RealGlance, ensure_installed  # noqa: E402

TARGET_LIST_S = 0.15
TARGET_FETCH_MIB = 48


def median_run(cmd, runs, rss=False):
    times, peaks = [], []
    for _ in range(runs):
        elapsed, peak = dl.run(cmd, rss=rss)
        times.append(elapsed)
        peaks.append(peak or 0)
    return statistics.median(times), max(peaks) / 1024.0


def write_config(root, glance_url):
    conf = os.path.join(root, 'agent.conf')
    with open(conf, 'w') as f:
        f.write('[DEFAULT]\ninstances_path = %s\nstate_path = %s\n'
                '[image_source]\ndriver = glance\n'
                '[glance]\napi_servers = %s\n'
                '[libvirt]\nconnection_uri =\n'
                '[api]\nsocket_path = %s\n'
                % (os.path.join(root, 'instances'),
                   os.path.join(root, 'state'), glance_url,
                   os.path.join(root, 'agent.sock')))
    os.makedirs(os.path.join(root, 'instances'))
    return conf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=15)
    parser.add_argument('--fetch-runs', type=int, default=3)
    parser.add_argument('--size-mib', type=int, default=1024)
    parser.add_argument('--tmpdir', default=None)
    args = parser.parse_args(argv)
    cli = [os.path.join(os.path.dirname(sys.executable), 'template-agent')]
    print('checking the Glance install (scripts/install-glance.sh) ...',
          flush=True)
    venv = ensure_installed()
    glance = os.path.join(venv, 'bin', 'glance')
    workdir = tempfile.mkdtemp(prefix='tia-bench-startup-', dir=args.tmpdir)
    server = None
    try:
        image = os.path.join(workdir, 'image.raw')
        dl.make_raw(image, args.size_mib, 0.26)
        server = RealGlance(venv=venv,
                            workdir=os.path.join(workdir, 'glance'))
        os.makedirs(server.workdir)
        server.start()
        image_id = server.create_image('startup', image)['id']
        root = os.path.join(workdir, 'node')
        os.makedirs(root)
        conf = write_config(root, server.url)
        agent = cli + ['--config-file', conf, '--direct']

        start = {}
        start['python -c pass'] = median_run(
            [sys.executable, '-c', 'pass'], args.runs)
        start['glance --help'] = median_run([glance, '--help'], args.runs)
        start['template-agent --help'] = median_run(cli + ['--help'],
                                                    args.runs)
        dl.run(agent + ['list'])  # state directories made once
        start['template-agent --direct list'] = median_run(
            agent + ['list'], args.runs, rss=True)

        fetch = {}
        out = os.path.join(workdir, 'out')
        url = '%s/v2/images/%s/file' % (server.url, image_id)
        fetch['curl -o'] = _repeat(args.fetch_runs, ['curl', '-sf', '-o',
                                                     out, url], out)
        fetch['glance image-download'] = _repeat(
            args.fetch_runs,
            [glance, '--os-image-url', server.url, '--os-auth-token',
             'no-auth', 'image-download', '--file', out, image_id], out)
        peaks = []
        for _ in range(args.fetch_runs):
            _, peak = dl.run(agent + ['fetch', image_id], rss=True)
            peaks.append(peak)
            dl.run(agent + ['remove', image_id])
        fetch['template-agent --direct fetch'] = (max(peaks) / 1024.0,)
        report(args, start, fetch)
        return 0
    finally:
        if server is not None:
            server.cleanup()  # stops gunicorn by its process group
        shutil.rmtree(workdir, ignore_errors=True)


def _repeat(runs, cmd, out):
    peaks = []
    for _ in range(runs):
        _, peak = dl.run(cmd, rss=True)
        peaks.append(peak)
        os.unlink(out)
    return (max(peaks) / 1024.0,)


def report(args, start, fetch):
    floor = start['python -c pass'][0]
    print('Start-up, warm cache, median of %d runs:' % args.runs)
    for name, (seconds, _) in start.items():
        print('  %-34s %6.3f s   %5.1f x python -c pass'
              % (name, seconds, seconds / floor))
    listing = start['template-agent --direct list'][0]
    print('  %-34s %6.2f' % ('--direct list / glance --help',
                             listing / start['glance --help'][0]))
    print()
    print('Peak RSS getting a %d MiB raw image (max of %d runs):'
          % (args.size_mib, args.fetch_runs))
    ours = fetch['template-agent --direct fetch'][0]
    for name, (mib,) in fetch.items():
        print('  %-34s %6.1f MiB   agent / this %.2f'
              % (name, mib, ours / mib))
    print()
    listing = start['template-agent --direct list'][0]
    print('Targets:')
    print('  --direct list start-up <= %.2f s: %.3f s  %s'
          % (TARGET_LIST_S, listing,
             'PASS' if listing <= TARGET_LIST_S else 'MISS'))
    print('  fetch peak RSS <= %d MiB: %.1f MiB  %s'
          % (TARGET_FETCH_MIB, ours,
             'PASS' if ours <= TARGET_FETCH_MIB else 'MISS'))


if __name__ == '__main__':
    sys.exit(main())
