"""Peer-to-peer distribution between real agents, each in its own network
namespace (veth, a bridge, ``tc`` rate limits), with the Glance stand-in in
a namespace of its own (Glance's upload capped well below the hosts'
links, as in a cloud whose image store is the bottleneck).

Every test checks the bases byte for byte against the image, and the
namespaces and agents are removed even when it fails.
"""

import hashlib
import os
import re
import random
import shutil
import time
import socket
import ssl

import pytest

from agent import naming
from agent.p2p import rendezvous
from tests import netns
from tests.glance_standin import GlanceStandIn
from tests.real_glance import real_glance  # noqa: F401 (a fixture)

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
        assert code == 0, '%s: %s\n%s' % (ns, out, agents.log(env, 40))


def test_four_hosts_glance_serves_the_image_once(cluster, certs, image_file,
                                                  tmp_path, real_glance):
    """The real Glance, reached through the Glance namespace's capped link
    (a relay there counts the bytes it sends)."""
    net, _ = cluster(4)
    image_id = real_glance.create_image('p2p-n4', image_file)['id']
    host, port = real_glance.url.rsplit('/', 1)[-1].rsplit(':', 1)
    try:
        with netns.Relay(net.glance_ns, net.glance_ip, (host, int(port))) \
                as relay, netns.PeerAgents(tmp_path, net, relay.url,
                                           certs) as agents:
            results = agents.fetch_all(image_id, terminal=True)
            served = relay.sent
            check_four_hosts(agents, results, image_id, image_file, served)
            check_progress_shows_both_sources(results, image_file)
    finally:
        real_glance.delete(image_id)


def check_four_hosts(agents, results, image_id, image_file, served):
    """What N = 4 hosts must show after fetching at once."""
    assert_fetched(results, agents)
    assert_bases_exact(agents, image_id, image_file)
    size = os.path.getsize(image_file)
    assert size <= served <= 1.05 * size, served
    statuses = [agents.status(env)['p2p'] for env in agents.envs]
    from_peers = sum(s['bytes_from_peers'] for s in statuses)
    assert from_peers >= 3 * os.path.getsize(image_file) * 0.95, statuses
    assert all(s['active'] for s in statuses)
    text = agents.status(agents.envs[0], fmt='table')
    assert 'p2p:' in text and image_id in text, text
    from agent import client
    metrics = client.ServiceClient(agents.envs[1].sections['api'][
        'socket_path']).request('GET', '/metrics')
    for line in ('template_agent_p2p_received_bytes_total{source=',
                 'template_agent_p2p_peers{which="listed"} 3',
                 'state="seeding"} 1'):
        assert line in metrics, metrics


def check_progress_shows_both_sources(results, image_file):
    """Each fetch's progress bar, as drawn on its terminal, ends with the
    bytes it read from peers and from Glance: the seed's all from Glance,
    the others' (nearly) all from peers."""
    size_mib = os.path.getsize(image_file) / 1024 ** 2
    units = {'B': 1 / 1024 ** 2, 'KiB': 1 / 1024, 'MiB': 1, 'GiB': 1024}
    last = {}
    for ns, (_, out, _) in results.items():
        found = re.findall(r'([\d.]+) (B|KiB|MiB|GiB) from peers, '
                           r'([\d.]+) (B|KiB|MiB|GiB) from glance', out)
        assert found, '%s: no bytes by source in %r' % (ns, out[-600:])
        peers, pu, glance, gu = found[-1]
        last[ns] = (float(peers) * units[pu], float(glance) * units[gu])
    for peers, glance in last.values():
        assert peers + glance == pytest.approx(size_mib, rel=0.02), last
    assert sum(1 for peers, _ in last.values()
               if peers >= 0.9 * size_mib) >= 3, last


