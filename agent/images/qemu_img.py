"""``qemu-img`` with an explicit ``-f`` and under resource limits.

Limits as nova's ``QEMU_IMG_LIMITS`` for ``info`` (1 GiB address space, 30 s
of CPU), so a crafted image cannot exhaust the host; ``convert`` gets a
larger address space and no CPU limit, since big images take long.
"""

import json
import resource
import subprocess

from agent import errors

INFO_LIMITS = {'as': 1024 ** 3, 'cpu': 30}
CONVERT_LIMITS = {'as': 4 * 1024 ** 3, 'cpu': None}


def _limiter(limits):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limits['as'], limits['as']))
        if limits['cpu']:
            resource.setrlimit(resource.RLIMIT_CPU,
                               (limits['cpu'], limits['cpu']))
    return apply


def run(args, limits):
    try:
        return subprocess.run(['qemu-img'] + args, capture_output=True,
                              text=True, preexec_fn=_limiter(limits),
                              check=True)
    except FileNotFoundError:
        raise errors.ConfigError(reason='qemu-img is not installed '
                                 '(apt-get install qemu-utils)')


def info(path, fmt=None, backing_chain=False, force_share=True):
    """``qemu-img info --output=json``; a list of records with the chain."""
    args = ['info', '--output=json']
    if fmt:
        args += ['-f', fmt]
    if backing_chain:
        args.append('--backing-chain')
    if force_share:
        args.append('-U')
    result = run(args + [path], INFO_LIMITS)
    data = json.loads(result.stdout)
    return data if isinstance(data, list) else [data]


def convert_to_raw(source, source_fmt, dest, image_id, existing_target=False):
    """Convert ``source`` (of format ``source_fmt``) to sparse raw.

    :param existing_target: write into ``dest``, an existing, zeroed (new,
        sparse) file or device at least as large as the image, as
        ``convert -n --target-is-zero``
    """
    target = ['-n', '--target-is-zero'] if existing_target else []
    args = ['convert', '-f', source_fmt, '-O', 'raw', '-W', '-m', '8'] + \
        target + [source, dest]
    try:
        try:
            # O_DIRECT writes: no dirty page cache to flush afterwards
            run(args[:1] + ['-t', 'none'] + args[1:], CONVERT_LIMITS)
        except subprocess.CalledProcessError as exc:
            if 'O_DIRECT' not in exc.stderr and \
                    'Invalid argument' not in exc.stderr:
                raise
            run(args, CONVERT_LIMITS)  # e.g. tmpfs: no O_DIRECT
    except subprocess.CalledProcessError as exc:
        stderr = (exc.stderr or '').strip()
        if 'No space left' in stderr:
            raise OSError(28, 'No space left on device', dest)
        raise errors.ConversionFailed(image_id=image_id,
                                      reason=stderr or 'exit %d'
                                      % exc.returncode)
