"""Find handlers by short name: built-in ones and the entry point group
``template_agent.handlers`` (so a third party can add one)."""

import importlib

from agent import errors

ENTRY_POINT_GROUP = 'template_agent.handlers'
BUILTIN = {
    'downloading':
        'agent.handlers.downloading:DownloadingTemplateImageHandler',
    'volume_linking':
        'agent.handlers.volume_linking:VolumeLinkingTemplateImageHandler',
}

#: the handler that manages plain files in ``_base``: bases nova made are
#: adopted as its own
FILE_HANDLER = 'downloading'


def _entry_points():
    # importlib.metadata (and the zipfile, email and pathlib machinery it
    # pulls in) only when a name is not a built-in handler's
    from importlib import metadata
    try:
        return {ep.name: ep for ep in
                metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except TypeError:  # Python < 3.10
        return {ep.name: ep for ep in
                metadata.entry_points().get(ENTRY_POINT_GROUP, [])}


def available():
    return sorted(set(BUILTIN) | set(_entry_points()))


def validate(name):
    """``name`` if a handler is registered under it (without importing
    it); UnknownHandler if none."""
    if name in BUILTIN or name in _entry_points():
        return name
    raise errors.UnknownHandler(name=name, valid=', '.join(available()))


def load(name):
    """The handler class registered as ``name``; UnknownHandler if none."""
    if name in BUILTIN:
        module, _, attr = BUILTIN[name].partition(':')
        return getattr(importlib.import_module(module), attr)
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    raise errors.UnknownHandler(name=name, valid=', '.join(available()))


def uses_volumes(name):
    """Whether the handler ``name`` works with volumes."""
    return getattr(load(name), 'uses_volumes', False)
