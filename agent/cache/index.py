"""The base-image index: what the agent knows about each file in ``_base``.

Kept in a diskcache under ``state_path`` (safe across threads and
processes). ``_base`` stays the truth: ``TemplateAgent.reconcile`` adopts
nova-made files and drops entries whose file is gone.
"""

import dataclasses
import os
import time

import diskcache



@dataclasses.dataclass
class BaseImage:
    filename: str
    image_id: str = None
    handler: str = 'downloading'
    source: str = None
    size_bytes: int = 0
    virtual_size: int = None
    disk_format: str = None
    hash_algo: str = None
    hash_value: str = None
    image_updated_at: str = None
    created: float = None
    last_used: float = None
    adopted: bool = False
    target: str = None          # the device a linked base points to
    volume_id: str = None       # the volume a linked base comes from
    backend: str = None         # that volume's backend
    origin: str = None          # 'location' or 'cache' for linked bases

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
