"""Rendezvous (highest random weight) hashing: the agents of a peer set
agree on the seed of an image without talking to each other.

Each peer scores ``sha256(peer NUL image_id)``; the highest score seeds,
the next takes over when it cannot be reached. Adding or removing a peer
moves only the images whose first choice it is (about 1/N of them).
"""

import hashlib


def score(peer, image_id):
    return hashlib.sha256(('%s\0%s' % (peer, image_id)).encode()).digest()


def order(image_id, peers):
    """``peers`` from first to last choice to seed ``image_id``."""
    return sorted(set(peers), key=lambda p: score(p, image_id),
                  reverse=True)
