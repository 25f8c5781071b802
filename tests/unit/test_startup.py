"""What a command imports: ``--direct list`` and ``--help`` load only what
they use; oslo.config's and oslo.utils' heavy dependencies wait until
something uses them (``agent.deferred``) and then work as before; the
``[cinder]`` keystoneauth1 options come with the cinder backend.

Not timings: which modules are loaded, in a fresh interpreter."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

from agent import config, deferred
from tests.conftest import REPO

#: never needed to list the bases of a node (nor to start at all)
HEAVY = ('keystoneauth1', 'requests', 'urllib3', 'netaddr', 'rfc3986',
         'stevedore', 'cryptography', 'os_brick', 'libvirt', 'psutil',
         'eventlet', 'oslo_privsep', 'oslo_concurrency', 'oslo_utils',
         'importlib.metadata', 'urllib.request', 'http.client', 'ssl',
         'concurrent.futures', 'xml.etree.ElementTree', 'ctypes')


def _child(code, *args):
    """Run ``code`` in a fresh interpreter; the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)] + list(args),
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _node(tmp_path, **sections):
    """An empty node's configuration (local catalog, no libvirt)."""
    sections.setdefault('DEFAULT', {}).update(
        instances_path=str(tmp_path / 'instances'),
        state_path=str(tmp_path / 'state'))
    sections.setdefault('libvirt', {})['connection_uri'] = ''
    sections.setdefault('api', {})['socket_path'] = str(tmp_path / 'sock')
    os.makedirs(tmp_path / 'instances', exist_ok=True)
    path = tmp_path / 'agent.conf'
    with open(path, 'w') as f:
        for name, values in sections.items():
            f.write('[%s]\n' % name)
            for key, value in values.items():
                f.write('%s = %s\n' % (key, value))
    return str(path)


RUN_CLI = '''
    import contextlib, io, json, sys
    from agent import cli, deferred
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(sys.argv[1:], standalone_mode=False)
        except SystemExit:
            pass
    print(json.dumps({'out': out.getvalue(), 'modules': sorted(sys.modules),
                      'deferred_loaded': sorted(deferred._real)}))
'''


def test_direct_list_imports_only_what_it_uses(tmp_path):
    conf = _node(tmp_path)
    for _ in range(2):  # the first run makes the state directories
        result = _child(RUN_CLI, '--config-file', conf, '--direct', 'list')
    assert result['out'].split() == ['IMAGE', 'HANDLER', 'SIZE', 'ON',
                                     'DISK', 'IN', 'USE', 'USERS', 'LAST',
                                     'USED', 'PATH']
    loaded = set(result['modules'])
    assert {'agent.core', 'oslo_config.cfg'} <= loaded
    assert sorted(loaded.intersection(HEAVY)) == []
    assert result['deferred_loaded'] == []


def test_help_loads_no_configuration():
    result = _child(RUN_CLI, '--help')
    assert 'Usage:' in result['out']
    loaded = set(result['modules'])
    assert not {'oslo_config', 'agent.config', 'agent.core',
                'diskcache'} & loaded
    assert sorted(loaded.intersection(HEAVY)) == []


def test_a_cinder_configuration_has_the_keystoneauth_options(tmp_path):
    pytest.importorskip('keystoneauth1')
    conf = _node(tmp_path, volume_linking={'backend': 'cinder'},
                 cinder={'auth_type': 'admin_token', 'token': 'admin:p',
                         'endpoint': 'http://127.0.0.1:9/v3/p',
                         'timeout': '5', 'region_name': 'r1'})
    loaded = config.load([conf])
    assert loaded.cinder.auth_type == 'admin_token'
    assert loaded.cinder.timeout == 5
    assert loaded.cinder.region_name == 'r1'
    config.register_cinder_auth(loaded)  # again: nothing changes
    assert loaded.cinder.timeout == 5
    # the overrides of tests and the CLI name the backend too
    overridden = config.load([_node(tmp_path)], overrides={
        'volume_linking': {'backend': 'cinder'}})
    assert overridden.cinder.auth_type is None
    # without Cinder the agent's own [cinder] options only, until the
    # cinder backend is built on that configuration
    local = config.load([_node(tmp_path)])
    assert 'auth_type' not in local.cinder
    assert local.cinder.api_timeout > 0
    from agent.volumes import cinder
    cinder.CinderVolumeBackend(local)
    assert 'auth_type' in local.cinder


