"""Disk paths of every libvirt domain, running or only defined.

A disk names its image as a file (``<source file=...>``), a block device
(``<source dev=...>``) or a volume of a storage pool (``<disk
type='volume'>``, ``<source pool=... volume=...>``). A volume is resolved
through its pool to the path libvirt gives it; a volume (or pool) that
cannot be looked up may be any base, so it is reported as a problem and a
strict scan gives up rather than guess.
"""

import xml.etree.ElementTree as ET

from agent import errors


def domain_disk_paths(uri, problems=None):
    """``[(domain_name, path), ...]`` for every disk source and backing
    store in every domain's XML (active and inactive).

    :param problems: a list; what cannot be resolved (a volume whose pool
        or volume is unknown) is appended to it. Without one, it raises
        UsageUnknown.
    """
    try:
        import libvirt
    except ImportError:
        raise errors.UsageUnknown(
            reason='libvirt-python is not installed but [libvirt] '
            'connection_uri is %r (install it, or set connection_uri to '
            'an empty value on hosts without libvirt)' % uri)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise errors.UsageUnknown(
            reason='cannot connect to libvirt at %s: %s (start libvirtd, or '
            'fix [libvirt] connection_uri)' % (uri, exc))
    found_problems = []
    volumes = {}  # (pool, volume) -> (path, None) or (None, why)

    def volume_path(pool, volume):
        if (pool, volume) not in volumes:
            try:
                vol = conn.storagePoolLookupByName(pool) \
                    .storageVolLookupByName(volume)
                volumes[(pool, volume)] = (vol.path(), None)
            except libvirt.libvirtError as exc:
                volumes[(pool, volume)] = (
                    None, exc.get_error_message() or str(exc))
        return volumes[(pool, volume)]

    try:
        paths = []
        for dom in conn.listAllDomains(0):
            try:
                name = dom.name()
                xmls = [dom.XMLDesc(0)]
                if dom.isActive() and dom.isPersistent():
                    # the definition for the next boot may have other disks
                    xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            except libvirt.libvirtError:
                continue  # undefined while we looked
            found = set()
            for xml in xmls:
                for kind, value in disk_sources_from_xml(xml):
                    if kind == 'path':
                        found.add(value)
                        continue
                    pool, volume = value
                    path, why = volume_path(pool, volume)
                    if path:
                        found.add(path)
                    else:
                        found_problems.append(
                            'domain %s has a disk on volume %r of storage '
                            'pool %r that libvirt cannot look up (%s)'
                            % (name, volume, pool, why))
            paths.extend((name, p) for p in sorted(found))
    except libvirt.libvirtError as exc:
        raise errors.UsageUnknown(reason='libvirt at %s failed: %s'
                                  % (uri, exc))
    finally:
        conn.close()
    if found_problems:
        if problems is None:
            raise errors.UsageUnknown(reason='; '.join(
                dict.fromkeys(found_problems)))
        problems.extend(dict.fromkeys(found_problems))
    return paths


def disk_sources_from_xml(xml):
    """``('path', path)`` for every file or device source, ``('volume',
    (pool, volume))`` for every storage-pool volume, of every disk and its
    backing stores in a domain XML."""
    root = ET.fromstring(xml)
    sources = []
    for disk in root.iter('disk'):
        for source in disk.iter('source'):
            for attr in ('file', 'dev'):
                if source.get(attr):
                    sources.append(('path', source.get(attr)))
            if source.get('pool') and source.get('volume'):
                sources.append(('volume', (source.get('pool'),
                                           source.get('volume'))))
    return sources


def disk_paths_from_xml(xml):
    """File and device paths named in a domain XML (volumes not
    resolved)."""
    return [v for k, v in disk_sources_from_xml(xml) if k == 'path']
