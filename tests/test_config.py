"""Options, the generated sample file, config loading and the handler
registry."""

import os
import subprocess
import sys

import pytest

from agent import config, errors
from agent.handlers import registry
from tests.conftest import REPO


def test_sample_config_is_up_to_date(tmp_path):
    out = tmp_path / 'sample.conf'
    subprocess.run(
        [sys.executable, '-m', 'oslo_config.generator', '--namespace',
         'template_agent', '--wrap-width', '79', '--output-file', str(out)],
        check=True, env=dict(os.environ, PYTHONPATH=REPO))
    with open(os.path.join(REPO, 'etc', 'template-agent.conf.sample')) as f:
        committed = f.read()
    assert out.read_text() == committed, (
        'etc/template-agent.conf.sample is stale: run oslo-config-generator '
        '--config-file etc/oslo-config-generator.conf')


def test_nova_names_and_defaults():
    conf = config.load([])
    assert conf.template_image_handler == ['downloading']
    assert conf.force_raw_images is True
    assert conf.max_image_virtual_size_gb == 0
    ic = conf.image_cache
    assert (ic.subdirectory_name, ic.manager_interval,
            ic.remove_unused_base_images,
            ic.remove_unused_original_minimum_age_seconds,
            ic.remove_unused_resized_minimum_age_seconds,
            ic.precache_concurrency) == ('_base', 2400, True, 86400, 3600, 1)
    assert conf.image_source.driver == 'local'
    assert conf.image_source.local_path == conf.state_path + '/catalog'
    assert conf.glance.num_retries == 3
    assert conf.libvirt.connection_uri == 'qemu:///system'
    assert conf.libvirt.images_type == 'default'
    assert conf.use_cow_images is True
    assert config.nova_image_backend(conf) == 'qcow2'
    conf.set_override('use_cow_images', False)
    assert config.nova_image_backend(conf) == 'flat'
    with pytest.raises(ValueError):
        conf.set_override('images_type', 'vhd', group='libvirt')


def test_later_config_files_win_and_env_fallback(tmp_path, monkeypatch):
    a, b = tmp_path / 'a.conf', tmp_path / 'b.conf'
    a.write_text('[DEFAULT]\ninstances_path = /a\nstate_path = /sa\n')
    b.write_text('[DEFAULT]\ninstances_path = /b\n')
    conf = config.load([str(a), str(b)])
    assert (conf.instances_path, conf.state_path) == ('/b', '/sa')
    monkeypatch.setenv('TEMPLATE_AGENT_CONFIG', str(a))
    assert config.load([]).instances_path == '/a'


def test_unknown_handler_fails_at_start_with_valid_names(env):
    env.configure(DEFAULT={'template_image_handler': 'downloading,magic'})
    proc = env.cli('list', check=False)
    assert proc.returncode == 2
    assert "'magic'" in proc.stderr and 'downloading' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_missing_config_file_is_a_clear_error(env):
    proc = env.cli('--config-file', '/nonexistent.conf', 'list',
                   check=False)
    assert proc.returncode == 2 and 'nonexistent.conf' in proc.stderr


def test_third_party_handler_by_entry_point(tmp_path, monkeypatch):
    """A distribution on sys.path that registers a handler in the
    ``template_agent.handlers`` group is found by its short name."""
    pkg = tmp_path / 'thirdparty_handler.py'
    pkg.write_text(
        'from agent.handlers.base import BaseTemplateImageHandler\n'
        'class Mine(BaseTemplateImageHandler):\n'
        '    name = "mine"\n'
        '    def fetch_image(self, image, path, progress=None,\n'
        '                    project_id=None):\n'
        '        raise NotImplementedError\n'
        '    def remove_image(self, entry, path):\n'
        '        pass\n')
    dist = tmp_path / 'thirdparty_handler-1.0.dist-info'
    dist.mkdir()
    (dist / 'METADATA').write_text('Name: thirdparty-handler\n'
                                   'Version: 1.0\n')
    (dist / 'entry_points.txt').write_text(
        '[template_agent.handlers]\nmine = thirdparty_handler:Mine\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert 'mine' in registry.available()
    assert registry.load('mine').name == 'mine'
    with pytest.raises(errors.UnknownHandler):
        registry.load('nope')
