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


def test_the_template_write_gives_up_on_a_silent_ceph():
    info = {'name': 'volumes/volume-1', 'hosts': ['127.0.0.1'],
            'ports': ['6789'], 'auth_enabled': False}
    plain = cinder.rbd_filename(info)
    assert 'timeout' not in plain
    bounded = cinder.rbd_filename(info, op_timeout=30)
    assert bounded.startswith(plain)
    assert bounded.endswith(':rados_osd_op_timeout=30:rados_mon_op_timeout'
                            '=30:client_mount_timeout=30')


@pytest.mark.parametrize('stderr,volume_side', [
    ('qemu-img: error while writing at byte 90177536: Connection timed out',
     True),
    ("qemu-img: Could not open 'rbd:volumes/volume-1:mon_host=...': error "
     'connecting: Connection timed out', True),
    ('qemu-img convert did not finish in 600 s and was killed', True),
    ('qemu-img: error while reading at byte 0: Input/output error', False),
    ("qemu-img: Could not open '/x.part': Image is not in qcow2 format",
     False),
])
def test_a_failed_template_write_is_told_apart_from_a_bad_image(
        stderr, volume_side):
    assert cinder._volume_side(stderr) is volume_side
