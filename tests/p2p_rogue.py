"""A compromised agent of the peer set, for the attacker tests: it holds a
valid certificate and runs the agent's own swarm code, but lies.

``--mode liar-seed``: acts as the seed of the image and shares bytes
that are not the image (its torrents match its bytes, so only the whole
image's hash can tell); with ``--wrong-size`` its manifest also claims
another size. ``--mode corrupt-peer``: follows the real seed's manifest
and offers every segment at once (``seed_mode``: "I have it all"), with
wrong bytes, to every peer.

Runs until killed; prints ``ready`` once it serves.
"""

import argparse
import dataclasses
import os
import random
import sys
import time

from agent import config
from agent.images.glance import GlanceImageSource
from agent.images.sources import DataStream
from agent.p2p import listener, manifest as manifests
from agent.p2p.swarm import Swarm, _Shared


class GarbageSource:
    """Bytes that are not the image, as an image source."""
    name = 'garbage'

    def __init__(self, size):
        self.size = size

    def open(self, image, offset=0):
        rnd = random.Random(13)

        def chunks():
            position = offset
            while position < self.size:
                n = min(1 << 20, self.size - position)
                yield rnd.randbytes(n)
                position += n
        return DataStream(chunks(), offset)


def liar_seed(swarm, image, wrong_size):
    if wrong_size:
        image = dataclasses.replace(image, size=image.size + 4096)
    with swarm.share(image, GarbageSource(image.size)) as source:
        for _ in source.open(image, 0):
            pass
        print('ready', flush=True)
        while True:
            time.sleep(1)


def corrupt_peer(swarm, image, seed):
    # libtorrent checks a seed_mode piece before it first sends it: this
    # setting (for tests only) lets the rogue send its wrong bytes
    swarm.session.apply_settings({'disable_hash_checks': True})
    directory = os.path.join(swarm.work_dir, 'rogue')
    os.makedirs(directory, exist_ok=True)
    shared = _Shared(image, 'peer', directory, swarm.segment_size, seed)
    since = 0
    print('ready', flush=True)
    while True:
        try:
            doc = listener.fetch_manifest(swarm.client_tls, seed, image.id,
                                          since, 2)
        except (listener.NotShared, listener.PeerUnavailable):
            time.sleep(0.2)
            continue
        segments, complete, _ = manifests.parse(doc, image.id, image.size,
                                                since)
        for segment in segments:
            path = os.path.join(directory,
                                manifests.segment_name(segment.index))
            with open(path, 'wb') as f:
                f.write(random.Random(segment.index).randbytes(
                    segment.length))
            handle = swarm._add_torrent(shared, segment, seed=True)
            swarm._connect(handle)
        since += len(segments)
        if complete:
            break
    while True:
        with shared.changed:
            handles = list(shared.handles.values())
        for handle in handles:
            swarm._connect(handle)
        time.sleep(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--config-file', required=True)
    parser.add_argument('--image-id', required=True)
    parser.add_argument('--mode', choices=['liar-seed', 'corrupt-peer'])
    parser.add_argument('--seed', help='the real seed (corrupt-peer)')
    parser.add_argument('--wrong-size', action='store_true')
    args = parser.parse_args()
    conf = config.load([args.config_file])
    swarm = Swarm(conf)
    swarm.start()
    image = GlanceImageSource(conf).get(args.image_id)
    if args.mode == 'liar-seed':
        liar_seed(swarm, image, args.wrong_size)
    else:
        corrupt_peer(swarm, image, args.seed)


if __name__ == '__main__':
    sys.exit(main())
