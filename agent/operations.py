"""Every operation of the agent, declared once.

An ``Operation`` says:

- which method of ``agent.core.TemplateAgent`` implements it (the method
  of the same name);
- its HTTP route on the local API, and its CLI command;
- its parameters: name, type, check, whether required, help;
- whether it runs as a job (the API answers 202 and the job carries the
  result) and under which key(s) its result travels.

The API routes and validates requests from these declarations
(``agent.api``), the client calls the service through them
(``agent.client``), the CLI builds its commands' arguments from them
(``agent.cli``), and ``docs/api.md`` is generated from them
(``python -m agent.operations > docs/api.md``; a test fails when it is
stale). Adding an operation is a method on the core plus an entry in
``OPERATIONS``.
"""

import re
import sys
import urllib.parse

from agent import errors, naming

MAX_PRECACHE = 1000
MAX_VOLUME_GB = 64 * 1024
_PROJECT_ID = r'^[A-Za-z0-9_.-]{1,255}$'  # compiled on first use
_TYPE_NAMES = {str: 'a string', int: 'an integer', bool: 'true or false',
               list: 'a list'}


class BadRequest(errors.AgentError):
    message = 'Bad request: %(reason)s'
    exit_code = 2
    http_status = 400


# -- checks: raise a typed error, or return the value ------------------------
def _image_id(value):
    return naming.validate_image_id(value)


def _handler(value):
    from agent.handlers import registry
    return registry.validate(value)


def _project_id(value):
    if not re.match(_PROJECT_ID, value):
        raise BadRequest(reason='invalid project_id %r: 1 to 255 letters, '
                         'digits, ., _ or -' % value)
    return value


def _image_ids(value):
    if not 0 < len(value) <= MAX_PRECACHE:
        raise BadRequest(reason='image_ids must hold 1 to %d ids'
                         % MAX_PRECACHE)
    for image_id in value:
        if not isinstance(image_id, str):
            raise BadRequest(reason='image ids must be strings')
        naming.validate_image_id(image_id)
    return value


def _size_gb(value):
    if not 0 < value <= MAX_VOLUME_GB:
        raise BadRequest(reason='size_gb must be 1 to %d' % MAX_VOLUME_GB)
    return value


def _min_age(value):
    if value < 0:
        raise BadRequest(reason='min_age must be >= 0')
    return value


def _volume_id(value):
    if not value or '/' in value or value in ('.', '..'):
        raise BadRequest(reason='invalid volume id %r' % value)
    return value


class Param:
    """One parameter. In the route as ``{name}`` it comes from the path,
    otherwise from the JSON body.

    :param flag: the CLI option's name when it is not ``--<name>``
    :param unit: ``'seconds'`` for a duration (the CLI takes 30m, 2h, 1d)
    """

    def __init__(self, name, type, help, required=False, check=None,
                 flag=None, unit=None):
        self.name = name
        self.type = type
        self.help = help
        self.required = required
        self.check = check
        self.flag = flag or '--' + name.replace('_', '-')
        self.unit = unit

    def validate(self, value):
        if value is None:
            if self.required:
                raise BadRequest(reason='missing field %r' % self.name)
            return None
        if not isinstance(value, self.type) or (
                self.type is int and isinstance(value, bool)):
            raise BadRequest(reason='field %r must be %s'
                             % (self.name, _TYPE_NAMES[self.type]))
        return self.check(value) if self.check else value


IMAGE_ID = Param('image_id', str, 'the image id', required=True,
                 check=_image_id)
PROJECT_ID = Param('project_id', str, 'the requesting project (Glance\'s '
                   'sharing rules apply)', check=_project_id)