def test_a_peer_sending_corrupt_pieces_is_banned(cluster, certs, image_file,
                                                 tmp_path):
    net, glance = cluster(5, glance_mbit=80)
    peers = ['%s:%d' % (ip, netns.AGENT_PORT) for ip in net.ips]
    # the rogue (host 5, a peer with a valid certificate) neither seeds
    # nor is the next choice
    image_id = image_id_seeded_by(peers, 0, exclude=[peers[4]])
    glance.add(image_id, image_file)
    # a slow seed, so that the others take what the rogue offers
    net.limit(net.hosts[0], 40)
    with netns.PeerAgents(tmp_path, net, glance.url, certs,
                          agents=[0, 1, 2, 3]) as agents:
        rogue = agents.others[0]
        agents.start_rogue(rogue, '--image-id', image_id, '--mode',
                           'corrupt-peer', '--seed', peers[0])
        results = agents.fetch_all(image_id)
        assert_fetched(results, agents)
        assert_bases_exact(agents, image_id, image_file)
        statuses = [agents.status(env)['p2p'] for env in agents.envs[1:]]
        assert sum(s['hash_failures'] for s in statuses) > 0, statuses
        banned = [s['banned_peers'] for s in statuses]
        assert any(rogue.ip in b for b in banned), banned
        assert all(set(b) <= {rogue.ip} for b in banned), banned


@pytest.mark.parametrize('wrong_size', [False, True],
                         ids=['wrong-bytes', 'wrong-manifest'])
def test_a_lying_seed_gets_nothing_published(cluster, certs, image_file,
                                             tmp_path, wrong_size):
    net, glance = cluster(4)
    peers = ['%s:%d' % (ip, netns.AGENT_PORT) for ip in net.ips]
    image_id = image_id_seeded_by(peers, 3)  # the rogue's
    glance.add(image_id, image_file)
    with netns.PeerAgents(tmp_path, net, glance.url, certs,
                          agents=[0, 1, 2]) as agents:
        rogue = agents.others[0]
        agents.start_rogue(rogue, '--image-id', image_id, '--mode',
                           'liar-seed', *(['--wrong-size'] if wrong_size
                                          else []))
        seen = {env.namespace: [] for env in agents.envs}
        results = agents.fetch_all(image_id)
        assert_fetched(results, agents)
        # what each published is the image, downloaded again from Glance
        assert_bases_exact(agents, image_id, image_file)
        assert glance.downloads(image_id) >= len(agents.envs)
        for env in agents.envs:
            log = agents.log(env)
            if wrong_size:
                assert 'a manifest for' in log, agents.log(env, 30)
            else:
                assert 'tampered with; nothing was published' in log, \
                    agents.log(env, 30)
            assert 'downloading it from Glance alone' in log or \
                'going on from Glance' in log, agents.log(env, 30)
            seen[env.namespace] = sorted(os.listdir(env.base_dir))
        for names in seen.values():  # no leftovers next to the base
            assert names == [naming.base_filename(image_id)], seen


def test_seed_killed_mid_stream_the_others_finish(cluster, certs, image_file,
                                                  tmp_path):
    net, glance = cluster(4, glance_mbit=64)
    peers = ['%s:%d' % (ip, netns.AGENT_PORT) for ip in net.ips]
    image_id = image_id_seeded_by(peers, 0)
    glance.add(image_id, image_file)
    with netns.PeerAgents(tmp_path, net, glance.url, certs) as agents:
        seed, others = agents.envs[0], agents.envs[1:]
        import threading
        results = {}
        fetching = threading.Thread(target=lambda: results.update(
            agents.fetch_all(image_id, envs=others)))
        fetching.start()
        # the seed fetches for its peers on demand; kill it mid-stream
        deadline = time.monotonic() + 20
        while glance.bytes_served.get(image_id, 0) < \
                os.path.getsize(image_file) // 3:
            assert time.monotonic() < deadline, 'the seed never started'
            time.sleep(0.05)
        agents.kill(seed)
        fetching.join(120)
        assert not fetching.is_alive()
        assert_fetched(results, agents)
        assert_bases_exact(agents, image_id, image_file, envs=others)
        for env in others:
            log = agents.log(env)
            assert 'the swarm stopped' in log or 'gave the image up' in log \
                or 'from Glance from byte' in log, agents.log(env, 30)


