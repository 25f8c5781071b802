"""A real nova for the tests: nova 34.0.0 from PyPI in its own venv
(``scripts/install-nova.sh``), driven by ``tests/nova_driver.py`` in a
subprocess that speaks JSON.

``real_nova`` (session scope) yields a ``Nova``; when nova is not installed
or does not import, the test FAILS with the reason: real-peer tests are
never skipped.
"""

import json
import os
import subprocess

import pytest

NOVA_VENV = os.environ.get('NOVA_VENV', '/opt/template-agent/nova-venv')
NOVA_VERSION = '34.0.0'
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'nova_driver.py')
INSTALL_HINT = 'run scripts/install-nova.sh (as root)'
TIMEOUT = 120


class NovaFailed(AssertionError):
    pass


class Nova:
    """nova's own code on this host, one process per request."""

    def __init__(self, python):
        self.python = python

    def _cmd(self):
        # nova's imports warn on stderr (eventlet); stdout is the answer
        return [self.python, '-W', 'ignore', DRIVER]

    def start(self, request):
        """Start a request; returns the Popen (finish it with ``wait``)."""
        proc = subprocess.Popen(self._cmd(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
        return proc

    @staticmethod
    def wait(proc, timeout=TIMEOUT):
        try:
            out = proc.stdout.read()
            err = proc.stderr.read()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise NovaFailed('nova driver did not finish in %d s' % timeout)
        finally:
            proc.stdout.close()
            proc.stderr.close()
        if proc.returncode != 0:
            raise NovaFailed('nova driver failed (exit %d):\n%s'
                             % (proc.returncode, err[-3000:]))
        return json.loads(out)

    def run(self, request, timeout=TIMEOUT):
        return self.wait(self.start(request), timeout)


@pytest.fixture(scope='session')
def real_nova():
    python = os.path.join(NOVA_VENV, 'bin', 'python')
    if not os.path.exists(python):
        pytest.fail('nova is not installed in %s: %s' % (NOVA_VENV,
                                                        INSTALL_HINT),
                    pytrace=False)
    proc = subprocess.run(
        [python, '-W', 'ignore', '-c',
         'import importlib.metadata as m, nova.virt.libvirt.imagebackend, '
         'nova.virt.libvirt.imagecache; print(m.version("nova"))'],
        capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail('nova in %s does not import: %s\n%s' % (
            NOVA_VENV, INSTALL_HINT, proc.stderr[-2000:]), pytrace=False)
    if proc.stdout.strip() != NOVA_VERSION:
        pytest.fail('nova %s in %s, expected %s: %s' % (
            proc.stdout.strip(), NOVA_VENV, NOVA_VERSION, INSTALL_HINT),
            pytrace=False)
    return Nova(python)
