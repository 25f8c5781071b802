"""A real libvirtd + QEMU for the tests.

``real_libvirtd`` (session scope) makes ``qemu:///system`` answer and yields
that URI:

* ``/dev/kvm`` is given group ``kvm`` and mode 0660 first when it exists
  (else QEMU, running as ``libvirt-qemu``, is denied KVM and libvirt
  re-probes the capabilities on every domain start, ~40 s each);
* a libvirtd that already runs is used as it is and never stopped;
  otherwise ``virtlogd -d`` (unless one runs) and ``libvirtd -d`` are
  started, without systemd, and stopped at the end of the session by the
  PIDs in their pid files (``/run/virtlogd.pid``, ``/run/libvirtd.pid``),
  also when tests fail;
* when libvirtd cannot be started or does not answer, the test FAILS with
  the reason and the daemons' log tails: real-peer tests are never skipped.

Install the packages with ``scripts/install-libvirtd.sh``. Use it from a
test module with ``from tests.real_libvirtd import real_libvirtd``.
"""

import grp
import os
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET

import psutil
import pytest

SYSTEM_URI = 'qemu:///system'
LIBVIRTD_PIDFILE = '/run/libvirtd.pid'
VIRTLOGD_PIDFILE = '/run/virtlogd.pid'
QEMU_PID_DIR = '/run/libvirt/qemu'     # <domain name>.pid of running QEMUs
START_TIMEOUT = 60
STOP_TIMEOUT = 20
# test domains are named with this prefix; the fixture destroys and
# undefines any left over before it stops a libvirtd it started
DOMAIN_PREFIX = 'tia-real-'
INSTALL_HINT = 'run scripts/install-libvirtd.sh (as root)'


def _fail(msg):
    pytest.fail(msg, pytrace=False)


def fix_kvm():
    """``chgrp kvm /dev/kvm && chmod 0660 /dev/kvm`` when both exist."""
    if not os.path.exists('/dev/kvm'):
        return
    try:
        gid = grp.getgrnam('kvm').gr_gid
    except KeyError:
        return
    st = os.stat('/dev/kvm')
    if st.st_gid != gid:
        os.chown('/dev/kvm', -1, gid)
    if st.st_mode & 0o777 != 0o660:
        os.chmod('/dev/kvm', 0o660)