def test_a_cinder_configuration_loads_keystoneauth_before_any_command(
        tmp_path):
    pytest.importorskip('keystoneauth1')
    conf = _node(tmp_path, volume_linking={'backend': 'cinder'},
                 cinder={'auth_type': 'admin_token'})
    result = _child('''
        import json, sys
        from agent import config
        conf = config.load([sys.argv[1]])
        print(json.dumps([conf.cinder.auth_type,
                          'keystoneauth1' in sys.modules]))
    ''', conf)
    assert result == ['admin_token', True]


def test_the_documented_options_keep_keystoneauth_s():
    cinder = dict(config.list_opts())['cinder']
    names = {opt.dest for opt in cinder}
    assert {'auth_type', 'timeout', 'cafile', 'region_name',
            'valid_interfaces', 'api_timeout'} <= names


def test_oslo_config_types_still_use_netaddr_and_rfc3986():
    """Options of the types that need the deferred modules still parse
    and refuse what they refused."""
    result = _child('''
        import json, sys
        from agent import config, deferred
        from oslo_config import types
        placeholders = [isinstance(types.netaddr, deferred.Placeholder),
                        isinstance(types.rfc3986, deferred.Placeholder),
                        'netaddr' in sys.modules]
        cfg = config.cfg
        conf = cfg.ConfigOpts()
        conf.register_opts([cfg.IPOpt('ip', default='10.0.0.1'),
                            cfg.URIOpt('uri', default='http://a/b')])
        conf([])
        refused = []
        for name, bad in (('ip', 'not-an-address'), ('uri', 'not a uri')):
            try:
                conf.set_override(name, bad)
            except ValueError:
                refused.append(name)
        print(json.dumps([placeholders, conf.ip, conf.uri, refused,
                          deferred.is_loaded('netaddr'),
                          deferred.is_loaded('rfc3986'),
                          deferred.is_loaded('stevedore')]))
    ''')
    assert result == [[True, True, False], '10.0.0.1', 'http://a/b',
                      ['ip', 'uri'], True, True, False]


def test_the_fetch_path_leaves_out_what_it_does_not_use():
    result = _child('''
        import json, sys
        from agent import core
        from agent.handlers import downloading
        from agent.images import glance
        print(json.dumps(sorted(sys.modules)))
    ''')
    assert not {'cryptography', 'urllib.request', 'keystoneauth1',
                'importlib.metadata', 'psutil', 'os_brick'} & set(result)


def _luks_v1(size=2 * 1024 * 1024):
    header = struct.pack('>6sH32s32s32sII20s32sI', b'LUKS\xba\xbe', 1, b'aes',
                         b'xts-plain64', b'sha256', 4096, 64, bytes(20),
                         bytes(32), 1000)
    return header + bytes(size - len(header))


def test_luks_images_are_still_recognised_without_cryptography(tmp_path):
    image = tmp_path / 'luks.img'
    image.write_bytes(_luks_v1())
    result = _child('''
        import json, sys
        from agent.images import inspection
        found = [str(inspection.inspect_file(sys.argv[1]))]
        before = 'cryptography' in sys.modules
        # the decryption helpers load when used
        from oslo_utils.imageutils import format_inspector
        slots = format_inspector._luks.NUM_KEY_SLOTS
        import oslo_utils.imageutils._luks as real
        print(json.dumps([found, before, slots == real.NUM_KEY_SLOTS,
                          format_inspector._luks.parse_key_slot
                          is real.parse_key_slot,
                          'cryptography' in sys.modules]))
    ''', str(image))
    assert result == [['luks'], False, True, True, True]


