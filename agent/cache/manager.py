"""The cache manager pass, as nova's ``imagecache.ImageCacheManager``.

Touch in-use bases (mtime = last use, so nova's own manager agrees), then
remove unused originals and resized variants older than their minimum ages.
Each removal re-checks age and usage under the base's lock right before it
happens, and removes only the entry in ``_base`` itself (a symlink is
unlinked, never followed).
"""

import logging
import os
import stat
import time

from agent import errors, files, naming

LOG = logging.getLogger(__name__)


def base_names(base_dir):
    """Names in ``base_dir`` that are base images (sha1 or sha1_size).

    Only regular files and symlinks are bases (a symlink whatever it points
    at; removal only unlinks it). A directory, a FIFO or a socket is never
    a base, whatever its name: it is left alone.

    :raises UnsafePath: ``base_dir`` is not a directory the agent's user
        owns (e.g. a symlink)
    """
    try:
        dir_fd = files.open_dir(base_dir, os.geteuid())
    except FileNotFoundError:
        return []
    try:
        names = []
        for name in os.listdir(dir_fd):
            if not naming.parse_base_filename(name):
                continue
            try:
                mode = os.stat(name, dir_fd=dir_fd,
                               follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                names.append(name)
        return sorted(names)
    finally:
        os.close(dir_fd)


def min_age_for(conf, filename, override=None):
    if override is not None:
        return override
    resized = naming.parse_base_filename(filename)[1] is not None
    if resized:
        return conf.image_cache.remove_unused_resized_minimum_age_seconds
    return conf.image_cache.remove_unused_original_minimum_age_seconds


def run_pass(agent, dry_run=False, min_age=None, now=None):
    """One pass over ``_base``; returns a report dict.

    :param min_age: seconds, overrides both minimum ages (``prune --min-age``)
    """
    conf = agent.conf
    now = now or time.time()
    names = base_names(agent.base_dir)
    paths = {n: os.path.join(agent.base_dir, n) for n in names}
    removing = conf.image_cache.remove_unused_base_images
    usage = agent.scanner.scan(list(paths.values()), strict=removing)
    report = {'dry_run': dry_run, 'removed': [], 'in_use': [],
              'too_young': [], 'failed': [], 'reclaimed_bytes': 0,
              'remove_unused_base_images': removing,
              'warnings': list(usage.warnings)}
    for name, path in paths.items():
        if usage.in_use(path):
            report['in_use'].append({'filename': name,
                                     'users': usage.users[path]})
            if not dry_run:
                try:
                    with agent.context.base_dir_fd() as dir_fd:
                        os.utime(name, (now, now), dir_fd=dir_fd,
                                 follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except PermissionError as exc:  # not the owner's file
                    report['failed'].append({'filename': name,
                                             'reason': str(exc)})
                    continue
                agent.index.touch(name, now)
    if not removing:
        return report
    for name, path in paths.items():
        if usage.in_use(path):
            continue
        age_limit = min_age_for(conf, name, min_age)

        def old_enough(st, age_limit=age_limit):
            return time.time() - st.st_mtime >= age_limit

        try:
            with agent.context.base_dir_fd() as dir_fd:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not old_enough(st):
            report['too_young'].append(name)
            continue
        if dry_run:
            entry = agent.index.get(name)
            report['removed'].append({
                'filename': name, 'path': path,
                'image_id': entry.image_id if entry else None,
                'disk_bytes': st.st_blocks * 512})
            report['reclaimed_bytes'] += st.st_blocks * 512
            continue
        try:
            info = agent.remove_base(name, check_age=old_enough)
        except errors.BaseImageInUse as exc:
            LOG.info('base %s came into use during the pass: %s', name, exc)
            report['in_use'].append({'filename': name,
                                     'users': [str(exc)]})
            continue
        except (errors.AgentError, OSError) as exc:
            # one base that cannot go must not stop the pass (as nova)
            LOG.error('cannot remove base %s: %s', name, exc)
            report['failed'].append({'filename': name,
                                                    'reason': str(exc)})
            continue
        if info is None:
            report['too_young'].append(name)
            continue
        report['removed'].append({'filename': name, 'path': path,
                                  'image_id': info['image_id'],
                                  'disk_bytes': info['disk_bytes']})
        report['reclaimed_bytes'] += info['disk_bytes']
    return report