def _live(pid):
    """Whether ``pid`` is a process that has not exited (zombies have)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def running_pids(name):
    """PIDs of live processes named ``name`` (``libvirtd``, ``virtlogd``)."""
    pids = []
    for proc in psutil.process_iter(['name', 'status']):
        if proc.info['name'] == name and \
                proc.info['status'] != psutil.STATUS_ZOMBIE:
            pids.append(proc.pid)
    return pids


def _read_pid(pidfile):
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _quiet_libvirt():
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def answers(uri=SYSTEM_URI):
    """None when ``uri`` answers with a QEMU driver for x86_64, else why
    not."""
    libvirt = _quiet_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return str(exc)
    try:
        caps = conn.getCapabilities()
    except libvirt.libvirtError as exc:
        return str(exc)
    finally:
        conn.close()
    if not any(g.findtext('arch/emulator') for g in
               ET.fromstring(caps).iter('guest')
               if g.find('arch') is not None and
               g.find('arch').get('name') == 'x86_64'):
        return 'libvirtd answers but offers no x86_64 QEMU guest ' \
               '(qemu-system-x86 missing?)'
    return None


def domain_type(conn):
    """``'kvm'`` when libvirt can run x86_64 KVM guests here, else
    ``'qemu'`` (TCG)."""
    caps = ET.fromstring(conn.getCapabilities())
    for guest in caps.iter('guest'):
        arch = guest.find('arch')
        if arch is None or arch.get('name') != 'x86_64':
            continue
        if any(d.get('type') == 'kvm' for d in arch.iter('domain')):
            return 'kvm'
    return 'qemu'


def qemu_pid(name):
    """PID of the running QEMU of domain ``name``, from libvirt's pid
    file."""
    return _read_pid(os.path.join(QEMU_PID_DIR, '%s.pid' % name))


def cleanup_test_domains(uri=SYSTEM_URI, prefix=DOMAIN_PREFIX):
    """Destroy and undefine every domain whose name starts with
    ``prefix``; returns their names."""
    libvirt = _quiet_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return []
    gone = []
    try:
        for dom in conn.listAllDomains(0):
            if not dom.name().startswith(prefix):
                continue
            gone.append(dom.name())
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass
            try:
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    return gone


def _tail(path, lines=30):
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:]).rstrip() or '(empty)'
    except OSError as exc:
        return '(cannot read: %s)' % exc


def _on_one_cpu():
    """Run the daemon on one fixed CPU.

    libvirt caches QEMU's capabilities (``/var/cache/libvirt/qemu``) and
    throws the cache away when the host's CPUID data differ from the cached
    ones. On virtual machines whose vCPUs report different CPUID data (seen
    on Firecracker guests: "Outdated capabilities ...: host cpuid changed" in
    the debug log) a daemon that reads CPUID on whichever CPU it happens to
    run re-probes every QEMU binary at every start, ~8 s on 2 cores. QEMU
    itself is not pinned by this: libvirt gives each domain all host CPUs
    unless its XML says otherwise.
    """
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


class _Daemons:
    """The daemons this session started: ``[(name, pid)]``, with logs."""

    def __init__(self):
        self.logdir = tempfile.mkdtemp(prefix='real-libvirtd-')
        self.started = []

    def log(self, name):
        return os.path.join(self.logdir, '%s.log' % name)

    def out(self, name):
        return os.path.join(self.logdir, '%s.out' % name)

    def logs(self):
        return '\n'.join(
            '--- %s (tail) ---\n%s' % (p, _tail(p))
            for name in ('virtlogd', 'libvirtd')
            for p in (self.out(name), self.log(name)) if os.path.exists(p))

    def start(self, name, pidfile):
        """``NAME -d``: it forks into the background once initialised and
        writes ``pidfile``; its own log goes to a file here."""
        env = dict(os.environ,
                   LIBVIRT_LOG_OUTPUTS='3:file:%s' % self.log(name))
        with open(self.out(name), 'w') as out:
            # stdio to a file, never a pipe: the daemon would inherit it
            proc = subprocess.run([name, '-d', '-p', pidfile],
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=_on_one_cpu,
                                  timeout=START_TIMEOUT)
        pid = _read_pid(pidfile)
        if proc.returncode != 0 or pid is None or not _live(pid):
            _fail('%s -d failed to start (exit %d, pid file %s: %s)\n%s'
                  % (name, proc.returncode, pidfile, pid, self.logs()))
        self.started.append((name, pid))
        return pid

    def stop_all(self):
        """SIGTERM each started daemon by PID (libvirtd first), SIGKILL
        it after STOP_TIMEOUT; returns the ones that needed SIGKILL."""
        killed = []
        for name, pid in reversed(self.started):
            if not _is(pid, name):
                continue
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, STOP_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
                killed.append(name)
        self.started = []
        return killed


def _is(pid, name):
    try:
        proc = psutil.Process(pid)
        return proc.name() == name and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _live(pid):
            return True
        time.sleep(0.1)
    return not _live(pid)


def _wait_answers(uri, timeout, daemons):
    deadline = time.monotonic() + timeout
    why = answers(uri)
    while why is not None and time.monotonic() < deadline:
        for name, pid in daemons.started:
            if not _live(pid):
                _fail('%s (pid %d) exited while starting\n%s'
                      % (name, pid, daemons.logs()))
        time.sleep(0.2)
        why = answers(uri)
    return why


@pytest.fixture(scope='session')
def real_libvirtd():
    """``qemu:///system`` of a real libvirtd (started here unless one
    runs); fails, never skips, when it cannot be had."""
    missing = [t for t in ('libvirtd', 'virtlogd', 'qemu-system-x86_64',
                           'qemu-img') if not shutil.which(t)]
    if missing:
        _fail('%s missing: %s' % (', '.join(missing), INSTALL_HINT))
    try:
        import libvirt  # noqa: F401
    except ImportError:
        _fail('libvirt-python is missing from the venv: run scripts/setup.sh')
    if os.geteuid() != 0:
        _fail('the real libvirtd tests run as root (qemu:///system, loop '
              'devices)')
    fix_kvm()
    daemons = _Daemons()
    ok = False
    try:
        if answers(SYSTEM_URI) is not None:
            if running_pids('libvirtd'):
                # someone else's, maybe still starting: use it, never stop it
                why = _wait_answers(SYSTEM_URI, START_TIMEOUT, daemons)
                if why is not None:
                    _fail('a libvirtd runs (pid %s) but %s does not answer: '
                          '%s' % (running_pids('libvirtd'), SYSTEM_URI, why))
            else:
                if not running_pids('virtlogd'):
                    daemons.start('virtlogd', VIRTLOGD_PIDFILE)
                daemons.start('libvirtd', LIBVIRTD_PIDFILE)
                why = _wait_answers(SYSTEM_URI, START_TIMEOUT, daemons)
                if why is not None:
                    _fail('libvirtd started but %s does not answer within '
                          '%d s: %s\n%s' % (SYSTEM_URI, START_TIMEOUT, why,
                                            daemons.logs()))
        yield SYSTEM_URI
        ok = True
    finally:
        if daemons.started:
            cleanup_test_domains(SYSTEM_URI)
            killed = daemons.stop_all()
        else:
            killed = []
        if ok and not killed:
            shutil.rmtree(daemons.logdir, ignore_errors=True)
    if killed:
        _fail('%s did not stop on SIGTERM within %d s (killed); logs in %s'
              % (', '.join(killed), STOP_TIMEOUT, daemons.logdir))
