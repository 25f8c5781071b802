"""``qemu-img`` with an explicit ``-f``, under resource limits, and with a
timeout on every call.

``convert`` runs with a 4 GiB address space, so a crafted image cannot
exhaust the host, no CPU limit, since big images take long, but a
wall-clock timeout that grows with the image (at least 10 minutes, plus a
second for every 20 MiB of virtual size), so a stuck conversion cannot hold
nova's lock for ever.

Images the agent checked are handed over as open descriptors
(``/dev/fd/N``): ``qemu-img`` reads exactly the bytes that were inspected and
hashed, whatever happens to their name meanwhile.
"""

import resource
import subprocess

from agent import errors

CONVERT_LIMITS = {'as': 4 * 1024 ** 3, 'cpu': None, 'timeout': 600}
CONVERT_BYTES_PER_SECOND = 20 * 1024 ** 2


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


def convert_to_raw(source, source_fmt, dest, image_id, existing_target=False,
                   pass_fds=(), virtual_size=0):
    """Convert ``source`` (of format ``source_fmt``) to sparse raw.

    :param existing_target: write into ``dest``, an existing, zeroed (new,
        sparse) file or device at least as large as the image, as
        ``convert -n --target-is-zero``
    :param pass_fds: descriptors named by ``source`` or ``dest`` (see
        ``fd_path``)
    :param virtual_size: bytes, to scale the timeout
    """
    timeout = CONVERT_LIMITS['timeout'] + \
        virtual_size // CONVERT_BYTES_PER_SECOND
    target = ['-n', '--target-is-zero'] if existing_target else []
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
        stderr = (exc.stderr or '').strip()
        if 'No space left' in stderr:
            raise OSError(28, 'No space left on device', dest)
        raise errors.ConversionFailed(image_id=image_id,
                                      reason=stderr or 'exit %d'
                                      % exc.returncode)
