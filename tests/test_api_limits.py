"""The local API stays available: connection caps with a reserve for root,
idle, header and body timeouts. A real service in a subprocess; hostile
peers are forked children running as unprivileged users."""

import os
import signal

import pytest

from tests import test_service

public_socket_dir = test_service.public_socket_dir


@pytest.fixture
def service(env, public_socket_dir):
    """A service that members of ``nogroup`` may use; configure ``env``
    further before ``service.start()``."""
    env.configure(api={'allowed_groups': 'nogroup',
                       'socket_path': os.path.join(public_socket_dir,
                                                   'agent.sock')})
    svc = test_service.Service(env)
    try:
        yield svc
    finally:
        svc.stop(signal.SIGKILL if svc.proc and svc.proc.poll() is None
                 else signal.SIGTERM)
        svc.notify.close()


def test_unsupported_methods_get_a_json_405(service):
    service.start()
    status, payload = service.raw('PUT', '/v1/images/x', b'{}')
    assert status == 405 and 'PUT' in payload['error']['message']
