"""Backing chains of disk files, read with ``qemu-img info --backing-chain``."""

import os
import subprocess

from agent.images import qemu_img

QCOW2_MAGIC = b'QFI\xfb'


def is_qcow2(path):
    try:
        with open(path, 'rb') as f:
            return f.read(4) == QCOW2_MAGIC
    except OSError:
        return False


MAX_CHAIN_DEPTH = 64


def _backing_of(record):
    backing = record.get('full-backing-filename') or \
        record.get('backing-filename')
    if backing and not os.path.isabs(backing):
        backing = os.path.join(os.path.dirname(record['filename']), backing)
    return backing


def backing_chain(path):
    """Paths of the backing files below ``path`` (top first), [] if none."""
    if not is_qcow2(path):
        return []
    try:
        records = qemu_img.info(path, fmt='qcow2', backing_chain=True)
    except (subprocess.CalledProcessError, ValueError):
        # some file of the chain cannot be opened (a linked base whose
        # device is not attached yet, a dangling link): the names the
        # images record are still references, read them level by level
        return _backing_chain_by_level(path)
    return [b for b in map(_backing_of, records) if b]


def _backing_chain_by_level(path):
    chain = []
    while is_qcow2(path) and len(chain) < MAX_CHAIN_DEPTH:
        try:
            records = qemu_img.info(path, fmt='qcow2')
        except (subprocess.CalledProcessError, ValueError):
            break
        backing = _backing_of(records[0]) if records else None
        if not backing:
            break
        chain.append(backing)
        path = backing
    return chain


def instance_disks(instances_path, skip_dirs):
    """Files under ``instances_path`` (symlinks to files included), outside
    ``skip_dirs``."""
    skip = {os.path.realpath(d) for d in skip_dirs}
    for root, dirs, files in os.walk(instances_path):
        dirs[:] = [d for d in dirs
                   if os.path.realpath(os.path.join(root, d)) not in skip]
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                yield path
