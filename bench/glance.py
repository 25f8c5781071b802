"""Glance benchmark: the agent's fetch against glanceclient, curl and nova's
way, all reading from a real Glance.

Run from the repository root, as root (to drop the page cache)::

    .venv/bin/python bench/glance.py [--size-mib 1024] [--runs 5]

It installs Glance if needed (``scripts/install-glance.sh``: its own venv,
with python-glanceclient), starts it under gunicorn on 127.0.0.1 (sqlite,
file store, no auth; ``tests/real_glance.py``), builds a raw image of
``--size-mib`` MiB (pseudo-random 1 MiB blocks, about a quarter of them
zeros, as a typical cloud image) and a qcow2 of it, uploads
both through Glance's v2 API (Glance computes their md5 and sha512), and
times, side by side in one run, with the page cache dropped before every
timed operation and the order reversed every other round:

raw image
  * ``curl -s -o OUT .../file``                       (baseline a, no checks)
  * ``curl`` then ``sync OUT``                        (durable)
  * ``glance image-download --file OUT ID``           (python-glanceclient;
    verifies the hash Glance gives, no fsync), and the same then ``sync``
  * the agent in process: ``TemplateAgent.fetch_image(ID)`` with a fresh
    ``instances_path`` per run                    (sha512, format
    inspection, fsync, atomic rename); compared with the bound of any
    verifying, durable download: max(curl + sync, sha512 alone in memory)
  * the agent CLI: ``template-agent fetch ID``        (the same, plus start-up)

qcow2 image
  * ``curl`` of the qcow2                             (baseline q)
  * ``glance image-download`` of the qcow2
  * nova's way: glanceclient download, ``qemu-img info``,
    ``qemu-img convert -t none -O raw``, rename, ``sync``
  * curl + the same info, convert, rename, sync
  * the agent, in process and through the CLI (converts to raw)

The operations themselves, the helpers (page-cache drop, ``run`` with peak
RSS from ``/usr/bin/time -v``, output checks, the phase timer) come from
``bench/download.py``. Glance is stopped by its process group and the
temporary directory removed at the end, whatever happens.

It prints medians, ratios and PASS/MISS per target, and exits 0 whether the
targets are met or not: it is a benchmark, not a test.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import download as dl  # noqa: E402
from tests.real_glance import (GlanceError, RealGlance,  # noqa: E402
                               ensure_installed)

MiB = dl.MiB

#: the targets this benchmark was written for
TARGETS = {
    'raw_vs_curl': 1.1,          # agent raw <= 1.1 x curl
    'qcow2_vs_nova': 1.0,        # agent qcow2 < glanceclient + convert
}
#: the bound any verifying, durable download has: it cannot beat getting
#: the bytes durably (curl + sync) nor hashing them (sha512 alone, in
#: memory); the agent's in-process raw fetch should be within this factor
#: of the larger of the two
BOUND_TARGET = 1.15
#: the stricter bar: a verifying, durable download near the bound
STRICT_TARGETS = {
    'raw_vs_curl_sync': 1.1,     # <= 1.1 x (curl + sync)
    'qcow2_vs_nova': 0.4,        # <= 0.4 x nova's way
    'peak_rss_mib': 64.0,
}
#: peer ratios measured on a quiet machine against real Glance 33, for
#: comparison
QUIET_PEERS = {
    '(curl+sync)/curl raw': 1.42,
    'glanceclient/curl raw': 2.81,
    "nova's way/curl qcow2": 4.24,
    'curl+convert/curl qcow2': 1.74,
}


class GlanceBench(dl.Bench):
    """``bench/download.py``'s operations, plus glanceclient ones."""

    def __init__(self, *args, glance_bin, **kwargs):
        super().__init__(*args, **kwargs)
        self.glance_bin = glance_bin

    def _image_download(self, kind, out):
        return dl.run([self.glance_bin, '--os-image-url', self.server.url,
                       '--os-auth-token', 'no-auth', 'image-download',
                       '--file', out, self.images[kind]['id']], rss=True)

    def glanceclient(self, kind, durable, check):
        out = self.fresh('glanceclient')
        try:
            dl.drop_caches(self.drop)
            t0 = time.perf_counter()
            _, rss = self._image_download(kind, out)
            if durable:
                dl.run(['sync', out])
            elapsed = time.perf_counter() - t0
            if check and kind == 'raw':
                self.check_output(out, 'glanceclient', True)
            elif os.path.getsize(out) != os.path.getsize(
                    self.images[kind]['path']):
                raise RuntimeError('glanceclient: %s has the wrong size'
                                   % out)
            return elapsed, rss
        finally:
            dl.rm_rf(out)

    def nova_way(self, check):
        """nova's ``fetch_to_raw``: glanceclient download to ``.part``,
        ``qemu-img info``, ``convert -t none -O raw`` to ``.converted``,
        delete the part, rename, sync."""
        root = self.fresh('nova')
        os.makedirs(root)
        part = os.path.join(root, 'base.part')
        converted = os.path.join(root, 'base.converted')
        final = os.path.join(root, 'base')
        try:
            dl.drop_caches(self.drop)
            t0 = time.perf_counter()
            self._image_download('qcow2', part)
            dl.run(['qemu-img', 'info', '--output=json', '-f', 'qcow2',
                    part])
            dl.run(['qemu-img', 'convert', '-t', 'none', '-O', 'raw', '-f',
                    'qcow2', part, converted])
            os.unlink(part)
            os.rename(converted, final)
            dl.run(['sync', final])
            elapsed = time.perf_counter() - t0
            self.check_output(final, "nova's way", check)
            return elapsed, None
        finally:
            dl.rm_rf(root)


