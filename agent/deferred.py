"""Modules a library imports at import time, loaded on first use instead.

oslo.config imports netaddr and rfc3986 (for its IP address and URI option
types) and stevedore (for configuration source drivers) when it is itself
imported: tens of milliseconds at every start, for option types the agent
does not declare and source drivers it does not configure. oslo.utils'
format inspector imports its LUKS decryption helpers, and with them the
``cryptography`` package (about 8 MiB of memory), which it calls only to
decrypt a LUKS image given a passphrase; the agent never gives one.

``deferring(names)`` puts a placeholder module in ``sys.modules`` for each
name while a library is imported, so the library's ``import netaddr``
binds the placeholder, then takes the placeholders out again: anything
imported later that imports one of these modules gets the real one, as
usual (submodules included). The library keeps the placeholder; the first
attribute it reads from it imports the real module (once, under a lock,
whichever thread comes first) and every read after that is answered by
the real module.

``deferring_submodule(package, name)`` does the same for ``from package
import name``, by a placeholder bound on the package while the block
runs. Names a library reads from it only for type annotations (evaluated
when a function is defined) can be answered without loading it, by a
stand-in that forwards any real use (a call, an attribute) to the real
object.
"""

import contextlib
import importlib
import sys
import threading
import types

#: what oslo.config imports at import time and uses only in a few calls
OSLO_CONFIG_DEPENDENCIES = ('netaddr', 'rfc3986', 'stevedore')

_lock = threading.RLock()
_real = {}            # name -> the real module, once loaded
_placeholders = {}    # name -> its placeholder, loaded or not


class Placeholder(types.ModuleType):
    """Stands for module ``__name__`` until something reads from it."""

    def __getattr__(self, name):
        # only for what the placeholder itself lacks: everything but the
        # plain module attributes (__name__, __doc__, __spec__ = None...)
        return getattr(_load(self), name)

    def __setattr__(self, name, value):
        # e.g. a test patching the module: it is meant for the real one
        setattr(_load(self), name, value)

    def __delattr__(self, name):
        delattr(_load(self), name)

    def __dir__(self):
        return dir(_load(self))

    def __repr__(self):
        state = 'loaded' if self.__name__ in _real else 'not loaded yet'
        return '<deferred module %r (%s)>' % (self.__name__, state)


def _load(placeholder):
    name = placeholder.__name__
    try:
        return _real[name]
    except KeyError:
        pass
    with _lock:
        if name not in _real:
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]  # used while still being placed
            _real[name] = importlib.import_module(name)
    return _real[name]


@contextlib.contextmanager
def deferring(names=OSLO_CONFIG_DEPENDENCIES):
    """While the block runs, ``import <name>`` of each of ``names`` that is
    not imported yet binds a placeholder. A module that cannot be found
    gets none, so importing it fails as it would have."""
    import importlib.util
    placed = {}
    with _lock:
        for name in names:
            if name in sys.modules or name in _real or \
                    importlib.util.find_spec(name) is None:
                continue
            placeholder = _placeholders.get(name)
            if placeholder is None:
                placeholder = Placeholder(name)
            sys.modules[name] = placed[name] = _placeholders[name] = \
                placeholder
    try:
        yield
    finally:
        with _lock:
            for name, placeholder in placed.items():
                if sys.modules.get(name) is placeholder:
                    del sys.modules[name]


class _Forward:
    """Stands for attribute ``attr`` of a placeholder's module: fine as an
    annotation or ``typing.cast`` target; a call or attribute read loads
    the module and is answered by the real object."""

    def __init__(self, placeholder, attr):
        self._placeholder = placeholder
        self._attr = attr

    def _real(self):
        return getattr(_load(self._placeholder), self._attr)

    def __call__(self, *args, **kwargs):
        return self._real()(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real(), name)

    def __repr__(self):
        return '%s.%s' % (self._placeholder.__name__, self._attr)


@contextlib.contextmanager
def deferring_submodule(package, name, annotations=()):
    """While the block runs, ``from <package> import <name>`` binds a
    placeholder of the submodule (unless it is imported already, or
    does not exist); ``annotations``: names of it read only as type
    annotations, answered by a ``_Forward`` without loading it."""
    import importlib.util
    full = '%s.%s' % (package, name)
    parent = importlib.import_module(package)
    placeholder = None
    with _lock:
        if full not in sys.modules and full not in _real and \
                not hasattr(parent, name) and \
                importlib.util.find_spec(full) is not None:
            placeholder = _placeholders.get(full)
            if placeholder is None:
                placeholder = Placeholder(full)
                for attr in annotations:
                    placeholder.__dict__[attr] = _Forward(placeholder, attr)
                _placeholders[full] = placeholder
            parent.__dict__[name] = placeholder
    try:
        yield
    finally:
        if placeholder is not None:
            with _lock:
                if parent.__dict__.get(name) is placeholder:
                    del parent.__dict__[name]


def load_all():
    """Import now every module a placeholder stands for (a process about
    to give up the right to read its libraries imports what it may use
    first: ``agent.identity``)."""
    for placeholder in list(_placeholders.values()):
        _load(placeholder)


def is_loaded(name):
    """Whether module ``name`` is really imported (by a placeholder's use
    or by an ordinary import)."""
    module = sys.modules.get(name)
    return name in _real or (module is not None and
                             not isinstance(module, Placeholder))