# -- agent.deferred itself ----------------------------------------------------
@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    """``tia_fake`` (counts its imports) and the package ``tia_fakepkg``
    with a submodule, importable from ``tmp_path``."""
    (tmp_path / 'tia_fake.py').write_text(
        'import time\n'
        'import builtins\n'
        'builtins.TIA_FAKE_IMPORTS = getattr(builtins, '
        "'TIA_FAKE_IMPORTS', 0) + 1\n"
        'time.sleep(0.05)\n'
        'VALUE = 42\n'
        'def answer():\n'
        '    return VALUE\n')
    pkg = tmp_path / 'tia_fakepkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('from tia_fakepkg import sub\n'
                                     'TOP = sub.SUB + 1\n')
    (pkg / 'sub.py').write_text('import builtins\n'
                                'builtins.TIA_FAKE_SUB = getattr(builtins, '
                                "'TIA_FAKE_SUB', 0) + 1\n"
                                'SUB = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins
    yield builtins
    for name in ('tia_fake', 'tia_fakepkg', 'tia_fakepkg.sub'):
        sys.modules.pop(name, None)
        deferred._real.pop(name, None)
        deferred._placeholders.pop(name, None)
    for counter in ('TIA_FAKE_IMPORTS', 'TIA_FAKE_SUB'):
        if hasattr(builtins, counter):
            delattr(builtins, counter)


def test_a_deferred_module_loads_once_on_first_use(fake_modules):
    with deferred.deferring(['tia_fake', 'tia_fake_missing']):
        import tia_fake
    assert 'tia_fake' not in sys.modules  # others import the real one
    assert not deferred.is_loaded('tia_fake')
    assert not hasattr(fake_modules, 'TIA_FAKE_IMPORTS')
    with pytest.raises(ImportError):
        import tia_fake_missing  # noqa: F401 - missing stays missing
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        tia_fake.answer())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [42] * 8
    assert fake_modules.TIA_FAKE_IMPORTS == 1
    assert deferred.is_loaded('tia_fake')
    import tia_fake as again
    assert again is sys.modules['tia_fake'] is deferred._real['tia_fake']
    assert again.VALUE == 42 and 'VALUE' in dir(tia_fake)
    tia_fake.VALUE = 7  # a write reaches the real module
    assert again.answer() == 7
    assert fake_modules.TIA_FAKE_IMPORTS == 1


def test_a_deferred_package_s_submodules_import_once(fake_modules):
    with deferred.deferring(['tia_fakepkg']):
        import tia_fakepkg
    from tia_fakepkg import sub  # an ordinary import, by someone else
    assert tia_fakepkg.TOP == 2
    assert tia_fakepkg.sub is sub is sys.modules['tia_fakepkg.sub']
    assert fake_modules.TIA_FAKE_SUB == 1


def test_a_deferred_submodule_answers_annotations_without_loading(
        fake_modules):
    with deferred.deferring_submodule('tia_fakepkg', 'later',
                                      annotations=('Record',)):
        pass  # no such submodule: nothing placed
    assert not hasattr(sys.modules['tia_fakepkg'], 'later')
    with deferred.deferring_submodule('tia_fakepkg', 'sub'):
        from tia_fakepkg import sub
    assert sub is sys.modules['tia_fakepkg.sub']  # imported already
    sys.modules.pop('tia_fakepkg.sub')
    del sys.modules['tia_fakepkg'].sub
    with deferred.deferring_submodule('tia_fakepkg', 'sub',
                                      annotations=('SUB',)):
        from tia_fakepkg import sub as deferred_sub
    assert 'tia_fakepkg.sub' not in sys.modules
    assert not hasattr(sys.modules['tia_fakepkg'], 'sub')
    assert repr(deferred_sub.SUB) == 'tia_fakepkg.sub.SUB'
    assert 'tia_fakepkg.sub' not in sys.modules
    assert deferred_sub.__name__ == 'tia_fakepkg.sub'
    assert deferred_sub.__getattr__('SUB') == 1  # the real value
    assert sys.modules['tia_fakepkg.sub'] is deferred._real['tia_fakepkg.sub']


# -- what was made lazy still behaves the same --------------------------------
@pytest.mark.parametrize('env,expect', [
    ({}, ('glance', 9292, '/v2/images?x=1', {})),
    ({'http_proxy': 'http://u:p@proxy:3128'},
     ('proxy', 3128, 'http://glance:9292/v2/images?x=1',
      {'Proxy-Authorization': 'Basic dTpw'})),
    ({'HTTP_PROXY': 'proxy:8080'},
     ('proxy', 8080, 'http://glance:9292/v2/images?x=1', {})),
    ({'http_proxy': 'http://proxy:3128', 'no_proxy': 'glance'},
     ('glance', 9292, '/v2/images?x=1', {})),
    ({'https_proxy': 'http://proxy:3128'},
     ('glance', 9292, '/v2/images?x=1', {})),
])
def test_glance_connections_follow_the_proxy_environment(monkeypatch, env,
                                                         expect):
    from agent.images import glance
    for name in list(os.environ):
        if name.lower().endswith('_proxy'):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    conn, target, headers = glance._open_connection(
        'http://glance:9292/v2/images?x=1', 5)
    assert (conn.host, conn.port, target, headers) == expect


def test_the_client_s_connection_class_is_still_there(tmp_path):
    from agent import client
    conn = client._UnixConnection(str(tmp_path / 'none.sock'), timeout=3)
    assert conn.unix_path == str(tmp_path / 'none.sock')
    assert conn.timeout == 3
    with pytest.raises(OSError):
        conn.connect()
    assert client._connection_class() is client._UnixConnection
