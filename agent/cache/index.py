"""The base-image index: what the agent knows about each file in ``_base``.

Kept in a diskcache under ``state_path`` (safe across threads and
processes). ``_base`` stays the truth: ``TemplateAgent.reconcile`` adopts
nova-made files and drops entries whose file is gone.
"""

import os
import time

import diskcache


class BaseImage:
    """What the index records of one base (a plain class: a dataclass
    costs its generated methods' compilation at every start)."""

    #: the fields, in order (``to_dict`` keys, positional arguments)
    FIELDS = ('filename', 'image_id', 'handler', 'source', 'size_bytes',
              'virtual_size', 'disk_format', 'hash_algo', 'hash_value',
              'image_updated_at', 'created', 'last_used', 'adopted',
              'target',      # the device a linked base points to
              'volume_id',   # the volume a linked base comes from
              'backend',     # that volume's backend
              'origin')      # 'location' or 'cache' for linked bases

    def __init__(self, filename, image_id=None, handler='downloading',
                 source=None, size_bytes=0, virtual_size=None,
                 disk_format=None, hash_algo=None, hash_value=None,
                 image_updated_at=None, created=None, last_used=None,
                 adopted=False, target=None, volume_id=None, backend=None,
                 origin=None):
        self.filename = filename
        self.image_id = image_id
        self.handler = handler
        self.source = source
        self.size_bytes = size_bytes
        self.virtual_size = virtual_size
        self.disk_format = disk_format
        self.hash_algo = hash_algo
        self.hash_value = hash_value
        self.image_updated_at = image_updated_at
        self.created = created
        self.last_used = last_used
        self.adopted = adopted
        self.target = target
        self.volume_id = volume_id
        self.backend = backend
        self.origin = origin

    def _values(self):
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None

    def __repr__(self):
        return 'BaseImage(%s)' % ', '.join(
            '%s=%r' % (name, getattr(self, name)) for name in self.FIELDS)

    def to_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, data):
        return cls(**{k: v for k, v in data.items() if k in cls.FIELDS})


class BaseImageIndex:
    def __init__(self, state_path):
        os.makedirs(state_path, exist_ok=True)
        self.cache = diskcache.Cache(os.path.join(state_path, 'base-index'),
                                     eviction_policy='none',
                                     size_limit=2 ** 40)

    def close(self):
        self.cache.close()

    def get(self, filename):
        data = self.cache.get('base:' + filename)
        return BaseImage.from_dict(data) if data else None

    def put(self, entry):
        self.cache.set('base:' + entry.filename, entry.to_dict())

    def delete(self, filename):
        self.cache.delete('base:' + filename)

    def all(self):
        entries = []
        for key in list(self.cache.iterkeys()):
            if isinstance(key, str) and key.startswith('base:'):
                entry = self.get(key[5:])
                if entry:
                    entries.append(entry)
        return entries

    def touch(self, filename, when=None):
        entry = self.get(filename)
        if entry:
            entry.last_used = when or time.time()
            self.put(entry)
