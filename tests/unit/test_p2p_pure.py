"""Peer-to-peer pure logic: seed election and manifest checks."""

import base64

import pytest

from agent import config, errors
from agent.p2p import listener, manifest, rendezvous

PEERS = ['10.0.0.%d:9395' % i for i in range(1, 9)]


def test_every_agent_elects_the_same_seed_whatever_the_list_order():
    for n in range(50):
        image_id = 'image-%d' % n
        assert rendezvous.order(image_id, PEERS) == \
            rendezvous.order(image_id, list(reversed(PEERS)))


def test_seeds_spread_over_the_peers():
    firsts = [rendezvous.order('image-%d' % n, PEERS)[0]
              for n in range(800)]
    counts = [firsts.count(p) for p in PEERS]
    assert min(counts) > 60 and max(counts) < 140, counts


def test_removing_a_peer_moves_only_its_images():
    fewer = PEERS[:-1]
    for n in range(200):
        image_id = 'image-%d' % n
        before = rendezvous.order(image_id, PEERS)
        after = rendezvous.order(image_id, fewer)
        if before[0] != PEERS[-1]:
            assert after[0] == before[0]
        else:
            assert after[0] == before[1]  # the next in order takes over


def _doc(count=3, **changes):
    seed = manifest.Manifest('img', 10, 4)
    for index, (offset, length) in enumerate(
            manifest.layout(10, 4)[:count]):
        seed.add(manifest.Segment(index, offset, length, b'torrent%d'
                                  % index))
    doc = seed.document()
    doc.update(changes)
    return doc


def test_a_manifest_that_fits_is_read():
    segments, complete, failed = manifest.parse(_doc(), 'img', 10, 0)
    assert [(s.offset, s.length) for s in segments] == [(0, 4), (4, 4),
                                                        (8, 2)]
    assert segments[2].torrent == b'torrent2'
    assert complete and not failed
    segments, complete, _ = manifest.parse(_doc(count=1), 'img', 10, 0)
    assert len(segments) == 1 and not complete


@pytest.mark.parametrize('changes', [
    {'image_id': 'other'}, {'size': 11}, {'segment_size': 0},
    {'segment_size': True}, {'segment_size': 1 << 40},
    {'segments': [{'index': 1, 'offset': 4, 'length': 4, 'torrent': ''}]},
    {'segments': [{'index': 0, 'offset': 0, 'length': 5, 'torrent': ''}]},
    {'segments': [{'index': 0, 'offset': 0, 'length': 4,
                   'torrent': '!!'}]},
    {'segments': [{'index': 0, 'offset': 0, 'length': 4}]},
    {'segments': [{'index': 0, 'offset': 0, 'length': 4, 'torrent':
                   'A' * (4 * manifest.MAX_TORRENT_BYTES)}]},
    {'segments': []},  # complete, with nothing
    {'segments': None},
])
def test_a_manifest_that_does_not_fit_is_refused(changes):
    with pytest.raises(manifest.BadManifest):
        manifest.parse(_doc(**changes), 'img', 10, 0)


def test_a_manifest_is_read_from_where_the_reader_is():
    doc = manifest.Manifest('img', 10, 4)
    for index, (offset, length) in enumerate(manifest.layout(10, 4)):
        doc.add(manifest.Segment(index, offset, length, b't'))
    later = doc.document(since=2)
    assert [s['index'] for s in later['segments']] == [2]
    segments, complete, _ = manifest.parse(later, 'img', 10, 2)
    assert segments[0].index == 2 and complete
    assert base64.b64decode(later['segments'][0]['torrent']) == b't'


def test_too_many_segments_are_refused_by_the_seed():
    with pytest.raises(ValueError):
        manifest.Manifest('img', (manifest.MAX_SEGMENTS + 1) * 4, 4)


@pytest.mark.parametrize('value', ['10.0.0.1', ':9395', 'h:0', 'h:65535',
                                   'h:x', ''])
def test_addresses_must_be_host_and_port(value):
    with pytest.raises(errors.ConfigError):
        listener.split_address(value, '[p2p] listen')


def test_enabled_without_credentials_says_what_is_missing():
    conf = config.load([], overrides={'p2p': {'enabled': True}})
    with pytest.raises(errors.ConfigError, match=r'\[p2p\] ca_file'):
        listener.tls_context(conf, server=True)


def test_huge_images_get_larger_segments_and_pieces():
    from agent.p2p.swarm import _piece_size
    mib = 1 << 20
    assert manifest.segment_size_for(10 * mib, 32 * mib) == 32 * mib
    big = manifest.segment_size_for(100 * 1024 * mib, 32 * mib)
    assert big == 128 * mib
    assert len(manifest.layout(100 * 1024 * mib, big)) <= \
        manifest.MAX_SEGMENTS
    assert [_piece_size(n * mib) for n in (1, 3, 4, 32, 128)] == \
        [mib, mib, mib, mib, 4 * mib]
