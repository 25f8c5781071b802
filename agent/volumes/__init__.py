"""Volume backends: local (embedded default), cinder (OpenStack Cinder)."""

from agent import errors

BACKENDS = {'local': 'agent.volumes.local:LocalVolumeBackend',
            'cinder': 'agent.volumes.cinder:CinderVolumeBackend'}


def from_config(conf):
    import importlib
    name = conf.volume_linking.backend
    if name not in BACKENDS:
        raise errors.BackendUnavailable(
            backend=name, reason='not implemented in this version '
            '(available: %s)' % ', '.join(sorted(BACKENDS)))
    module, _, attr = BACKENDS[name].partition(':')
    return getattr(importlib.import_module(module), attr)(conf)
