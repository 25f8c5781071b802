"""Prometheus metrics, in the text exposition format, without a dependency.

Counters live in this process (the service); gauges about base images are
computed when scraped. Names carry the ``template_agent_`` prefix, base
units, and ``_total`` for counters.
"""

import os
import threading

DEFINITIONS = {
    'template_agent_fetches_total':
        ('counter', 'Base image preparations by handler and result.'),
    'template_agent_downloaded_bytes_total':
        ('counter', 'Image bytes received from the image source.'),
    'template_agent_download_seconds_total':
        ('counter', 'Seconds spent receiving image bytes.'),
    'template_agent_image_volume_cache_events_total':
        ('counter', 'Image-volume cache hits, misses and evictions (and, with '
                    '[cinder] glance_locations, Glance locations added, '
                    'removed or refused).'),
    'template_agent_links_restored_total':
        ('counter', 'Linked base images restored by init.'),
    'template_agent_manager_passes_total':
        ('counter', 'Cache manager passes run.'),
    'template_agent_manager_removed_bases_total':
        ('counter', 'Base images removed by cache manager passes.'),
    'template_agent_manager_reclaimed_bytes_total':
        ('counter', 'Disk bytes reclaimed by cache manager passes.'),
    'template_agent_base_images':
        ('gauge', 'Base images in _base, by whether they are in use.'),
    'template_agent_base_image_bytes':
        ('gauge', 'Disk bytes taken by base images in _base.'),
    'template_agent_api_requests_total':
        ('counter', 'Local API requests by method and status.'),
    'template_agent_api_connections_refused_total':
        ('counter', 'Local API connections refused, by the [api] cap that '
                    'was full.'),
    'template_agent_p2p_received_bytes_total':
        ('counter', 'Image bytes received for shared images, by source '
                    '(peers or glance).'),
    'template_agent_p2p_sent_bytes_total':
        ('counter', 'Image bytes sent to peers.'),
    'template_agent_p2p_fallbacks_total':
        ('counter', 'Shared images that went on from Glance, by reason.'),
    'template_agent_p2p_hash_failures_total':
        ('counter', 'Pieces from peers that failed their hash check.'),
    'template_agent_p2p_banned_peers_total':
        ('counter', 'Peers banned for sending bad pieces.'),
    'template_agent_p2p_images':
        ('gauge', 'Images shared with peers, by role (seed or peer) and '
                  'state (fetching, seeding, failed).'),
    'template_agent_p2p_peers':
        ('gauge', 'Agents of the peer set besides this one, and those '
                  'connected now.'),
    'template_agent_p2p_refused_total':
        ('counter', 'Connections refused: no valid certificate, or not a '
                    'peer.'),
}


def _labels(labels):
    if not labels:
        return ''
    return '{%s}' % ','.join(
        '%s="%s"' % (k, str(v).replace('\\', '\\\\').replace('"', '\\"')
                     .replace('\n', '\\n'))
        for k, v in sorted(labels.items()))


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._values = {}

    def inc(self, name, value=1, **labels):
        assert name in DEFINITIONS, name
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def value(self, name, **labels):
        return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def render(self, gauges=()):
        """The exposition text; ``gauges``: ``[(name, labels, value)]``
        computed by the caller at scrape time."""
        with self._lock:
            samples = [(n, dict(labels), v)
                       for (n, labels), v in self._values.items()]
        samples.extend(gauges)
        lines = []
        for name in sorted({s[0] for s in samples}):
            kind, text = DEFINITIONS[name]
            lines.append('# HELP %s %s' % (name, text))
            lines.append('# TYPE %s %s' % (name, kind))
            for _, labels, value in sorted(
                    (s for s in samples if s[0] == name),
                    key=lambda s: sorted(s[1].items())):
                lines.append('%s%s %s' % (name, _labels(labels),
                                          repr(float(value))
                                          if isinstance(value, float)
                                          else value))
        return '\n'.join(lines) + '\n'


REGISTRY = Registry()


def write_textfile(path, text):
    """Atomically replace ``path`` (node_exporter reads it any time)."""
    tmp = '%s.%d.tmp' % (path, os.getpid())
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)
