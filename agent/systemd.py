"""sd_notify without a dependency: READY, STATUS, WATCHDOG, STOPPING."""

import os
import socket


def notify(*fields):
    """Send ``KEY=value`` lines to systemd; False when not under systemd."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return False
    if address.startswith('@'):
        address = '\0' + address[1:]
    with socket.socket(socket.AF_UNIX,
                       socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
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