class Operation:
    """:param returns: the key its result travels under in the answer; a
        tuple of keys when the core returns a tuple; None when the answer
        is the result itself
    :param job: the job kind, for operations that run as jobs
    :param cli: the CLI command (``'volume create'`` for a subcommand)
    :param part: the attribute of ``TemplateAgent`` whose method it is
        (``'volumes'``: ``agent.volumes.side.VolumeSide``); None for the
        core's own
    """

    def __init__(self, name, method, route, summary, params=(),
                 returns=None, job=None, cli=None, part=None):
        self.name = name
        self.part = part
        self.method = method
        self.route = route
        self.summary = summary
        self.params = list(params)
        self.returns = returns
        self.job = job
        self.cli = cli
        self._parts = route.strip('/').split('/')
        self.path_params = [p for p in self.params
                            if '{%s}' % p.name in self._parts]
        self.body_params = [p for p in self.params
                            if p not in self.path_params]

    def implementation(self, agent):
        """The method of ``agent`` (a ``TemplateAgent``, or a
        ``ServiceClient``, which has every operation) that runs this
        operation."""
        holder = getattr(agent, self.part, agent) if self.part else agent
        return getattr(holder, self.name)

    # -- the API side ------------------------------------------------------
    def match(self, parts):
        """The path's values if ``parts`` (unquoted) fit the route."""
        if len(parts) != len(self._parts):
            return None
        values = {}
        for mine, theirs in zip(self._parts, parts):
            if mine.startswith('{'):
                values[mine[1:-1]] = theirs
            elif mine != theirs:
                return None
        return values

    def bind(self, path_values, body):
        """Validated keyword arguments from a request."""
        if not isinstance(body, dict):
            raise BadRequest(reason='the body must be a JSON object')
        unknown = set(body) - {p.name for p in self.body_params}
        if unknown:
            raise BadRequest(reason='unknown field(s): %s' %
                             ', '.join(sorted(map(str, unknown))))
        kwargs = {}
        for p in self.params:
            value = path_values[p.name] if p in self.path_params else \
                body.get(p.name)
            kwargs[p.name] = p.validate(value)
        return kwargs

    def describe(self, kwargs):
        """What a job works on, for its listing."""
        if not self.params:
            return ''
        first = kwargs[self.params[0].name]
        return '%d images' % len(first) if isinstance(first, list) else first

    def encode(self, result):
        if self.returns is None:
            return result
        if isinstance(self.returns, tuple):
            return dict(zip(self.returns, result))
        return {self.returns: result}

    # -- the client side ---------------------------------------------------
    def decode(self, payload):
        if self.returns is None:
            return payload
        if isinstance(self.returns, tuple):
            return tuple(payload[k] for k in self.returns)
        return payload[self.returns]

    def request(self, args, kwargs):
        """``(method, path, body)`` for a call with these arguments."""
        names = [p.name for p in self.params]
        if len(args) > len(names):
            raise TypeError('%s takes %d arguments' % (self.name, len(names)))
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError('%s: unexpected argument %r'
                                % (self.name, name))
            values[name] = value
        parts = []
        for part in self._parts:
            if part.startswith('{'):
                part = urllib.parse.quote(str(values[part[1:-1]]), safe='')
            parts.append(part)
        body = {p.name: values[p.name] for p in self.body_params
                if values.get(p.name) is not None}
        return (self.method, '/' + '/'.join(parts),
                body if self.method == 'POST' else None)


OPERATIONS = [
    Operation('status', 'GET', '/v1/status',
              'Handlers, image source, volume backend, cache counts.',
              cli='status'),
    Operation('list_images', 'GET', '/v1/images',
              'Every base image with handler, sizes, users and last use; '
              'sources of usage that could not be read become warnings.',
              returns=('images', 'warnings'), cli='list'),
    Operation('show_image', 'GET', '/v1/images/{image_id}',
              'One base image.', [IMAGE_ID], cli='show'),
    Operation('fetch_image', 'POST', '/v1/images/{image_id}/fetch',
              'Prepare the base image (idempotent); the result is its '
              'path.',
              [IMAGE_ID,
               Param('handler', str, 'use only this handler',
                     check=_handler),
               PROJECT_ID],
              returns='path', job='fetch', cli='fetch'),
    Operation('remove_image', 'DELETE', '/v1/images/{image_id}',
              'Remove a base image; refused (409) while it is in use.',
              [IMAGE_ID], cli='remove'),
    Operation('prune', 'POST', '/v1/prune',
              'Remove unused base images older than the minimum age.',
              [Param('dry_run', bool, 'only say what would go'),
               Param('min_age', int, 'remove unused bases older than this '
                     'instead of the configured minimum ages',
                     check=_min_age, unit='seconds')],
              cli='prune'),
    Operation('precache', 'POST', '/v1/precache',
              "Prepare several images, as nova's cache_images; per image "
              'cached, existing, unsupported or error.',
              [Param('image_ids', list, 'image ids', required=True,
                     check=_image_ids)],
              returns='images', job='precache', cli='precache'),
    Operation('init', 'POST', '/v1/init',
              'Re-prepare base images after a restart: clean up, re-link.',
              cli='init'),
    Operation('reclaim_leftovers', 'POST', '/v1/reclaim',
              'Delete what killed processes left half made: temporary '
              'files of dead writers, volumes their creator never '
              'finished, orphan templates (init and the manager pass do it '
              'too).', cli='reclaim'),
    Operation('cache_list', 'GET', '/v1/cache',
              'Image-volume cache entries with holders and freshness.',
              returns='entries', cli='cache list', part='volumes'),
    Operation('cache_evict', 'DELETE', '/v1/cache/{image_id}',
              'Evict the cache entry of an image; refused (409) while it '
              'is held.', [IMAGE_ID], returns='evicted', cli='cache evict',
              part='volumes'),
    Operation('list_volumes', 'GET', '/v1/volumes',
              "The volume backend's volumes, templates included.",
              returns='volumes', cli='volume list', part='volumes'),
    Operation('create_volume', 'POST', '/v1/volumes',
              'A volume holding an image: a copy-on-write clone of its '
              'cached template. The result is the volume id.',
              [Param('image_id', str, 'the image to hold', required=True,
                     check=_image_id, flag='--image'),
               Param('size_gb', int, 'size in GiB', required=True,
                     check=_size_gb, flag='--size'),
               PROJECT_ID],
              returns='volume_id', job='volume-create', cli='volume create',
              part='volumes'),
    Operation('delete_volume', 'DELETE', '/v1/volumes/{volume_id}',
              'Delete a volume (not a cache template: evict it).',
              [Param('volume_id', str, 'the volume id', required=True,
                     check=_volume_id)],
              cli='volume delete', part='volumes'),
]
BY_NAME = {op.name: op for op in OPERATIONS}