_SHARED = {op[0]: op for op in dl.OPERATIONS}
OPERATIONS = [
    # key, label, checks, callable(bench, check); the curl, two-step and
    # agent rows are bench/download.py's
    _SHARED['curl_raw'], _SHARED['curl_sync_raw'],
    ('gc_raw', 'raw: glance image-download', 'md5/sha512, no fsync',
     lambda b, c: b.glanceclient('raw', False, c)),
    ('gc_sync_raw', 'raw: glance image-download + sync', 'md5/sha512',
     lambda b, c: b.glanceclient('raw', True, c)),
    _SHARED['agent_raw'], _SHARED['cli_raw'], _SHARED['curl_q'],
    ('gc_q', 'qcow2: glance image-download', 'md5/sha512, no fsync',
     lambda b, c: b.glanceclient('qcow2', False, c)),
    ('nova_q', "qcow2: nova's way (glanceclient+convert)",
     'hash+qemu-img info', lambda b, c: b.nova_way(c)),
    _SHARED['two_step_q'], _SHARED['agent_q'], _SHARED['cli_q'],
]


def report(results, rss, image_info, args, drop, phases, glance_version,
           hash_mib_s):
    med = {k: statistics.median(v) for k, v in results.items() if v}
    a, q = med['curl_raw'], med['curl_q']
    print()
    print('Image: raw %d MiB (%d MiB of it zeros), qcow2 %.0f MiB, same '
          'virtual size; real Glance (%s) under gunicorn on loopback '
          '(sqlite, file store, no auth; 1 worker, 4 threads)'
          % (image_info['raw_mib'], image_info['zero_mib'],
             image_info['qcow2_mib'], glance_version))
    print('Runs: %d per operation, order reversed every other round; '
          'page cache %s' % (args.runs, 'dropped before every run '
                             '(sync; echo 3 > %s)' % dl.DROP_CACHES if drop
                             else 'NOT dropped (%s is not writable; only '
                             'sync before every run)' % dl.DROP_CACHES))
    print()
    head = '%-42s %-28s %8s %8s %8s %10s %9s'
    print(head % ('operation', 'checks', 'median s', 'min s', 'max s',
                  'x baseline', 'peak RSS'))
    print('-' * 119)
    for key, label, checks, _ in OPERATIONS:
        if key not in med:
            continue
        peak = max(rss[key]) if rss.get(key) else None
        base = a if key.endswith('_raw') else q
        print(head % (label, checks, '%.3f' % med[key],
                      '%.3f' % min(results[key]), '%.3f' % max(results[key]),
                      dl.fmt_ratio(med[key] / base),
                      '%.1f MiB' % (peak / 1024) if peak else '-'))
    print()
    print('Checks: the agent verifies the sha512 multihash Glance gives while '
          'streaming, inspects the format (safety checks), converts qcow2 to '
          'raw with qemu-img, fsyncs the base and its directory and renames '
          'atomically. glanceclient verifies the hash but does not fsync; '
          'curl checks nothing; nova\'s way and curl+convert run qemu-img '
          'info and sync the result.')

    ratios = {
        'agent/curl raw': med['agent_raw'] / a,
        'agent/(curl+sync) raw': med['agent_raw'] / med['curl_sync_raw'],
        'agent/glanceclient raw': med['agent_raw'] / med['gc_raw'],
        'agent/(glanceclient+sync) raw':
            med['agent_raw'] / med['gc_sync_raw'],
        'CLI fetch/curl raw': med['cli_raw'] / a,
        "agent/nova's way qcow2": med['agent_q'] / med['nova_q'],
        'agent/curl+convert qcow2': med['agent_q'] / med['two_step_q'],
        'agent/curl qcow2': med['agent_q'] / q,
        "CLI fetch/nova's way qcow2": med['cli_q'] / med['nova_q'],
    }
    peers = {
        '(curl+sync)/curl raw': med['curl_sync_raw'] / a,
        'glanceclient/curl raw': med['gc_raw'] / a,
        "nova's way/curl qcow2": med['nova_q'] / q,
        'curl+convert/curl qcow2': med['two_step_q'] / q,
    }
    print()
    print('Ratios (medians):')
    for name, value in ratios.items():
        print('  %-32s %.2f' % (name, value))
    print('  CLI overhead in fetch            %+.3f s raw, %+.3f s qcow2 '
          '(CLI fetch - in-process fetch)'
          % (med['cli_raw'] - med['agent_raw'], med['cli_q'] - med['agent_q']))
    print()
    print('Peers (this run vs a quiet machine):')
    for name, value in peers.items():
        print('  %-32s %.2f   (quiet machine: %.2f)'
              % (name, value, QUIET_PEERS[name]))

    print()
    print('Where the in-process agent fetch spends its time (medians, s):')
    for kind, key in (('raw', 'agent_raw'), ('qcow2', 'agent_q')):
        runs = phases.runs.get(kind) if phases else None
        if not runs:
            continue
        names = [p for p, _, _ in dl.PhaseTimer.PHASES if p in runs[0]] + \
            ['other (lock, index, inspection check, ...)']
        print('  %s (total %.3f):' % (kind, med[key]))
        for name in names:
            print('    %-44s %7.3f' % (name, statistics.median(
                r.get(name, 0.0) for r in runs)))

    print('  (download() returns before its sha512 thread is done: "other" '
          'is mostly the wait for the hash)')
    hashed = {'raw': image_info['raw_mib'], 'qcow2': image_info['qcow2_mib']}
    print('  sha512 on this CPU: %.0f MiB/s (in memory, one thread, measured '
          'after the runs), so hashing alone takes %.2f s for the raw image '
          '(%.2f x curl) and %.2f s for the qcow2 (%.2f x q): a bound on how '
          'close a verifying download can get to curl' % (
              hash_mib_s, hashed['raw'] / hash_mib_s,
              hashed['raw'] / hash_mib_s / a, hashed['qcow2'] / hash_mib_s,
              hashed['qcow2'] / hash_mib_s / q))

    sha512_raw = hashed['raw'] / hash_mib_s
    bound = max(med['curl_sync_raw'], sha512_raw)
    print()
    print('The bound of a verifying, durable download (raw): max(curl + sync '
          '%.3f s, sha512 alone %.3f s) = %.3f s' % (
              med['curl_sync_raw'], sha512_raw, bound))
    print('  in-process agent fetch / bound          %.2f   (target <= %.2f)'
          '  %s' % (med['agent_raw'] / bound, BOUND_TARGET,
                    dl.verdict(med['agent_raw'] / bound, BOUND_TARGET)))
    print('  CLI fetch / bound                       %.2f   (start-up '
          'included, for reference)' % (med['cli_raw'] / bound))

    cli_rss = [v for k in ('cli_raw', 'cli_q') for v in rss.get(k, [])]
    print()
    print('Targets this benchmark was written for:')
    t = TARGETS
    lines = [
        ('raw: agent <= %.1f x curl' % t['raw_vs_curl'],
         ratios['agent/curl raw'], t['raw_vs_curl'], 'x', '<='),
        ("qcow2: agent < glanceclient + qemu-img convert",
         ratios["agent/nova's way qcow2"], t['qcow2_vs_nova'], 'x', '<'),
    ]
    for name, value, limit, unit, op in lines:
        ok = value < limit if op == '<' else value <= limit
        print('  %-50s %8.2f %-3s %s'
              % (name, value, unit, 'PASS' if ok else 'MISS'))
    print('  (the CLI, start-up included: %.2f x curl raw, %.2f x nova\'s '
          'way qcow2)' % (ratios['CLI fetch/curl raw'],
                          ratios["CLI fetch/nova's way qcow2"]))
    print()
    print('Stricter targets (for reference):')
    t = STRICT_TARGETS
    lines = [
        ('raw durable: agent <= %.1f x (curl + sync)' % t['raw_vs_curl_sync'],
         ratios['agent/(curl+sync) raw'], t['raw_vs_curl_sync'], 'x'),
        ("qcow2: agent <= %.1f x nova's way" % t['qcow2_vs_nova'],
         ratios["agent/nova's way qcow2"], t['qcow2_vs_nova'], 'x'),
    ]
    if cli_rss:
        lines.append(('peak RSS of the agent CLI fetch <= %.0f MiB'
                      % t['peak_rss_mib'], max(cli_rss) / 1024,
                      t['peak_rss_mib'], 'MiB'))
    for name, value, limit, unit in lines:
        print('  %-50s %8.2f %-3s %s'
              % (name, value, unit, dl.verdict(value, limit)))
    gc_rss = rss.get('gc_raw', []) + rss.get('gc_q', [])
    curl_rss = rss.get('curl_raw', []) + rss.get('curl_q', [])
    if gc_rss and curl_rss:
        print('  (peak RSS: curl %.1f MiB, glanceclient %.1f MiB)'
              % (max(curl_rss) / 1024, max(gc_rss) / 1024))
    print()
    print('(A benchmark, not a test: the exit status is 0 either way. Other '
          'jobs on the machine make the numbers noisy: compare ratios from '
          'one run, not absolute times.)')


