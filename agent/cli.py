"""``template-agent``: a thin click layer over ``agent.core``.

Parses, calls the core, formats (``--format table|json``), and maps errors to
one readable line on stderr and a non-zero exit (a traceback only with -v).
Everything but click and the declaration of the operations is imported
by the command that needs it, when it runs: ``--help`` loads no
configuration, and a command loads only what its path through the core
uses (see "Start-up" in docs/architecture.md).
"""

import contextlib
import functools
import logging
import os
import sys

import click

from agent import operations

_DURATION = r'^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$'
_UNITS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}


def parse_duration(text):
    """'90', '30s', '10m', '2h', '1d' or '1w', in seconds."""
    import re  # its module cache compiles the pattern once
    m = re.match(_DURATION, text or '')
    if not m:
        raise ValueError('%r is not a duration such as 0, 30s, 10m, '
                                 '2h or 1d' % text)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human_bytes(n):
    if n is None:
        return '-'
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(n) < 1024 or unit == 'TiB':
            return ('%d %s' % (n, unit)) if unit == 'B' else \
                '%.1f %s' % (n, unit)
        n /= 1024.0


def sources_text(sources):
    """``{source: bytes}`` as ``1.2 GiB from peers, 64.0 MiB from glance``
    (None when there is nothing to say)."""
    if not sources:
        return None
    return ', '.join('%s from %s' % (human_bytes(n), source)
                     for source, n in sources.items())


def human_time(ts):
    if not ts:
        return '-'
    import datetime
    return datetime.datetime.fromtimestamp(ts).strftime('%Y-%m-%d %H:%M:%S')


