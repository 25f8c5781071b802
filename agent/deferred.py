"""Modules a library imports at import time, loaded on first use instead.

oslo.config imports netaddr and rfc3986 (for its IP address and URI option
types) and stevedore (for configuration source drivers) when it is itself
imported: tens of milliseconds at every start, for option types the agent
does not declare and source drivers it does not configure.

``deferring(names)`` puts a placeholder module in ``sys.modules`` for each
name while a library is imported, so the library's ``import netaddr``
binds the placeholder, then takes the placeholders out again: anything
imported later that imports one of these modules gets the real one, as
usual (submodules included). The library keeps the placeholder; the first
attribute it reads from it imports the real module (once, under a lock,
whichever thread comes first) and every read after that is answered by
the real module.
"""

import contextlib
import importlib
import sys
import threading
import types

#: what oslo.config imports at import time and uses only in a few calls
OSLO_CONFIG_DEPENDENCIES = ('netaddr', 'rfc3986', 'stevedore')

_lock = threading.RLock()
_real = {}


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
            sys.modules[name] = placed[name] = Placeholder(name)
    try:
        yield
    finally:
        with _lock:
            for name, placeholder in placed.items():
                if sys.modules.get(name) is placeholder:
                    del sys.modules[name]


def is_loaded(name):
    """Whether module ``name`` is really imported (by a placeholder's use
    or by an ordinary import)."""
    module = sys.modules.get(name)
    return name in _real or (module is not None and
                             not isinstance(module, Placeholder))
