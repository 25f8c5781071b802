"""Linking vs downloading, and clone vs full copy, side by side in one run.

    .venv/bin/python bench/linking.py [--sizes-mib 64,1024,4096] [--runs 5]

- prepare a base via link (warm: the template is already in the image-volume
  cache; cost = attach a loop device + atomic symlink) vs via download (warm:
  the same image from the local catalog, verified, written sparse, fsynced,
  renamed), for each size;
- ``volume create`` via a reflink clone of the cached template (XFS with
  reflink on a loop device) vs a full copy (``cp --reflink=never
  --sparse=always`` + ``sync``) at 1 GiB.

Both sides run in this process's agent (no CLI start-up); medians of --runs.
Prints ratios and the targets. Cleans up every loop device, mount
and file it made, also on failure.
"""

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from agent import config, core  # noqa: E402

MiB = 1024 * 1024


def make_image(path, size_mib):
    """Raw image: 25% pseudo-random data in 1 MiB runs, the rest zeros."""
    rnd = random.Random(size_mib)
    block = rnd.randbytes(MiB)
    with open(path, 'wb') as f:
        f.truncate(size_mib * MiB)
        for i in range(0, size_mib, 4):
            f.seek(i * MiB)
            f.write(block[i % 7:] + block[:i % 7])


def drop_caches():
    subprocess.run(['sync'], check=True)
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
        return True
    except OSError:
        return False


def median_time(fn, runs, before=None):
    times = []
    for _ in range(runs):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def xfs_reflink_fs(workdir, size_gib=4):
    img = os.path.join(workdir, 'xfs.img')
    mnt = os.path.join(workdir, 'xfs')
    os.makedirs(mnt)
    with open(img, 'wb') as f:
        f.truncate(size_gib * 1024 ** 3)
    dev = subprocess.run(['losetup', '-f', '--show', img], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(['mkfs.xfs', '-q', '-m', 'reflink=1', dev], check=True)
        subprocess.run(['mount', dev, mnt], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(['umount', mnt], check=True)
    finally:
        subprocess.run(['losetup', '-d', dev], check=True)


def write_conf(workdir, name, handlers, volumes_path):
    path = os.path.join(workdir, name + '.conf')
    with open(path, 'w') as f:
        f.write('[DEFAULT]\ninstances_path = %s\nstate_path = %s\n'
                'template_image_handler = %s\n[image_source]\n'
                'local_path = %s\n[local_volumes]\npath = %s\n'
                '[libvirt]\nconnection_uri =\n' % (
                    os.path.join(workdir, name, 'instances'),
                    os.path.join(workdir, name, 'state'), handlers,
                    os.path.join(workdir, 'catalog'), volumes_path))
    return core.TemplateAgent(config.load([path]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes-mib', default='64,1024,4096')
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--workdir', default=None,
                        help='where to put the images (default: a new '
                        'directory under /var/tmp)')
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(',')]
    workdir = tempfile.mkdtemp(prefix='bench-linking-',
                               dir=args.workdir or '/var/tmp')
    linker = downloader = None
    results = {}
    try:
        with xfs_reflink_fs(workdir) as xfs:
            linker = write_conf(workdir, 'link', 'volume_linking',
                                os.path.join(xfs, 'volumes'))
            downloader = write_conf(workdir, 'download', 'downloading',
                                    os.path.join(workdir, 'unused'))
            for size in sizes:
                src = os.path.join(workdir, 'src-%d.raw' % size)
                make_image(src, size)
                image_id = 'bench-%d' % size
                linker.import_image(src, image_id, name=image_id)
                os.unlink(src)
                linker.fetch_image(image_id)          # warm the template
                linker.remove_image(image_id)

                def link(image_id=image_id):
                    linker.fetch_image(image_id)

                def download(image_id=image_id):
                    downloader.fetch_image(image_id)
                link_s = median_time(
                    link, args.runs,
                    before=lambda i=image_id: _remove_quietly(linker, i))
                dl_s = median_time(
                    download, args.runs,
                    before=lambda i=image_id: _remove_quietly(downloader, i))
                _remove_quietly(linker, image_id)
                _remove_quietly(downloader, image_id)
                results[size] = (link_s, dl_s)
                print('%5d MiB: link %.4f s, download %.3f s, link/download '
                      '%.4f' % (size, link_s, dl_s, link_s / dl_s))
            clone_size = 1024 if 1024 in sizes else sizes[0]
            image_id = 'bench-%d' % clone_size
            linker.volumes.create_volume(image_id, 1)  # warm the cache
            template = linker.context.image_volume_cache.fresh_entry(image_id)
            template_file = os.path.join(xfs, 'volumes',
                                         'volume-' + template.volume_id)
            clones = []

            def clone():
                clones.append(linker.volumes.create_volume(image_id, 1))

            def copy():
                dst = os.path.join(xfs, 'copy-%d' % len(clones))
                subprocess.run(['cp', '--reflink=never', '--sparse=always',
                                template_file, dst], check=True)
                subprocess.run(['sync', dst], check=True)
                os.unlink(dst)
            clone_s = median_time(clone, args.runs, before=drop_caches)
            copy_s = median_time(copy, args.runs, before=drop_caches)
            for volume_id in clones:
                linker.volumes.delete_volume(volume_id)
            for volume in linker.volumes.list_volumes():
                if volume['metadata'].get('kind') == 'volume':
                    linker.volumes.delete_volume(volume['id'])
            print('volume create at %d MiB: reflink clone %.4f s, full copy '
                  '%.3f s, clone/copy %.4f' % (clone_size, clone_s, copy_s,
                                               clone_s / copy_s))
            for size in sizes:
                linker.volumes.cache_evict('bench-%d' % size)
            flat = results[max(sizes)][0] / results[min(sizes)][0]
            mid = results.get(1024, results[max(sizes)])
            print()
            print('target link(%d MiB)/link(%d MiB) <= 1.5: %.2f %s' % (
                max(sizes), min(sizes), flat, _verdict(flat <= 1.5)))
            print('target link/download at 1 GiB <= 0.05: %.4f %s' % (
                mid[0] / mid[1], _verdict(mid[0] / mid[1] <= 0.05)))
            print('target clone/copy at 1 GiB <= 0.05: %.4f %s' % (
                clone_s / copy_s, _verdict(clone_s / copy_s <= 0.05)))
            for agent in (linker, downloader):
                agent.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _remove_quietly(agent, image_id):
    with contextlib.suppress(Exception):
        agent.remove_image(image_id)


def _verdict(ok):
    return 'PASS' if ok else 'MISS'


if __name__ == '__main__':
    main()
