"""``qemu-img`` with an explicit ``-f``, under resource limits, and with a
timeout on every call.

``convert`` runs with a 4 GiB address space, so a crafted image cannot
exhaust the host, no CPU limit, since big images take long, but a
wall-clock timeout that grows with the image (at least 10 minutes, plus a
second for every 20 MiB of virtual size), so a stuck conversion cannot hold
nova's lock for ever.

Before a qcow2, vmdk or vhdx image is converted (or published as it is),
``check`` runs ``qemu-img check`` on it: a structurally damaged image (a
truncated qcow2, say) otherwise converts without an error into a base whose
missing clusters read as zeros.

Images the agent checked are handed over as open descriptors
(``/dev/fd/N``): ``qemu-img`` reads exactly the bytes that were inspected and
hashed, whatever happens to their name meanwhile.
"""

import json
import logging
import os
import resource
import stat
import subprocess

from agent import errors

LOG = logging.getLogger(__name__)

CONVERT_LIMITS = {'as': 4 * 1024 ** 3, 'cpu': None, 'timeout': 600}
CONVERT_BYTES_PER_SECOND = 20 * 1024 ** 2
#: ``check`` reads metadata only (and keeps a refcount per cluster)
CHECK_LIMITS = {'as': 2 * 1024 ** 3, 'cpu': None, 'timeout': 300}
CHECK_BYTES_PER_SECOND = 100 * 1024 ** 2
#: formats whose structure ``qemu-img check`` verifies; a damaged one
#: converts without error into zeros where its tables point nowhere
CHECKED_FORMATS = ('qcow2', 'vmdk', 'vhdx')
# qemu-img check's exit codes
CHECK_OK, CHECK_INCOMPLETE, CHECK_CORRUPT, CHECK_LEAKS_ONLY = 0, 1, 2, 3
CHECK_UNSUPPORTED = 63


def fd_path(fd):
    """The name under which a child process opens our descriptor ``fd``."""
    return '/dev/fd/%d' % fd


def _limiter(limits):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limits['as'], limits['as']))
        if limits['cpu']:
            resource.setrlimit(resource.RLIMIT_CPU,
                               (limits['cpu'], limits['cpu']))
    return apply


def run(args, limits, pass_fds=(), timeout=None):
    timeout = timeout or limits['timeout']
    try:
        return subprocess.run(['qemu-img'] + args, capture_output=True,
                              text=True, preexec_fn=_limiter(limits),
                              check=True, pass_fds=pass_fds, timeout=timeout)
    except FileNotFoundError:
        raise errors.ConfigError(reason='qemu-img is not installed '
                                 '(apt-get install qemu-utils)')
    except subprocess.TimeoutExpired:
        raise subprocess.CalledProcessError(
            -9, ['qemu-img'] + args, stderr='qemu-img %s did not finish in '
            '%d s and was killed' % (args[0], timeout))


def check(source, fmt, image_id, pass_fds=(), size=0):
    """Refuse a structurally damaged image before it is converted or
    published: ``qemu-img check`` on ``source`` (a path or ``fd_path``),
    for the formats in ``CHECKED_FORMATS``.

    Leaked clusters alone (exit 3) waste space but harm no data: accepted
    and logged. Corruption (exit 2), a check that cannot complete (exit 1)
    or does not finish in time: ``ImageCorrupt``.

    :param size: bytes of ``source``, to scale the timeout
    """
    if fmt not in CHECKED_FORMATS:
        return None
    timeout = CHECK_LIMITS['timeout'] + size // CHECK_BYTES_PER_SECOND
    args = ['check', '-f', fmt, '--output=json', source]
    try:
        proc = subprocess.run(['qemu-img'] + args, capture_output=True,
                              text=True, preexec_fn=_limiter(CHECK_LIMITS),
                              pass_fds=pass_fds, timeout=timeout)
    except FileNotFoundError:
        raise errors.ConfigError(reason='qemu-img is not installed '
                                 '(apt-get install qemu-utils)')
    except subprocess.TimeoutExpired:
        raise errors.ImageCorrupt(
            image_id=image_id, fmt=fmt,
            reason='qemu-img check did not finish in %d s' % timeout)
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        report = {}
    if proc.returncode in (CHECK_OK, CHECK_UNSUPPORTED):
        return report
    if proc.returncode == CHECK_LEAKS_ONLY:
        LOG.info('image %s: qemu-img check finds %s leaked cluster(s), no '
                 'corruption; accepted', image_id, report.get('leaks', '?'))
        return report
    details = []
    if report.get('corruptions'):
        details.append('%d corruption(s)' % report['corruptions'])
    if report.get('check-errors'):
        details.append('%d error(s) while checking' % report['check-errors'])
    stderr = (proc.stderr or '').strip().splitlines()
    if stderr:
        details.append(stderr[0] + (' (and %d more lines)' % (len(stderr) - 1)
                                    if len(stderr) > 1 else ''))
    if proc.returncode == CHECK_INCOMPLETE and not details:
        details.append('the check could not complete')
    raise errors.ImageCorrupt(image_id=image_id, fmt=fmt,
                              reason='; '.join(details) or
                              'exit %d' % proc.returncode)


