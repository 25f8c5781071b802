"""Pure logic of the cinder volume backend and its options: metadata
encoding, sizes, the export keys the privileged side accepts, and the
``[cinder]`` options (nova's, keystoneauth1's)."""

import pytest

from agent import config
from agent.privileged import rbd_exports
from agent.volumes import cinder


def test_metadata_round_trips_through_cinder_strings():
    meta = {'kind': 'template', 'image_id': 'x', 'pid': 12, 'state': None,
            'virtual_size': 8388608}
    encoded = cinder._encode(meta)
    assert all(isinstance(v, str) and k.startswith('template-agent:')
               for k, v in encoded.items())
    # other tools' keys are not ours
    assert cinder._decode(dict(encoded, readonly='True')) == meta


@pytest.mark.parametrize('size,gib', [(1, 1), (2 ** 30, 1), (2 ** 30 + 1, 2),
                                      (0, 1)])
def test_sizes_round_up_to_whole_gib(size, gib):
    assert cinder._gib(size) == gib


@pytest.mark.parametrize('key', [
    '0b6e1c0e-7f4c-4ad5-9f4e-6d5c1f0a6b11',
    '0b6e1c0e-7f4c-4ad5-9f4e-6d5c1f0a6b11.write',
    '0b6e1c0e-7f4c-4ad5-9f4e-6d5c1f0a6b11.read-1a2b3c4d'])
def test_export_keys(key):
    assert rbd_exports._KEY.match(key)


@pytest.mark.parametrize('key', ['../etc/passwd', 'x', '', None,
                                 '0b6e1c0e-7f4c-4ad5-9f4e-6d5c1f0a6b11/..',
                                 '0b6e1c0e-7f4c-4ad5-9f4e-6d5c1f0a6b11.A,b'])
def test_export_keys_refused(key):
    with pytest.raises(rbd_exports.ExportRefused):
        rbd_exports._paths('/run/x', key)


def test_backend_choices_and_cinder_options(tmp_path):
    conf_file = tmp_path / 'a.conf'
    conf_file.write_text('[volume_linking]\nbackend = cinder\n'
                         '[DEFAULT]\nhost = hv7\n'
                         '[cinder]\nauth_type = admin_token\n'
                         'token = admin:abc\n'
                         'endpoint = http://127.0.0.1:8776/v3/abc\n'
                         'timeout = 5\n')
    conf = config.load([str(conf_file)])
    assert conf.volume_linking.backend == 'cinder'
    assert conf.host == 'hv7'
    assert conf.cinder.auth_type == 'admin_token'
    assert conf.cinder.timeout == 5
    assert conf.cinder.catalog_info == 'volumev3::publicURL'
    conf_file.write_text('[volume_linking]\nbackend = rbd\n')
    with pytest.raises(ValueError):
        assert config.load([str(conf_file)]).volume_linking.backend


def test_admin_token_session_reaches_the_configured_endpoint(tmp_path):
    conf_file = tmp_path / 'a.conf'
    conf_file.write_text('[cinder]\nauth_type = admin_token\n'
                         'token = admin:abc\n'
                         'endpoint = http://127.0.0.1:9/v3/abc\n'
                         'api_timeout = 7\n')
    backend = cinder.CinderVolumeBackend(config.load([str(conf_file)]))
    adapter = backend._client()
    assert adapter.get_endpoint() == 'http://127.0.0.1:9/v3/abc'
    assert adapter.session.timeout == 7.0
    assert adapter.default_microversion == cinder.MICROVERSION
