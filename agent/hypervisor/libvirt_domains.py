"""Disk paths of every libvirt domain, running or only defined."""

import xml.etree.ElementTree as ET

from agent import errors


def domain_disk_paths(uri):
    """``[(domain_name, path), ...]`` for every disk source and backing
    store in every domain's XML (active and inactive)."""
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
    try:
        paths = []
        for dom in conn.listAllDomains(0):
            try:
                xmls = [dom.XMLDesc(0)]
                if dom.isActive() and dom.isPersistent():
                    # the definition for the next boot may have other disks
                    xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            except libvirt.libvirtError:
                continue  # undefined while we looked
            found = {p for xml in xmls for p in disk_paths_from_xml(xml)}
            paths.extend((dom.name(), p) for p in sorted(found))
        return paths
    except libvirt.libvirtError as exc:
        raise errors.UsageUnknown(reason='libvirt at %s failed: %s'
                                  % (uri, exc))
    finally:
        conn.close()


def disk_paths_from_xml(xml):
    root = ET.fromstring(xml)
    paths = []
    for disk in root.iter('disk'):
        for source in disk.iter('source'):
            for attr in ('file', 'dev'):
                if source.get(attr):
                    paths.append(source.get(attr))
    return paths