# -- the API reference --------------------------------------------------------
SERVICE_ROUTES = [
    ('GET', '/v1/health', 'Liveness, and whether the service is stopping.'),
    ('GET', '/metrics', 'Prometheus text.'),
    ('GET', '/v1/jobs/{id}?wait=<seconds>',
     "A job's state, progress and, once done, its result or error; waits "
     'up to 60 s for it to end.'),
    ('DELETE', '/v1/jobs/{id}',
     'Cancel a running job: it stops within a second, even while its '
     'source sends nothing, and rolls back (state `cancelled`, nothing '
     'published); 202 while it stops, 200 once done.'),
]


def reference():
    """docs/api.md, in Markdown."""
    out = [
        '# API reference',
        '',
        '<!-- generated by `python -m agent.operations > docs/api.md`; '
        'do not edit -->',
        '',
        'HTTP/1.1 with JSON bodies on the Unix socket `[api] socket_path`. '
        'A peer must be root, the service\'s own user, or a member of '
        '`[api] allowed_groups`. Errors answer '
        '`{"error": {"type", "message", "exit_code"}}` with 400 (bad '
        'request), 403, 404 (unknown image, base, volume, path), 405, 408, '
        '409 (in use, held, an unsafe path in instances_path), 422 (image '
        'refused), 502 (source failed), '
        '503 (usage unknown, backend or service unavailable) or 507 (no '
        'space).',
        '',
        'Operations marked *job* answer 202 with a job '
        '(`{"id", "kind", "target", "state", "progress", "result", '
        '"error"}`); follow it with `GET /v1/jobs/{id}?wait=<seconds>` '
        'until its state is `succeeded` or `failed`. Its `progress` is '
        '`{"done", "total"}` (bytes, or images for `precache`), with '
        '`"sources": {"peers", "glance"}` (bytes read from each) when the '
        'fetch comes through the peer-to-peer swarm.',
        '',
        '| method | path | CLI | what |',
        '|---|---|---|---|',
    ]
    for op in OPERATIONS:
        out.append('| %s | `%s` | `%s` | %s%s |' % (
            op.method, op.route, op.cli, '*job*: ' if op.job else '',
            op.summary))
    for method, route, summary in SERVICE_ROUTES:
        out.append('| %s | `%s` | | %s |' % (method, route, summary))
    for op in OPERATIONS:
        out += ['', '## %s `%s`' % (op.method, op.route), '',
                op.summary, '']
        if op.params:
            out += ['| parameter | in | type | required | what |',
                    '|---|---|---|---|---|']
            for p in op.params:
                out.append('| `%s` | %s | %s | %s | %s |' % (
                    p.name, 'path' if p in op.path_params else 'body',
                    p.type.__name__, 'yes' if p.required else 'no', p.help))
            out.append('')
        if isinstance(op.returns, tuple):
            result = 'an object with ' + ', '.join(
                '`%s`' % k for k in op.returns)
        elif op.returns:
            result = 'the result under `%s`' % op.returns
        else:
            result = 'an object'
        where = 'The finished job carries' if op.job else 'The answer is'
        out.append('%s %s. CLI: `template-agent %s`.' % (where, result,
                                                          op.cli))
    return '\n'.join(out) + '\n'


if __name__ == '__main__':
    sys.stdout.write(reference())
