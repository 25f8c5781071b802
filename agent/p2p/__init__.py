"""Peer-to-peer distribution of image bytes between the agents of a peer
set (``[p2p]``), so N hypervisors cost Glance one download, not N.

- ``rendezvous``: which agent seeds which image (rendezvous hashing of the
  image id over ``[p2p] peers``; every agent computes the same order).
- ``manifest``: what a seed publishes per image while it downloads it:
  one BitTorrent v2 torrent per segment, in order.
- ``listener``: the manifest over HTTPS with client certificates (mTLS),
  server and client.
- ``swarm``: the libtorrent session, the seed's tee of its Glance stream
  into segments, and the stream an other agent reads from the swarm.

Nothing here verifies or publishes an image: the swarm is only an
``ImageSource`` for the one download sequence (``agent.images.download``),
which hashes every byte against the image's hash, read from Glance by
this agent itself, before the handler publishes anything. A peer, or the
seed, that sends wrong bytes makes that check fail, and the handler
downloads from Glance alone.
"""
