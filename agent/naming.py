"""Names of base images, as nova's ``imagecache.get_cache_fname``.

A base for image id ``X`` is ``_base/<sha1(X)>``; a resized variant is
``<sha1>_<size>``. Temporary files use nova's suffixes ``.part`` (download)
and ``.converted`` (conversion) and are only written under the image lock.
"""

import re

# compiled on first use (re caches them)
_IMAGE_ID = r'^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$'
_BASE_NAME = r'^(?P<sha1>[0-9a-f]{40})(?:_(?P<size>[0-9]+))?$'
TEMP_SUFFIXES = ('.part', '.converted')


def validate_image_id(image_id):
    """Return ``image_id`` if it is safe as a name; raise InvalidImageId."""
    from agent import errors
    if not isinstance(image_id, str) or not image_id:
        raise errors.InvalidImageId(image_id=image_id, reason='empty')
    if '/' in image_id or '\\' in image_id or '\0' in image_id:
        raise errors.InvalidImageId(image_id=image_id,
                                    reason='it contains a path separator')
    if image_id in ('.', '..') or '..' in image_id:
        raise errors.InvalidImageId(image_id=image_id,
                                    reason="it contains '..'")
    if not re.match(_IMAGE_ID, image_id):
        raise errors.InvalidImageId(image_id=image_id,
                                    reason='it contains unexpected characters')
    return image_id


def base_filename(image_id):
    """nova's cache file name: the sha1 hex digest of the image id."""
    import hashlib
    return hashlib.sha1(image_id.encode('utf-8')).hexdigest()


def parse_base_filename(name):
    """``(sha1, resized_size or None)`` for a base name, else None."""
    m = re.match(_BASE_NAME, name)
    if not m:
        return None
    size = m.group('size')
    return m.group('sha1'), int(size) if size is not None else None


def temp_filenames(filename):
    return [filename + suffix for suffix in TEMP_SUFFIXES]


def temp_owner(name):
    """The base name a temporary file belongs to, else None."""
    for suffix in TEMP_SUFFIXES:
        if name.endswith(suffix):
            owner = name[:-len(suffix)]
            return owner if parse_base_filename(owner) else None
    return None
