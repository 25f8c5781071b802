"""Attach and detach volumes with os-brick.

os-brick is imported on first use: it costs about a second of start-up,
which the downloading path and the CLI's listing commands should not pay.
"""

import warnings

_connectors = {}


def _connector(protocol):
    if protocol not in _connectors:
        from agent import identity
        identity.brick_context()  # in process, unless its daemon runs
        with warnings.catch_warnings():
            # os-brick pulls in oslo.privsep, which imports eventlet
            warnings.simplefilter('ignore')
            from os_brick.initiator import connector
        _connectors[protocol] = connector.InitiatorConnector.factory(
            protocol.upper(), root_helper=None)
    return _connectors[protocol]


def connect(properties):
    """Attach the volume; return the block device path."""
    info = _connector(properties['driver_volume_type']).connect_volume(
        properties['data'])
    return info['path']


def disconnect(properties):
    _connector(properties['driver_volume_type']).disconnect_volume(
        properties['data'], None)