def parse_args(argv):
    p = argparse.ArgumentParser(
        description='Time the agent fetch against glanceclient, curl and '
        'nova\'s way on a real Glance (see the module docstring).')
    p.add_argument('--size-mib', type=int, default=1024,
                   help='size of the raw image (default: 1024)')
    p.add_argument('--runs', type=int, default=5,
                   help='timed runs per operation (default: 5)')
    p.add_argument('--zero-fraction', type=float, default=0.26,
                   help='share of 1 MiB blocks that are zeros '
                   '(default: 0.26)')
    p.add_argument('--tmpdir', default=None,
                   help='where to create the temporary directory, which '
                   'needs about 4 x size free (default: $TMPDIR or /tmp)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for tool in ('curl', 'qemu-img', 'sync', 'cmp'):
        if not shutil.which(tool):
            print('error: %s is required' % tool, file=sys.stderr)
            return 2
    print('checking the Glance install (scripts/install-glance.sh) ...',
          flush=True)
    try:
        venv = ensure_installed()
    except GlanceError as exc:
        print('error: %s' % exc, file=sys.stderr)
        return 2
    glance_bin = os.path.join(venv, 'bin', 'glance')
    drop = dl.drop_caches_possible()
    if not drop:
        print('note: %s is not writable: the page cache is NOT dropped '
              'between runs (only sync); run as root for cold-cache numbers'
              % dl.DROP_CACHES)

    workdir = tempfile.mkdtemp(prefix='tia-bench-glance-', dir=args.tmpdir)
    glance = None
    phases = None
    try:
        raw = os.path.join(workdir, 'image.raw')
        qcow2 = os.path.join(workdir, 'image.qcow2')
        tiny = os.path.join(workdir, 'tiny.raw')
        tiny_q = os.path.join(workdir, 'tiny.qcow2')
        print('building a %d MiB raw image and its qcow2 in %s ...'
              % (args.size_mib, workdir), flush=True)
        zero_mib = dl.make_raw(raw, args.size_mib, args.zero_fraction)
        dl.qemu_img('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2)
        dl.make_raw(tiny, 4, 0.5, seed=7)
        dl.qemu_img('convert', '-f', 'raw', '-O', 'qcow2', tiny, tiny_q)

        print('starting Glance and uploading the images through its API '
              '...', flush=True)
        glance = RealGlance(venv=venv,
                            workdir=os.path.join(workdir, 'glance'))
        os.makedirs(glance.workdir)
        glance.start()
        version = subprocess.run(
            [os.path.join(venv, 'bin', 'python'), '-c',
             'from importlib import metadata as m; '
             'print(m.version("glance"), m.version("python-glanceclient"))'],
            capture_output=True, text=True).stdout.split() + ['?', '?']
        version = 'glance %s, python-glanceclient %s' % tuple(version[:2])

        def upload(path, fmt, virtual_size):
            record = glance.create_image(os.path.basename(path), path,
                                         disk_format=fmt)
            if record['status'] != 'active':
                raise RuntimeError('Glance left %s %s'
                                   % (path, record['status']))
            return {'id': record['id'], 'path': path, 'disk_format': fmt,
                    'virtual_size': virtual_size}

        size = args.size_mib * MiB
        images = {'raw': upload(raw, 'raw', size),
                  'qcow2': upload(qcow2, 'qcow2', size)}
        warm_images = {'raw': upload(tiny, 'raw', 4 * MiB),
                       'qcow2': upload(tiny_q, 'qcow2', 4 * MiB)}
        image_info = {'raw_mib': args.size_mib, 'zero_mib': zero_mib,
                      'qcow2_mib': os.path.getsize(qcow2) / MiB}

        # warm-up on the tiny images: imports, first connections, binaries
        warm = GlanceBench(args, workdir, glance, warm_images, drop=False,
                           glance_bin=glance_bin)
        for _, _, _, op in OPERATIONS:
            op(warm, True)

        phases = dl.PhaseTimer()
        phases.install()
        bench = GlanceBench(args, workdir, glance, images, drop, phases,
                            glance_bin=glance_bin)
        results, rss = dl.run_rounds(bench, OPERATIONS, args.runs)
        phases.uninstall()
        phases_done, phases = phases, None
        report(results, rss, image_info, args, drop, phases_done, version,
               dl.sha512_rate())
        return 0
    finally:
        if phases is not None:
            phases.uninstall()
        if glance is not None:
            glance.cleanup()      # stops gunicorn by its process group
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
