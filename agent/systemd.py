"""sd_notify without a dependency: READY, STATUS, WATCHDOG, STOPPING."""

import os
import socket


_connected = {}  # address -> socket, connected once (before dropping root)


def notify(*fields):
    """Send ``KEY=value`` lines to systemd; False when not under systemd.

    The socket is connected on the first call and kept: the service makes
    that call while still root, so it can still notify once it works as
    another user, whatever the notify socket's permissions.
    """
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return False
    if address.startswith('@'):
        address = '\0' + address[1:]
    try:
        sock = _connected.get(address)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            _connected[address] = sock
        sock.sendall('\n'.join(fields).encode('utf-8'))
    except OSError:
        return False
    return True


def watchdog_interval():
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    usec = os.environ.get('WATCHDOG_USEC')
    pid = os.environ.get('WATCHDOG_PID')
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