def convert_to_raw(source, source_fmt, dest, image_id, existing_target=False,
                   pass_fds=(), virtual_size=0, source_size=0, zeroed=True):
    """Convert ``source`` (of format ``source_fmt``) to sparse raw, once
    ``check`` found it intact.

    :param existing_target: write into ``dest``, an existing file, device
        or QEMU protocol filename (``rbd:``) at least as large as the
        image, as ``convert -n``
    :param zeroed: with ``existing_target``: ``dest`` reads as zeros (new,
        sparse), so zeros are not written (``--target-is-zero``)
    :param pass_fds: descriptors named by ``source`` or ``dest`` (see
        ``fd_path``)
    :param virtual_size: bytes, to scale the timeout
    """
    check(source, source_fmt, image_id, pass_fds=pass_fds,
          size=source_size or virtual_size)
    timeout = CONVERT_LIMITS['timeout'] + \
        virtual_size // CONVERT_BYTES_PER_SECOND
    target = (['-n'] + (['--target-is-zero'] if zeroed else [])) \
        if existing_target else []
    args = ['convert', '-f', source_fmt, '-O', 'raw', '-W', '-m', '8'] + \
        target + [source, dest]
    try:
        try:
            # O_DIRECT writes: no dirty page cache to flush afterwards
            run(args[:1] + ['-t', 'none'] + args[1:], CONVERT_LIMITS,
                pass_fds, timeout)
        except subprocess.CalledProcessError as exc:
            if 'O_DIRECT' not in exc.stderr and \
                    'Invalid argument' not in exc.stderr:
                raise
            run(args, CONVERT_LIMITS, pass_fds, timeout)  # tmpfs: no O_DIRECT
    except subprocess.CalledProcessError as exc:
        _convert_failed(exc, dest, image_id)


def copy_range(source, dest, offset, length, image_id, pass_fds=()):
    """Copy bytes ``offset`` to ``offset + length`` of the raw image file
    ``source`` to the same place in ``dest`` (as in ``convert_to_raw``
    with ``existing_target``, reading as zeros there): how a raw image goes
    into its volume range by range while it downloads."""
    def opts(path):
        if path.startswith('rbd:'):
            protocol = 'rbd'
        elif os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            protocol = 'host_device'
        else:
            protocol = 'file'
        return 'driver=raw,offset=%d,size=%d,file.driver=%s,' \
            'file.filename=%s' % (offset, length, protocol,
                                  path.replace(',', ',,'))
    args = ['convert', '-n', '--target-is-zero', '-W', '-m', '8',
            '--image-opts', opts(source), '--target-image-opts', opts(dest)]
    try:
        run(args, CONVERT_LIMITS, pass_fds, CONVERT_LIMITS['timeout'] +
            length // CONVERT_BYTES_PER_SECOND)
    except subprocess.CalledProcessError as exc:
        _convert_failed(exc, dest, image_id)


def _convert_failed(exc, dest, image_id):
    stderr = (exc.stderr or '').strip()
    if 'No space left' in stderr:
        raise OSError(28, 'No space left on device', dest)
    raise errors.ConversionFailed(image_id=image_id,
                                  reason=stderr or 'exit %d'
                                  % exc.returncode)