def print_table(rows, columns):
    """``columns``: [(header, callable(row) -> str)]."""
    cells = [[h for h, _ in columns]]
    cells += [[str(f(r)) for _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for line in cells:
        click.echo('  '.join(c.ljust(w) for c, w in zip(line, widths))
                   .rstrip())


def print_json(data):
    # indented for a person; compact (C-encoded, several times faster on
    # thousands of rows) for a program
    import json
    indent = 2 if sys.stdout.isatty() else None
    click.echo(json.dumps(data, indent=indent, sort_keys=True, default=str))


class Context:
    """Builds, on first use, what a command talks to: the service when its
    socket answers (unless --direct), else the core in this process."""

    def __init__(self, config_files, verbose, direct):
        self.config_files = config_files
        self.verbose = verbose
        self.direct = direct
        self._conf = None
        self._agent = None
        self._local = None

    @property
    def conf(self):
        if self._conf is None:
            from agent import config
            self._conf = config.load(self.config_files)
        return self._conf

    @property
    def local(self):
        """The core in this process (for what only works here)."""
        if self._local is None:
            from agent import core
            self._local = core.TemplateAgent(self.conf)
        return self._local

    @property
    def agent(self):
        if self._agent is None:
            path = self.conf.api.socket_path
            if not self.direct and os.path.exists(path):
                from agent import client
                if client.service_answers(path):
                    self._agent = client.ServiceClient(path)
            if self._agent is None:
                self._agent = self.local
        return self._agent


@contextlib.contextmanager
def handle_errors(ctx):
    """One line on stderr and an exit code for every expected failure."""
    from agent import config, errors
    try:
        yield
    except errors.AgentError as exc:
        if ctx.verbose:
            raise
        click.echo('error: %s' % exc, err=True)
        sys.exit(exc.exit_code)
    except config.cfg.Error as exc:
        if ctx.verbose:
            raise
        click.echo('error: configuration: %s' % exc, err=True)
        sys.exit(2)
    except OSError as exc:
        if ctx.verbose:
            raise
        click.echo('error: %s' % exc, err=True)
        sys.exit(1)


pass_ctx = click.make_pass_decorator(Context)
FORMAT = click.option('--format', 'fmt', type=click.Choice(['table', 'json']),
                      default='table', show_default=True,
                      help='Output format.')


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--config-file', multiple=True, type=click.Path(),
              help='INI config file; repeat for several (later ones win). '
              'Default: $TEMPLATE_AGENT_CONFIG (colon-separated).')
@click.option('-v', '--verbose', is_flag=True,
              help='Debug logging, and tracebacks on errors.')
@click.option('--direct', is_flag=True,
              help='Work in this process even when the service answers on '
              '[api] socket_path (same locks, same results).')
@click.pass_context
def main(click_ctx, config_file, verbose, direct):
    """Prepare and manage hypervisor base images (nova's _base)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    click_ctx.obj = Context(list(config_file), verbose, direct)


# -- images (local catalog) --------------------------------------------------
@main.group()
def images():
    """The embedded local image catalog."""


def _local_catalog(ctx):
    from agent import errors
    from agent.images.local_catalog import LocalCatalog
    if not isinstance(ctx.local.source, LocalCatalog):
        raise errors.ConfigError(
            reason='the local catalog is not in use ([image_source] driver '
            '= %s)' % ctx.conf.image_source.driver)
    return ctx.local.source


@images.command('import')
@click.argument('file', type=click.Path(exists=True, dir_okay=False))
@click.option('--id', 'image_id', required=True, help='Image id to give it.')
@click.option('--name', help='Display name (default: the file name).')
@click.option('--disk-format', help='raw, qcow2, vmdk, vhd, vhdx, vdi, iso; '
              'detected when omitted, refused when it does not match.')
@click.option('--visibility', default='shared', show_default=True,
              type=click.Choice(['public', 'private', 'shared',
                                 'community']))
@click.option('--owner', help='Owning project id.')
@click.option('--volume-backed', is_flag=True,
              help='Store the bits in a new backend volume and give the '
              'image a cinder:// location, as Glance\'s cinder store (raw '
              'only).')
@FORMAT
@pass_ctx
def images_import(ctx, file, image_id, name, disk_format, visibility, owner,
                  volume_backed, fmt):
    """Add FILE to the local catalog as image --id."""
    with handle_errors(ctx):
        image = ctx.local.import_image(
            file, image_id, volume_backed=volume_backed, name=name,
            disk_format=disk_format, visibility=visibility, owner=owner)
        record = image.to_glance()
        if fmt == 'json':
            print_json(record)
        else:
            click.echo('imported %s: %s, %s, virtual %s, sha512 %s...%s' % (
                image.id, image.disk_format, human_bytes(image.size),
                human_bytes(image.virtual_size), image.os_hash_value[:16],
                ''.join(' at ' + u for u in image.locations)))


@images.command('list')
@FORMAT
@pass_ctx
def images_list(ctx, fmt):
    """List the images of the local catalog."""
    with handle_errors(ctx):
        records = [i.to_glance() for i in _local_catalog(ctx).list()]
        if fmt == 'json':
            print_json(records)
            return
        print_table(records, [
            ('ID', lambda r: r['id']), ('NAME', lambda r: r['name']),
            ('FORMAT', lambda r: r['disk_format']),
            ('SIZE', lambda r: human_bytes(r['size'])),
            ('VIRTUAL', lambda r: human_bytes(r['virtual_size'])),
            ('VISIBILITY', lambda r: r['visibility']),
            ('OWNER', lambda r: r['owner'] or '-')])


# -- operations --------------------------------------------------------------
# Every operation of agent.operations is a command here: its arguments come
# from the declaration (path parameters and required lists are arguments,
# the others options); the functions below only say how a result reads.
OUTPUTS = {}


def output(name, *extra_options):
    """How the command of operation ``name`` shows its result:
    ``fn(ctx, call, fmt, **arguments)`` calls ``call(**arguments)`` (the
    service's or the core's method) and prints. ``extra_options`` are
    click options of the CLI alone."""
    def decorate(fn):
        OUTPUTS[name] = (fn, extra_options)
        return fn
    return decorate


def _click_param(p, op):
    kind = {int: int, str: str}.get(p.type)
    if p.unit == 'seconds':
        kind = DURATION
    if p in op.path_params or (p.required and p.type is list):
        return click.argument(p.name, nargs=-1 if p.type is list else 1,
                              required=True)
    if p.type is bool:
        return click.option(p.flag, p.name, is_flag=True, help=p.help)
    return click.option(p.flag, p.name, type=kind, required=p.required,
                        help=p.help)


def _as_json(ctx, call, fmt, **arguments):
    print_json(call(**arguments))


def _operation_command(op):
    fn, extra = OUTPUTS.get(op.name, (_as_json, ()))

    def command(fmt, **arguments):
        ctx = click.get_current_context().find_object(Context)
        with handle_errors(ctx):
            call = op.implementation(ctx.agent)
            if not op.job:
                return fn(ctx, call, fmt, **arguments)
            label = '%s %s' % (op.job, op.describe(arguments))
            with _progress_bar(label) as progress:
                return fn(ctx, functools.partial(call, progress=progress),
                          fmt, **arguments)
    command.__doc__ = fn.__doc__ or op.summary
    for decorator in reversed([_click_param(p, op) for p in op.params] +
                              list(extra) + [FORMAT]):
        command = decorator(command)
    return command


class _Duration(click.ParamType):
    name = 'duration'

    def convert(self, value, param, ctx):
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()


@contextlib.contextmanager
def _progress_bar(label):
    """A progress callback drawing a bar on a terminal, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    state = {'bar': None, 'done': 0}

    def progress(done, total, sources=None):
        if state['bar'] is None:
            state['bar'] = click.progressbar(
                length=total or 0, label=label, file=sys.stderr,
                show_pos=False, item_show_func=lambda item: item)
            state['bar'].__enter__()
        state['bar'].update(done - state['done'], sources_text(sources))
        state['done'] = done
    try:
        yield progress
    finally:
        if state['bar'] is not None:
            state['bar'].__exit__(None, None, None)


@output('fetch_image')
def fetch(ctx, call, fmt, **arguments):
    """Prepare the base image of IMAGE_ID; prints its path last."""
    path = call(**arguments)
    if fmt == 'json':
        print_json({'path': path})
    else:
        click.echo(path)


@output('precache')
def precache(ctx, call, fmt, image_ids):
    """Prepare several images, precache_concurrency at a time (nova's
    cache_images): each is cached, existing, unsupported or error."""
    results = call(list(image_ids))
    if fmt == 'json':
        print_json(results)
    else:
        for image_id, result in results.items():
            click.echo('%s: %s' % (image_id, result))
    if any(r == 'error' for r in results.values()):
        sys.exit(1)


LIST_COLUMNS = [
    ('IMAGE', lambda r: r['image_id'] or '(nova) ' + r['filename'][:12]),
    ('HANDLER', lambda r: r['handler']),
    ('SIZE', lambda r: human_bytes(r['size_bytes'])),
    ('ON DISK', lambda r: human_bytes(r['disk_bytes'])),
    ('IN USE', lambda r: 'yes' if r['in_use'] else 'no'),
    ('USERS', lambda r: ','.join(r['users']) or '-'),
    ('LAST USED', lambda r: human_time(r['last_used'])),
    ('PATH', lambda r: r['path'] + (' -> ' + r['target']
                                    if r['target'] else '')),
]


@output('list_images')
def list_(ctx, call, fmt):
    """List base images with size, handler, users and last use."""
    rows, warnings = call()
    for warning in warnings:
        click.echo('warning: %s' % warning, err=True)
    if fmt == 'json':
        print_json(rows)
    else:
        print_table(rows, LIST_COLUMNS)


@output('show_image')
def show(ctx, call, fmt, image_id):
    info = call(image_id)
    if fmt == 'json':
        print_json(info)
        return
    for warning in info.pop('usage_warnings'):
        click.echo('warning: %s' % warning, err=True)
    for key in sorted(info):
        click.echo('%-18s %s' % (key + ':', info[key]))


@output('remove_image')
def remove(ctx, call, fmt, image_id):
    info = call(image_id)
    if fmt == 'json':
        print_json(info)
    else:
        click.echo('removed %s (%s on disk)' % (
            info['path'], human_bytes(info['disk_bytes'])))


@output('prune', click.option('--yes', is_flag=True,
                              help='Do not ask on a terminal.'))
def prune(ctx, call, fmt, dry_run, min_age, yes):
    """Remove unused base images older than the minimum age (e.g. 0, 30m,
    2h, 1d with --min-age)."""
    if not dry_run and not yes and sys.stdin.isatty():
        plan = call(dry_run=True, min_age=min_age)
        if not plan['removed']:
            _print_prune(plan, fmt)
            return
        for item in plan['removed']:
            click.echo('would remove %s' % item['path'])
        click.confirm('Remove %d base image(s), %s?' % (
            len(plan['removed']), human_bytes(plan['reclaimed_bytes'])),
            abort=True)
    _print_prune(call(dry_run=dry_run, min_age=min_age), fmt)


def _print_prune(report, fmt):
    for warning in report['warnings']:
        click.echo('warning: %s' % warning, err=True)
    if fmt == 'json':
        print_json(report)
        sys.exit(1 if report['failed'] else 0)
    verb = 'would remove' if report['dry_run'] else 'removed'
    for item in report['removed']:
        click.echo('%s %s (image %s, %s)' % (
            verb, item['path'], item['image_id'] or 'unknown',
            human_bytes(item['disk_bytes'])))
    if not report['remove_unused_base_images']:
        click.echo('remove_unused_base_images is False: nothing is removed')
    click.echo('%s %d base image(s), %s reclaimed; %d in use, %d too young'
               % (verb, len(report['removed']),
                  human_bytes(report['reclaimed_bytes']),
                  len(report['in_use']), len(report['too_young'])))
    for failure in report['failed']:
        click.echo('error: cannot remove %s: %s' % (failure['filename'],
                                                     failure['reason']),
                   err=True)
    if report['failed']:
        sys.exit(1)


@output('init')
def init(ctx, call, fmt):
    report = call()
    if fmt == 'json':
        print_json(report)
        return
    click.echo('cleaned %d temporary file(s), adopted %d, dropped %d'
               % (len(report['cleaned']), len(report['adopted']),
                  len(report['dropped'])))
    import json
    for name, result in report['handlers'].items():
        click.echo('handler %s: %s' % (name, json.dumps(result)))


@output('create_volume')
def volume_create(ctx, call, fmt, **arguments):
    """Create a volume from an image: a copy-on-write clone of its cached
    template. Prints the new volume id."""
    volume_id = call(**arguments)
    if fmt == 'json':
        print_json({'volume_id': volume_id})
    else:
        click.echo(volume_id)


@output('list_volumes')
def volume_list(ctx, call, fmt):
    rows = call()
    if fmt == 'json':
        print_json(rows)
        return
    print_table(rows, [
        ('VOLUME', lambda r: r['id']),
        ('KIND', lambda r: r['metadata'].get('kind', '-')),
        ('IMAGE', lambda r: r['metadata'].get('image_id') or '-'),
        ('SIZE', lambda r: human_bytes(r['size_bytes'])),
        ('SOURCE', lambda r: r['metadata'].get('source_volume') or '-')])


@output('delete_volume')
def volume_delete(ctx, call, fmt, volume_id):
    info = call(volume_id)
    if fmt == 'json':
        print_json(info)
    else:
        click.echo('deleted %s' % volume_id)


@output('cache_list')
def cache_list(ctx, call, fmt):
    rows = call()
    if fmt == 'json':
        print_json(rows)
        return
    print_table(rows, [
        ('IMAGE', lambda r: r['image_id']),
        ('VOLUME', lambda r: r['volume_id']),
        ('SIZE', lambda r: human_bytes(r['size_bytes'])),
        ('STATE', lambda r: r['state']),
        ('IMAGE UPDATED', lambda r: r['image_updated_at'] or '-'),
        ('LAST USED', lambda r: human_time(r['last_used'])),
        ('HOLDERS', lambda r: ','.join(r['holders']) or '-')])


@output('cache_evict')
def cache_evict(ctx, call, fmt, image_id):
    evicted = call(image_id)
    if fmt == 'json':
        print_json(evicted)
        return
    for volume_id in evicted:
        click.echo('evicted %s (volume %s)' % (image_id, volume_id))


def _echo_p2p(p2p):
    if not p2p.get('active'):
        click.echo('p2p:             %s' % (
            'enabled, in the service only' if p2p.get('enabled')
            else 'disabled'))
        return
    click.echo('p2p:             %s among %d peers; received %s from peers, '
               '%s from Glance; sent %s; %d bad pieces, banned: %s' % (
                   p2p['self'], len(p2p['peers']),
                   human_bytes(p2p['bytes_from_peers']),
                   human_bytes(p2p['bytes_from_glance']),
                   human_bytes(p2p['bytes_sent']), p2p['hash_failures'],
                   ', '.join(p2p['banned_peers']) or 'none'))
    for image_id, row in sorted(p2p['images'].items()):
        click.echo('  %s: %s, %s (seed %s), %d segments, %s from peers, '
                   '%s from Glance, %s sent, peers %s' % (
                       image_id, row['role'], row['state'], row['seed'],
                       row['segments'], human_bytes(row['bytes_from_peers']),
                       human_bytes(row['bytes_from_glance']),
                       human_bytes(row['bytes_sent']),
                       ', '.join(row['connected_peers']) or 'none'))


@output('status')
def status(ctx, call, fmt):
    info = call()
    if fmt == 'json':
        print_json(info)
        return
    click.echo('handlers:        %s' % ','.join(info['handlers']))
    click.echo('image source:    %s' % info['image_source'])
    nova = info['nova_image_backend']
    click.echo('nova backend:    %s (%s)' % (
        nova['backend'], 'linked bases serve it'
        if nova['linked_bases_serve'] else 'bases are regular files: '
        'volume_linking declines'))
    click.echo('base images:     %d in %s' % (info['base_images'],
                                              info['base_dir']))
    _echo_p2p(info.get('p2p') or {})
    backend = info['volume_backend']
    if not backend.get('available', True) or 'backend' not in backend:
        click.echo('volume backend:  unavailable: %s'
                   % backend.get('reason'))
        return
    click.echo('volume backend:  %s at %s, clone by %s (reflink: %s)'
               % (backend['backend'], backend.get('path'),
                  backend['clone'], 'yes' if backend['reflink'] else 'no'))
    click.echo('volumes:         %d' % info['volumes'])
    c = info['image_volume_cache']
    click.echo('image cache:     %s, %d entries (%s), %d held, %d stale; '
               'hits %d, misses %d, evictions %d' % (
                   'enabled' if c['enabled'] else 'disabled',
                   c['entries'], human_bytes(c['bytes']), c['held'],
                   c['stale'], c['events']['hit'], c['events']['miss'],
                   c['events']['evict']))


@main.command()
@pass_ctx
def serve(ctx):
    """Run the service (systemd Type=notify): init, the local API on
    [api] socket_path, cache manager passes, metrics."""
    from agent import daemon
    with handle_errors(ctx):
        sys.exit(daemon.Service(ctx.config_files, ctx.verbose).run())


@main.group()
def volume():
    """Volumes of the volume backend (block storage side)."""


@main.group()
def cache():
    """The image-volume cache (template volumes shared with block storage)."""


def _add_operations():
    groups = {'volume': volume, 'cache': cache}
    for op in operations.OPERATIONS:
        *group, name = op.cli.split()
        parent = groups[group[0]] if group else main
        parent.command(name)(_operation_command(op))


_add_operations()


if __name__ == '__main__':
    main()
