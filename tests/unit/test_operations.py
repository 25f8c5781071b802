"""The operation declarations: what the API accepts and refuses, what the
client sends, the CLI derived from them, and the generated reference."""

import pytest
from click.testing import CliRunner

from agent import cli, errors, operations
from agent.operations import BY_NAME, BadRequest


def bind(name, path_values=None, body=None):
    return BY_NAME[name].bind(path_values or {}, body or {})


def test_every_operation_is_a_core_method_and_a_cli_command():
    from agent import core
    from agent.volumes.side import VolumeSide
    parts = {None: core.TemplateAgent, 'volumes': VolumeSide}
    for op in operations.OPERATIONS:
        assert callable(getattr(parts[op.part], op.name)), op.name
        *group, name = op.cli.split()
        parent = cli.main.commands[group[0]] if group else cli.main
        assert name in parent.commands, op.cli


def test_routes_are_unambiguous():
    seen = {}
    for op in operations.OPERATIONS:
        key = (op.method, tuple('*' if p.startswith('{') else p
                                for p in op.route.strip('/').split('/')))
        assert key not in seen, (op.name, seen.get(key))
        seen[key] = op.name


def test_match_takes_values_from_the_path():
    op = BY_NAME['fetch_image']
    assert op.match(['v1', 'images', 'cirros', 'fetch']) == {
        'image_id': 'cirros'}
    assert op.match(['v1', 'images', 'cirros']) is None
    assert op.match(['v1', 'volumes', 'cirros', 'fetch']) is None


def test_bind_validates_types_ranges_and_names():
    assert bind('prune', body={'dry_run': True, 'min_age': 0}) == {
        'dry_run': True, 'min_age': 0}
    assert bind('prune') == {'dry_run': None, 'min_age': None}
    for body, words in (
            ({'min_age': -1}, 'min_age must be >= 0'),
            ({'min_age': True}, "'min_age' must be an integer"),
            ({'min_age': '1h'}, "'min_age' must be an integer"),
            ({'dry_run': 1}, "'dry_run' must be true or false"),
            ({'force': True}, 'unknown field(s): force')):
        with pytest.raises(BadRequest, match=words.replace('(', r'\(')
                           .replace(')', r'\)')):
            bind('prune', body=body)
    with pytest.raises(BadRequest, match='JSON object'):
        BY_NAME['prune'].bind({}, ['not', 'an', 'object'])


def test_bind_refuses_unsafe_ids_in_the_path_and_the_body():
    for image_id in ('..', '../etc/passwd', 'a/b', '', 'x\0y', '-rf'):
        with pytest.raises(errors.InvalidImageId):
            bind('show_image', {'image_id': image_id})
    with pytest.raises(errors.InvalidImageId):
        bind('create_volume', body={'image_id': '../x', 'size_gb': 1})
    with pytest.raises(BadRequest, match='1 to 1000 ids'):
        bind('precache', body={'image_ids': []})
    with pytest.raises(BadRequest, match='1 to 1000 ids'):
        bind('precache', body={'image_ids': ['i%d' % n
                                             for n in range(1001)]})
    with pytest.raises(BadRequest, match='strings'):
        bind('precache', body={'image_ids': [1]})
    with pytest.raises(BadRequest, match='size_gb must be 1 to'):
        bind('create_volume', body={'image_id': 'a', 'size_gb': 0})
    with pytest.raises(BadRequest, match="missing field 'size_gb'"):
        bind('create_volume', body={'image_id': 'a'})
    with pytest.raises(BadRequest, match='invalid project_id'):
        bind('fetch_image', {'image_id': 'a'}, {'project_id': 'a b'})
    with pytest.raises(errors.UnknownHandler):
        bind('fetch_image', {'image_id': 'a'}, {'handler': 'nope'})
    with pytest.raises(BadRequest, match='invalid volume id'):
        bind('delete_volume', {'volume_id': '..'})


def test_request_quotes_path_values_and_drops_unset_fields():
    op = BY_NAME['fetch_image']
    assert op.request(('a b',), {'handler': None, 'project_id': 'p'}) == (
        'POST', '/v1/images/a%20b/fetch', {'project_id': 'p'})
    assert BY_NAME['remove_image'].request(('x',), {}) == (
        'DELETE', '/v1/images/x', None)
    with pytest.raises(TypeError):
        op.request(('a',), {'image_id': 'b'})
    with pytest.raises(TypeError):
        op.request(('a',), {'colour': 'b'})


def test_results_travel_under_their_keys():
    op = BY_NAME['list_images']
    payload = op.encode(([{'filename': 'f'}], ['w']))
    assert payload == {'images': [{'filename': 'f'}], 'warnings': ['w']}
    assert op.decode(payload) == ([{'filename': 'f'}], ['w'])
    op = BY_NAME['fetch_image']
    assert op.decode(op.encode('/p')) == '/p'
    op = BY_NAME['status']
    assert op.encode({'a': 1}) == op.decode({'a': 1}) == {'a': 1}


def test_cli_arguments_come_from_the_declaration():
    runner = CliRunner()
    out = runner.invoke(cli.main, ['volume', 'create', '--help']).output
    assert '--image' in out and '--size' in out and '--project-id' in out
    out = runner.invoke(cli.main, ['prune', '--help']).output
    assert '--min-age DURATION' in out and '--dry-run' in out
    result = runner.invoke(cli.main, ['prune', '--min-age', 'soon'])
    assert result.exit_code == 2 and 'not a duration' in result.output
