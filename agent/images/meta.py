"""Image metadata, shaped like a Glance v2 image record."""

import dataclasses


@dataclasses.dataclass
class ImageMeta:
    id: str
    name: str = ''
    status: str = 'active'
    disk_format: str = 'raw'
    container_format: str = 'bare'
    size: int = None
    virtual_size: int = None
    checksum: str = None
    os_hash_algo: str = None
    os_hash_value: str = None
    owner: str = None
    visibility: str = 'shared'
    updated_at: str = None
    created_at: str = None
    locations: list = dataclasses.field(default_factory=list)
    properties: dict = dataclasses.field(default_factory=dict)

    _FIELDS = ('id', 'name', 'status', 'disk_format', 'container_format',
               'size', 'virtual_size', 'checksum', 'os_hash_algo',
               'os_hash_value', 'owner', 'visibility', 'updated_at',
               'created_at')

    @classmethod
    def from_glance(cls, record):
        """Build from a Glance v2 ``GET /v2/images/{id}`` body."""
        if not isinstance(record, dict) or not isinstance(record.get('id'),
                                                          str):
            raise ValueError('image record without an id')
        kwargs = {k: record.get(k) for k in cls._FIELDS if k in record}
        kwargs['locations'] = [
            loc.get('url') for loc in record.get('locations') or []
            if isinstance(loc, dict) and loc.get('url')]
        if record.get('direct_url') and record['direct_url'] not in \
                kwargs['locations']:
            kwargs['locations'].append(record['direct_url'])
        kwargs['properties'] = {k: v for k, v in record.items()
                                if k not in cls._FIELDS and
                                k not in ('locations', 'direct_url')}
        for key in ('size', 'virtual_size'):
            value = kwargs.get(key)
            if value is not None and (not isinstance(value, int) or
                                      isinstance(value, bool) or value < 0):
                raise ValueError(f'{key} is not a non-negative integer')
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def to_glance(self):
        record = {k: getattr(self, k) for k in self._FIELDS}
        record.update(self.properties)
        record['locations'] = [{'url': u, 'metadata': {}}
                               for u in self.locations]
        return record

    @property
    def expected_hash(self):
        """``(algo, hexdigest)`` to verify the bits against, or None.

        Glance's multihash (``os_hash_algo``/``os_hash_value``) wins over the
        legacy md5 ``checksum``, as in glance_store and nova.
        """
        if self.os_hash_algo and self.os_hash_value:
            return self.os_hash_algo, self.os_hash_value.lower()
        if self.checksum:
            return 'md5', self.checksum.lower()
        return None

    @property
    def volume_location(self):
        """The volume id of the first ``cinder://[<store>/]<volume-id>``
        location, or None."""
        for url in self.locations or []:
            if isinstance(url, str) and url.startswith('cinder://'):
                volume_id = url[len('cinder://'):].rstrip('/').split('/')[-1]
                if volume_id:
                    return volume_id
        return None
