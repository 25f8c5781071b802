"""Peer-to-peer distribution between real agents, each in its own network
namespace (veth, a bridge, ``tc`` rate limits), with the Glance stand-in in
a namespace of its own (Glance's upload capped well below the hosts'
links, as in a cloud whose image store is the bottleneck).

Every test checks the bases byte for byte against the image, and the
namespaces and agents are removed even when it fails.
"""

import hashlib
import os
import random
import shutil
import socket
import ssl

import pytest

from agent import naming
from agent.p2p import rendezvous
from tests import netns
from tests.glance_standin import GlanceStandIn

MiB = 1024 * 1024
IMAGE_MIB = 32


@pytest.fixture(scope='module')
def certs(tmp_path_factory):
    if not shutil.which('openssl'):
        pytest.fail('openssl is missing (apt-get install openssl)')
    return netns.make_certificates(str(tmp_path_factory.mktemp('certs')))


@pytest.fixture(scope='module')
def image_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('p2p-image') / 'disk.raw')
    with open(path, 'wb') as f:
        f.write(random.Random(7).randbytes(IMAGE_MIB * MiB))
    return path


@pytest.fixture
def cluster(request):
    """``make(n)``: a network of ``n`` hosts and a Glance stand-in in it;
    everything is torn down in ``finally``."""
    made = []

    def make(n, glance_mbit=160, host_mbit=800):
        net = netns.Network(n, glance_mbit, host_mbit)
        made.append(net)
        net.__enter__()
        with netns.entered(net.glance_ns):
            glance = GlanceStandIn(host=net.glance_ip)
        glance.__enter__()
        made.append(glance)
        return net, glance
    try:
        yield make
    finally:
        errors = []
        for thing in reversed(made):
            try:
                thing.__exit__(None, None, None)
            except Exception as exc:
                errors.append(exc)
        for thing in made:
            if isinstance(thing, netns.Network):
                assert not thing.exists(), 'namespaces left behind'
        assert not errors, errors


def image_id_seeded_by(peers, index, exclude=()):
    """An image id whose rendezvous order starts with ``peers[index]``
    (and whose first choices avoid ``exclude``)."""
    for n in range(10000):
        image_id = '00000000-0000-4000-8000-%012d' % n
        order = rendezvous.order(image_id, peers)
        if order[0] == peers[index] and not set(order[:2]) & set(exclude):
            return image_id
    raise AssertionError('no such image id')


def sha512(path):
    h = hashlib.sha512()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(MiB), b''):
            h.update(chunk)
    return h.hexdigest()


def assert_bases_exact(agents, image_id, image_file, envs=None):
    want = sha512(image_file)
    for env in envs or agents.envs:
        base = os.path.join(env.base_dir, naming.base_filename(image_id))
        assert os.path.isfile(base), '%s: no base' % env.namespace
        assert sha512(base) == want, '%s: base differs' % env.namespace


def assert_fetched(results, agents):
    for ns, (code, out, _) in results.items():
        env = [e for e in agents.envs if e.namespace == ns][0]
        assert code == 0, '%s: %s\n%s' % (ns, out, agents.log(env))


def test_four_hosts_glance_serves_the_image_once(cluster, certs, image_file,
                                                  tmp_path):
    net, glance = cluster(4)
    image_id = glance.add('1b4f0e98-0000-4000-8000-000000000004',
                          image_file)['id']
    with netns.PeerAgents(tmp_path, net, glance.url, certs) as agents:
        results = agents.fetch_all(image_id)
        assert_fetched(results, agents)
        assert_bases_exact(agents, image_id, image_file)
        served = glance.bytes_served.get(image_id, 0)
        assert served <= 1.05 * os.path.getsize(image_file), served
        statuses = [agents.status(env)['p2p'] for env in agents.envs]
        from_peers = sum(s['bytes_from_peers'] for s in statuses)
        assert from_peers >= 3 * os.path.getsize(image_file) * 0.95, statuses
        assert all(s['active'] for s in statuses)