def test_without_a_certificate_of_the_ca_a_peer_is_refused(cluster, certs,
                                                           tmp_path):
    net, glance = cluster(2)
    with netns.PeerAgents(tmp_path, net, glance.url, certs) as agents:
        target = agents.envs[0]
        url_path = '/v1/p2p/images/some-image/manifest'

        def ask(cert=None, key=None):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.load_verify_locations(certs['ca.pem'])
            if cert:
                context.load_cert_chain(cert, key)
            with netns.entered(net.hosts[1]):
                sock = socket.create_connection(
                    (target.ip, netns.AGENT_PORT), timeout=10)
            try:
                tls = context.wrap_socket(sock)
                tls.sendall(b'GET %s HTTP/1.1\r\nHost: x\r\n\r\n'
                            % url_path.encode())
                return tls.recv(100)
            finally:
                sock.close()

        assert ask(certs['agent.pem'], certs['agent.key']).startswith(
            b'HTTP/1.1 404')  # a peer: answered
        for cert, key in ((None, None), (certs['rogue.pem'],
                                         certs['rogue.key'])):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                answer = ask(cert, key)
                if not answer:  # TLS 1.3: refused after the handshake
                    raise ConnectionResetError('closed without an answer')
        # BitTorrent: only the peer set's addresses may connect
        with netns.entered(net.glance_ns):
            sock = socket.create_connection(
                (target.ip, netns.AGENT_PORT + 1), timeout=10)
        try:
            sock.settimeout(10)
            sock.sendall(b'\x13BitTorrent protocol' + bytes(48))
            assert sock.recv(100) == b''
        except ConnectionError:
            pass
        finally:
            sock.close()
        text = agents.status(target)
        assert text['p2p']['active']


def test_a_seed_that_has_the_base_already_sends_peers_on(cluster, certs,
                                                         image_file,
                                                         tmp_path):
    net, glance = cluster(2)
    peers = ['%s:%d' % (ip, netns.AGENT_PORT) for ip in net.ips]
    image_id = image_id_seeded_by(peers, 0)
    glance.add(image_id, image_file)
    with netns.PeerAgents(tmp_path, net, glance.url, certs,
                          stall_timeout=60, seed_time=0) as agents:
        seed, other = agents.envs
        assert_fetched(agents.fetch_all(image_id, envs=[seed]), agents)
        time.sleep(1)  # seed_time 0: it no longer shares the image
        results = agents.fetch_all(image_id, envs=[other])
        assert_fetched(results, agents)
        # told at once, not after the stall timeout
        assert results[other.namespace][2] < 30, results
        assert 'does not share it, trying the next' in agents.log(other)
        assert_bases_exact(agents, image_id, image_file)


def test_after_its_fetch_an_agent_serves_the_image_for_seed_time(
        cluster, certs, image_file, tmp_path):
    net, glance = cluster(3)
    peers = ['%s:%d' % (ip, netns.AGENT_PORT) for ip in net.ips]
    image_id = image_id_seeded_by(peers, 0)
    glance.add(image_id, image_file)
    with netns.PeerAgents(tmp_path, net, glance.url, certs,
                          seed_time=3) as agents:
        early, late = agents.envs[:2], agents.envs[2]
        assert_fetched(agents.fetch_all(image_id, envs=early), agents)
        # within seed_time: the late host takes it from the other two
        assert_fetched(agents.fetch_all(image_id, envs=[late]), agents)
        assert_bases_exact(agents, image_id, image_file)
        size = os.path.getsize(image_file)
        assert glance.bytes_served[image_id] <= 1.05 * size
        assert agents.status(late)['p2p']['bytes_from_peers'] >= size
        # then their copies for the swarm are gone
        copy = os.path.join(early[0].state, 'p2p',
                            naming.base_filename(image_id))
        deadline = time.monotonic() + 20
        while os.path.exists(copy):
            assert time.monotonic() < deadline, os.listdir(copy)
            time.sleep(0.2)
        assert agents.status(early[0])['p2p']['images'] == {}
