"""Configuration options, with nova's names and defaults where nova has them.

The options are registered on a private ``ConfigOpts`` per agent instance, so
tests and the CLI can load several configurations in one process.
``list_opts()`` feeds oslo-config-generator (namespace ``template_agent``),
which writes ``etc/template-agent.conf.sample``.
"""

import os

from agent import deferred

# oslo.config's netaddr, rfc3986 and stevedore load when first used (see
# agent.deferred): the agent declares no option that needs them
with deferred.deferring():
    from oslo_config import cfg

DEFAULT_OPTS = [
    cfg.StrOpt(
        'instances_path',
        default='/var/lib/nova/instances',
        help="""
Where instances are stored on disk, as nova-compute's ``instances_path``.

Base images live in ``$instances_path/$image_cache.subdirectory_name`` and
the external file locks shared with nova-compute in ``$instances_path/locks``.

Related options:

* ``[image_cache] subdirectory_name``
"""),
    cfg.StrOpt(
        'host',
        # what socket.gethostname() answers, without importing socket
        default=os.uname().nodename,
        sample_default='<current_hostname>',
        help="""
Name of this host, as nova-compute's ``host``: the name the volume backend
gives Cinder in connectors and attachments, that the image-volume cache
shows as a holder, and by which peer-to-peer distribution finds this agent
in ``[p2p] peers`` (or by ``[p2p] listen``). Keep it equal to nova's on the
same hypervisor, and unique in the fleet.

Related options:

* ``[p2p] peers``
"""),
    cfg.StrOpt(
        'state_path',
        default='/var/lib/template-agent',
        help="""
Directory for the agent's own state: the base-image index, the local image
catalog and the local volumes.
"""),
    cfg.ListOpt(
        'template_image_handler',
        default=['downloading'],
        help="""
Ordered list of handlers that prepare base images.

The first handler that can serve an image prepares it; when it fails, the
next one is tried. The handler that prepared a base is recorded, so removal
and ``init`` go back to it.

Possible values:

* ``downloading``: copy the image from the image source, verify and convert it
* ``volume_linking``: link the block device of a volume holding the image
* any name registered in the ``template_agent.handlers`` entry point group

Example: ``volume_linking,downloading`` links when possible and downloads
otherwise.
"""),
    cfg.BoolOpt(
        'force_raw_images',
        default=True,
        help="""
Force conversion of base images to raw format, as nova's option of the same
name. Raw bases are faster to read and can be shared as block devices.
"""),
    cfg.BoolOpt(
        'use_cow_images',
        default=True,
        help="""
Whether nova-compute makes instance disks as copy-on-write qcow2 overlays on
their base image, as nova's option of the same name. Keep it equal to
nova's value: with ``[libvirt] images_type = default`` it decides which
image backend nova uses, and so whether ``volume_linking`` may serve.

Related options:

* ``[libvirt] images_type``
"""),
    cfg.IntOpt(
        'max_image_virtual_size_gb',
        default=0,
        min=0,
        help="""
Largest virtual size, in GiB, of an image the agent accepts. Larger images
are refused before any byte is written to ``_base``.

Possible values:

* 0: no limit
* a positive integer: the limit in GiB
"""),
]

IMAGE_CACHE_OPTS = [
    cfg.StrOpt(
        'subdirectory_name',
        default='_base',
        help="""
Location of cached base images, relative to ``instances_path``, as nova's
``[image_cache] subdirectory_name``. Keep both the same so that nova finds
the bases the agent prepares.
"""),
    cfg.IntOpt(
        'manager_interval',
        default=2400,
        min=-1,
        help="""
Number of seconds between runs of the cache manager pass.

Possible values:

* 0: run at the default interval of 60 seconds (not recommended)
* -1: disable the pass
* any other value
"""),
    cfg.BoolOpt(
        'remove_unused_base_images',
        default=True,
        help="""
Remove unused base images during the cache manager pass. When False, the
pass only touches in-use bases and removes nothing.
"""),
    cfg.IntOpt(
        'remove_unused_original_minimum_age_seconds',
        default=86400,
        min=0,
        help="""
Unused unresized base images younger than this are not removed.

Related options:

* ``remove_unused_base_images``
"""),
    cfg.IntOpt(
        'remove_unused_resized_minimum_age_seconds',
        default=3600,
        min=0,
        help="""
Unused resized base images (``<sha1>_<size>``) younger than this are not
removed.

Related options:

* ``remove_unused_base_images``
"""),
    cfg.IntOpt(
        'precache_concurrency',
        default=1,
        min=1,
        help="""
Maximum number of images prepared in parallel when pre-caching a list of
images.
"""),
]

IMAGE_SOURCE_OPTS = [
    cfg.StrOpt(
        'driver',
        default='local',
        choices=[('local', 'the embedded local catalog under local_path'),
                 ('glance', 'a Glance v2 API, see the [glance] section')],
        help="Where image metadata and bits come from."),
    cfg.StrOpt(
        'local_path',
        default='$state_path/catalog',
        help="""
Directory of the local image catalog: ``<id>.json`` holds Glance-v2-shaped
metadata, ``<id>.data`` the image bits. Fill it with
``template-agent images import``.

Related options:

* ``driver``
"""),
]

GLANCE_OPTS = [
    cfg.ListOpt(
        'api_servers',
        default=['http://127.0.0.1:9292'],
        help="""
List of Glance API endpoints, tried in order; on a connection failure or a
5xx answer the next one is used.

Possible values:

* a list of URLs such as ``http://glance1:9292,http://glance2:9292``
"""),
    cfg.IntOpt(
        'num_retries',
        default=3,
        min=0,
        help="""
How many times a failed transient request to Glance (connection error,
5xx, stalled stream) is retried, with exponential backoff. Client errors
(4xx), a full disk and rejected images are never retried.
"""),
    cfg.StrOpt(
        'auth_token',
        secret=True,
        help="""
Token sent as ``X-Auth-Token``. Leave unset for a Glance without
authentication.
"""),
    cfg.FloatOpt(
        'read_timeout',
        default=60.0,
        min=0.1,
        help="""
Seconds without any byte from Glance after which a request or a download
stream counts as stalled; a stalled download is resumed (with a Range
request) up to ``num_retries`` times.
"""),
    cfg.BoolOpt(
        'allow_weak_hashes',
        default=False,
        help="""
Accept images that Glance cannot vouch for with a strong hash.

By default an image is downloaded only when its multihash
(``os_hash_algo``/``os_hash_value``) uses sha256, sha384, sha512, sha3_256,
sha3_384, sha3_512, blake2b or blake2s, and the bits are verified against it
before anything is published. An image with only the legacy md5
``checksum`` (or a multihash of md5, sha1, sha224 or sha3_224), or with no
hash at all, is refused.

When True, such images are accepted: an md5 (or other weak) hash is still
verified, an image without any hash is published unverified; both are
logged as warnings. The risk: md5 and sha1 collisions can be computed, so
whoever prepared two colliding disks can swap one for the other in the
image store or on the way to this host unnoticed; without a hash, nothing
detects corruption or tampering there at all. Enable it only for a Glance that
predates multihash (before Rocky) while its images are re-uploaded.

An ``os_hash_algo`` the agent does not know is always refused.
"""),
    cfg.IntOpt(
        'download_timeout',
        default=3600,
        min=0,
        help="""
Longest time, in seconds, one image download may take, all retries
included. Past it the download is stopped, nothing is published, and nova's
lock on the base image is released.

The default, one hour, needs about 3 MiB/s for a 10 GiB image and 28 MiB/s
for a 100 GiB one; raise it for larger images or slower links.

Possible values:

* 0: no limit (then only ``download_min_rate`` bounds the time)
* a positive number of seconds

Related options:

* ``download_min_rate``
"""),
    cfg.IntOpt(
        'download_min_rate',
        default=64 * 1024,
        min=0,
        help="""
Lowest acceptable download rate, in bytes per second, averaged over
``download_min_rate_window`` seconds. A stream that delivers less in a
window is abandoned and resumed with a Range request, as a stalled one, up
to ``num_retries`` times; then the download fails and nothing is published.
``read_timeout`` catches a stream that sends nothing; this catches one that
drips a few bytes now and then, which would otherwise hold nova's lock on
the base image for as long as the source likes.

The default, 64 KiB/s, is far below any working datacenter link, so only a
broken or hostile source trips it; at that rate a 1 GiB image would take
4.5 hours, longer than the default ``download_timeout`` anyway, so such a
stream is better given up after a minute than after an hour.

Possible values:

* 0: no minimum rate
* a positive number of bytes per second

Related options:

* ``download_min_rate_window``, ``download_timeout``, ``read_timeout``
"""),
    cfg.IntOpt(
        'download_min_rate_window',
        default=60,
        min=1,
        help="""
Seconds over which the download rate is averaged and compared with
``download_min_rate``. Shorter windows react sooner but also to brief
slumps; the default matches ``read_timeout``.

Related options:

* ``download_min_rate``
"""),
]

LIBVIRT_OPTS = [
    cfg.StrOpt(
        'connection_uri',
        default='qemu:///system',
        help="""
libvirt URI used, read-only, to find the domains whose disks use a base
image.

Possible values:

* a libvirt URI, e.g. ``qemu:///system`` or ``test:///path/to/node.xml``
* empty: do not ask libvirt (instance disks and open files are still checked)
"""),
    cfg.StrOpt(
        'images_type',
        default='default',
        choices=[
            ('raw', 'instance disks are raw copies of the base'),
            ('flat', 'instance disks are copies of the base (raw, or '
             'qcow2 when the base is qcow2)'),
            ('qcow2', 'instance disks are qcow2 overlays backed by the '
             'base'),
            ('lvm', 'instance disks are logical volumes the base is '
             'written into'),
            ('rbd', 'instance disks are Ceph RBD images'),
            ('ploop', 'instance disks are Virtuozzo ploop images'),
            ('default', 'qcow2 when [DEFAULT] use_cow_images is True, '
             'else flat'),
        ],
        help="""
The image backend nova-compute uses for instance disks, as nova's
``[libvirt] images_type``: keep both the same. Only where instance disks are
qcow2 overlays on the base (``qcow2``, or ``default`` with
``use_cow_images = True``) does a linked base (a symlink to a read-only
block device) serve nova; with any other value the ``volume_linking``
handler declines every image with the reason, and the next handler
(``downloading``) prepares a regular file.

Related options:

* ``[DEFAULT] use_cow_images``
* ``[DEFAULT] template_image_handler``
"""),
]


VOLUME_LINKING_OPTS = [
    cfg.StrOpt(
        'backend',
        default='local',
        choices=[('local', 'sparse files exported as loop devices, in '
                  '[local_volumes] path'),
                 ('cinder', 'volumes of an OpenStack Cinder (the [cinder] '
                  'options), attached with its attachments API: one '
                  'template per image for every host sharing that Cinder')],
        help="""
Volume backend that holds template volumes and the volumes cloned from them.

With ``cinder``, templates are Cinder volumes that every agent using the
same Cinder project finds by their metadata: one template serves the whole
fleet, and the hosts holding it are Cinder's attachment records.

Related options:

* ``template_image_handler``: include ``volume_linking`` to use it
* ``[cinder]``: how to reach Cinder, with ``backend = cinder``
"""),
    cfg.StrOpt(
        'device_links_path',
        default='/run/template-agent/devices',
        help="""
Directory of the device links: a linked base ``_base/<sha1>`` points to
``<device_links_path>/<volume id>``, which points to the attached block
device. It must be on a filesystem that is empty after a reboot (a tmpfs
such as ``/run``): after a reboot a device name such as ``/dev/loop3`` may
already belong to another file, and a base must then dangle until ``init``
attaches its volume again, never resolve to the wrong disk. The service
keeps it across its own restarts (``RuntimeDirectoryPreserve=yes``).

Related options:

* ``template_image_handler``: used by ``volume_linking``
"""),
]


LOCAL_VOLUMES_OPTS = [
    cfg.StrOpt(
        'path',
        default='$state_path/volumes',
        help="""
Directory of the local volume backend: one sparse raw file per volume.
Put it on XFS (reflink=1) or btrfs so volumes are copy-on-write clones of
their template; elsewhere clones are sparse copies.
"""),
]

CINDER_OPTS = [
    cfg.StrOpt(
        'catalog_info',
        default='volumev3::publicURL',
        regex=r'^[\w-]+:\w*:.*$',
        help="""
Info to match when looking for Cinder in the service catalog, as nova's
``[cinder] catalog_info``: ``<service_type>:<service_name>:<interface>``.
Not used with ``endpoint_template``, ``endpoint_override`` or an auth
plugin that names its endpoint itself (``admin_token``).

Related options:

* ``endpoint_template``, ``os_region_name``
"""),
    cfg.StrOpt(
        'endpoint_template',
        help="""
Override the catalog lookup with a URL template with the project id, as
nova's: e.g. ``http://cinder.example.org:8776/v3/%(project_id)s``.
"""),
    cfg.StrOpt(
        'os_region_name',
        help="Region name of this node, to pick Cinder in the catalog."),
    cfg.IntOpt(
        'http_retries',
        default=3,
        min=0,
        help="""
Times to retry a Cinder request that failed to connect (as nova's); the
session's ``timeout`` bounds each attempt.
"""),
    cfg.StrOpt(
        'volume_type',
        help="""
Cinder volume type of the template volumes and of the volumes cloned from
them. A template is attached by every host at once, so the type must allow
multiattach (``multiattach="<is> True"``); unset: Cinder's default type.
"""),
    cfg.StrOpt(
        'ceph_conf',
        default='/etc/ceph/ceph.conf',
        help="""
Ceph configuration for the userspace attach route (a
``qemu-storage-daemon`` export of an RBD volume, where the kernel has no
``rbd`` module): keyrings and options the connection info does not carry.
The monitors themselves come from Cinder's connection info.
"""),
    cfg.StrOpt(
        'exports_path',
        default='/run/template-agent/rbd-exports',
        help="""
Directory (created by root, writable only by root) of the userspace
exports: a ``qemu-storage-daemon`` FUSE export of each attached RBD volume
is mounted on a file here, with a loop device on top, where the kernel has
no ``rbd`` driver. On a tmpfs: the exports end with the host.
"""),
    cfg.IntOpt(
        'api_timeout',
        default=60,
        min=1,
        help="""
Seconds for one Cinder request when the session sets no ``timeout``.
"""),
    cfg.IntOpt(
        'operation_timeout',
        default=300,
        min=1,
        help="""
Seconds to wait for Cinder to finish an operation it does in the
background (a volume created, cloned, extended or deleted), and for an
attach route to come up (``qemu-storage-daemon``, os-brick).
"""),
    cfg.IntOpt(
        'template_wait_timeout',
        default=1800,
        min=1,
        help="""
Seconds to wait for the template another host is writing (concurrent
misses for the same image on several hosts make one template: the others
wait for it). After that, this host's handler gives up and the next
handler (e.g. ``downloading``) serves.
"""),
    cfg.BoolOpt(
        'glance_locations',
        default=False,
        help="""
Record each template volume, once written and verified against the
image's hash, on its Glance image as a ``cinder://<volume-id>`` location
(and the image's owner as the volume's ``image_owner`` metadata), and
remove that location when the template is deleted. Cinder configured with
``allowed_direct_url_schemes = cinder`` then makes a volume from a raw,
bare image as a clone of the template (on RBD a copy-on-write clone)
instead of downloading the image a second time into its own
image-volume cache. Off by default: it needs a Glance with
``show_multiple_locations = True`` and its ``cinder`` store enabled, and
an ``[glance] auth_token`` that may change the locations of other
projects' images (admin). A location Glance refuses is logged and
counted (``location_failed``); the fetch goes on as without this option.
"""),
]

IMAGE_VOLUME_CACHE_OPTS = [
    cfg.BoolOpt(
        'enabled',
        default=True,
        help="""
Keep one template volume per image, shared by the links in ``_base`` and the
volumes created from the image, as Cinder's image-volume cache.
"""),
    cfg.IntOpt(
        'max_size_gb',
        default=0,
        min=0,
        help="""
Largest total size, in GiB, of the cached template volumes; least recently
used entries that nothing holds are evicted to make room.

Possible values:

* 0: unlimited
* a positive integer

Related options:

* ``max_count``: each limit works alone or together with the other
"""),
    cfg.IntOpt(
        'max_count',
        default=0,
        min=0,
        help="""
Largest number of cached template volumes; least recently used entries that
nothing holds are evicted to make room.

Possible values:

* 0: unlimited
* a positive integer

Related options:

* ``max_size_gb``
"""),
]


API_OPTS = [
    cfg.StrOpt(
        'socket_path',
        default='/run/template-agent/agent.sock',
        help="""
Unix socket of the service's local API (HTTP with JSON bodies). The CLI
uses it when it answers, and works directly otherwise.
"""),
    cfg.ListOpt(
        'allowed_groups',
        default=['nova'],
        help="""
Groups whose members may use the local API, besides root. Peers are
identified by SO_PEERCRED; anyone else gets HTTP 403. The socket is created
with mode 0660 and the first of these groups that exists.

Related options:

* ``max_connections``, ``max_connections_per_uid``: what members of these
  groups may hold open
"""),
    cfg.IntOpt(
        'idle_timeout',
        default=30,
        min=1,
        help="""
Seconds a connection may stay open without a request before the service
closes it; also how long a peer may leave an answer unread. Every open
connection takes a thread and a slot of ``max_connections_per_uid`` (and of
``max_connections``), which a forgotten keep-alive connection gives back
after this long. The CLI opens a connection per request and waits for jobs
within requests (``?wait=``), so only clients that keep connections alive
see this; 30 seconds lets them reuse a connection and frees slots soon.

Possible values:

* a positive number of seconds

Related options:

* ``header_timeout``, ``body_timeout``
"""),
    cfg.IntOpt(
        'header_timeout',
        default=10,
        min=1,
        help="""
Seconds the request line and headers of a request may take, counted from
their first byte; the service closes the connection of a peer that is
slower. This deadline covers the whole header, so a peer cannot keep a
connection (and its thread) busy by sending a byte at a time. Local
clients send a header in one write; 10 seconds leave room for a host under
heavy load.

Possible values:

* a positive number of seconds

Related options:

* ``idle_timeout``: the wait before the first byte
* ``body_timeout``
"""),
    cfg.IntOpt(
        'body_timeout',
        default=10,
        min=1,
        help="""
Seconds the body of a request (at most 64 KiB of JSON) may take to arrive
after its header; a slower request is answered 408 and its connection
closed.

Possible values:

* a positive number of seconds

Related options:

* ``header_timeout``
"""),
    cfg.IntOpt(
        'max_connections',
        default=256,
        min=1,
        help="""
Maximum number of connections open at once from all peers other than root
and the service's own user; a connection over the cap is answered 503 and
closed as soon as it is accepted. Root and the service's user are not
counted, so they are served however many connections members of
``allowed_groups`` hold (they have ``max_connections_per_uid`` each).
Every open connection takes a thread and a file descriptor: 256 is four
users at their ``max_connections_per_uid``, far more than nova-compute and
the CLI need, and small enough for any host.

Possible values:

* a positive integer

Related options:

* ``max_connections_per_uid``
* ``allowed_groups``
"""),
    cfg.IntOpt(
        'max_connections_per_uid',
        default=64,
        min=1,
        help="""
Maximum number of connections open at once from one user (SO_PEERCRED
uid), root included; a connection over the cap is answered 503 and closed
as soon as it is accepted. This keeps one user from taking all of
``max_connections``. 64 covers nova-compute's concurrent builds, its cache
manager and CLI calls of the same user with room to spare.

Possible values:

* a positive integer

Related options:

* ``max_connections``
* ``idle_timeout``: how soon a forgotten connection gives its slot back
"""),
]

METRICS_OPTS = [
    cfg.StrOpt(
        'textfile_path',
        help="""
Where to write the metrics in Prometheus text format for node_exporter's
textfile collector (e.g.
``/var/lib/node_exporter/textfile_collector/template_agent.prom``); written
atomically after each cache manager pass and every minute. Unset: only
``/metrics`` on the API socket.
"""),
]


P2P_OPTS = [
    cfg.BoolOpt(
        'enabled',
        default=False,
        help="""
Share image bytes with the other agents of ``peers`` (BitTorrent through
libtorrent, on the management network): for each image one agent, chosen
by rendezvous hashing of the image id over ``peers``, downloads it from
Glance and the others fetch its segments from the swarm. Every agent still
verifies the whole image against Glance's hash before publishing it; on
anything wrong or stalled it downloads from Glance as without this option.
Works in the service only (``template-agent serve``); a fetch run in the
CLI's own process downloads from Glance. Needs the ``p2p`` extra
(``pip install template-image-agent[p2p]``).

Related options:

* ``peers``, ``listen``, ``ca_file``, ``cert_file``, ``key_file``
"""),
    cfg.ListOpt(
        'peers',
        default=[],
        help="""
Every agent of the peer set (e.g. a nova aggregate), this one included,
as ``host:port`` of their ``listen`` address, comma-separated. All agents
of a set must list the same peers: the seed of an image is chosen from
this list. BitTorrent runs on the port after each (``port + 1``), and only
these addresses may connect to it.

Possible values:

* ``10.0.0.11:9395,10.0.0.12:9395,10.0.0.13:9395``

Related options:

* ``listen``
"""),
    cfg.StrOpt(
        'listen',
        help="""
``address:port`` on the management network where this agent serves the
manifests of the images it seeds (HTTPS, clients must present a
certificate signed by ``ca_file``). BitTorrent listens on the same address,
``port + 1``. Required when ``enabled``.

Related options:

* ``peers``
"""),
    cfg.StrOpt(
        'ca_file',
        help="""
PEM file of the CA that signs the certificates of the agents of the peer
set; an agent without such a certificate gets no manifest and no answer.
"""),
    cfg.StrOpt(
        'cert_file',
        help="""
PEM certificate of this agent, signed by ``ca_file``; presented as server
and as client.
"""),
    cfg.StrOpt(
        'key_file',
        help="""
PEM private key of ``cert_file``. Read at start, while the service is still
root, so it may be readable by root only.
"""),
    cfg.IntOpt(
        'upload_rate_limit',
        default=0,
        min=0,
        help="""
Bytes per second this agent may upload to its peers, all images together,
so guests are not starved of network. 0: no limit.
"""),
    cfg.IntOpt(
        'segment_size_mb',
        default=32,
        min=1,
        max=1024,
        help="""
MiB per segment: the seed publishes a torrent for each segment as soon as
it has downloaded it, so the others start before it has finished. Smaller
segments overlap more and cost more torrents (a manifest holds at most
1024).
"""),
    cfg.IntOpt(
        'stall_timeout',
        default=30,
        min=1,
        help="""
Seconds without a byte from the swarm (or without an answer from the
seed) after which an agent stops waiting for its peers and downloads the
rest of the image from Glance.
"""),
    cfg.IntOpt(
        'seed_time',
        default=600,
        min=0,
        help="""
Seconds an agent keeps serving an image to its peers after it has it; then
its copy for the swarm is deleted. 0: stop at once.
"""),
    cfg.IntOpt(
        'max_images',
        default=4,
        min=1,
        help="""
Images this agent shares at once; beyond that it downloads from Glance
alone (and the oldest finished image is dropped from the swarm first).
"""),
]


def list_opts(auth_plugins=('password', 'admin_token')):
    """Options for oslo-config-generator (namespace ``template_agent``),
    with keystoneauth1's in ``[cinder]`` and the options of
    ``auth_plugins``: the plugin that ``[cinder] auth_type`` names
    registers its own when Cinder is used."""
    return [(group, opts + keystoneauth_opts(auth_plugins)
             if group == 'cinder' else opts)
            for group, opts in _agent_opts()]


def _agent_opts():
    """The agent's own options, by group (keystoneauth1's are not among
    them: see ``register_cinder_auth``)."""
    return [
        ('DEFAULT', DEFAULT_OPTS),
        ('image_cache', IMAGE_CACHE_OPTS),
        ('image_source', IMAGE_SOURCE_OPTS),
        ('glance', GLANCE_OPTS),
        ('libvirt', LIBVIRT_OPTS),
        ('volume_linking', VOLUME_LINKING_OPTS),
        ('local_volumes', LOCAL_VOLUMES_OPTS),
        ('cinder', CINDER_OPTS),
        ('image_volume_cache', IMAGE_VOLUME_CACHE_OPTS),
        ('api', API_OPTS),
        ('metrics', METRICS_OPTS),
        ('p2p', P2P_OPTS),
    ]


def register_cinder_auth(conf):
    """Register keystoneauth1's session, adapter and auth options in
    ``[cinder]`` on ``conf`` (again is harmless). ``load`` does it when
    ``[volume_linking] backend = cinder``, and the cinder backend when it
    is built: importing keystoneauth1 (and requests) takes longer than
    everything else a command needs, so configurations without Cinder do
    without them."""
    if 'auth_type' in conf.cinder:
        return  # registered already
    conf.register_opts(keystoneauth_opts(plugins=()), group='cinder')


def keystoneauth_opts(plugins=('password', 'admin_token')):
    """keystoneauth1's session, adapter and auth options of the
    ``[cinder]`` group, as nova registers its own ``[cinder]`` group, with
    the options of the named auth plugins for the sample; [] when
    keystoneauth1 (the ``cinder`` extra) is not installed."""
    try:
        from keystoneauth1 import loading as ks_loading
    except ImportError:
        return []
    opts = ks_loading.get_session_conf_options() + \
        ks_loading.get_adapter_conf_options(include_deprecated=False) + \
        ks_loading.get_auth_common_conf_options()
    for plugin in plugins:
        opts += ks_loading.get_auth_plugin_conf_options(plugin)
    seen = set(o.dest for o in CINDER_OPTS)
    unique = []
    for opt in opts:
        if opt.dest not in seen:
            seen.add(opt.dest)
            unique.append(opt)
    return unique


CONFIG_ENV = 'TEMPLATE_AGENT_CONFIG'


def load(config_files=None, overrides=None):
    """Return a new ``ConfigOpts`` with every option registered and parsed.

    :param config_files: INI files, later ones override earlier ones; when
        empty, ``$TEMPLATE_AGENT_CONFIG`` (``:``-separated) is used, and
        oslo.config's default files are not searched.
    :param overrides: ``{'group': {'name': value}}`` or ``{'name': value}``
        for DEFAULT, applied after parsing (used by tests and the CLI).
    """
    conf = cfg.ConfigOpts()
    for group, opts in _agent_opts():
        conf.register_opts(opts, group=None if group == 'DEFAULT' else group)
    files = list(config_files or [])
    if not files and os.environ.get(CONFIG_ENV):
        files = [f for f in os.environ[CONFIG_ENV].split(':') if f]
    for path in files:
        if not os.path.isfile(path):
            raise cfg.ConfigFilesNotFoundError([path])
    conf([], project='template-agent', default_config_files=files,
         default_config_dirs=[], use_env=False)
    if _uses_cinder(conf, overrides or {}):
        register_cinder_auth(conf)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            for name, v in value.items():
                conf.set_override(name, v, group=key)
        else:
            conf.set_override(key, value)
    return conf


def _uses_cinder(conf, overrides):
    """Whether ``[volume_linking] backend`` is ``cinder`` (in the files
    or the overrides), or the overrides set ``[cinder]`` options."""
    if isinstance(overrides.get('cinder'), dict):
        return True
    linking = overrides.get('volume_linking')
    if isinstance(linking, dict) and 'backend' in linking:
        return linking['backend'] == 'cinder'
    try:
        return conf.volume_linking.backend == 'cinder'
    except ValueError:
        return False  # a bad value: reported where it is used, as before


def base_dir(conf):
    return os.path.join(conf.instances_path,
                        conf.image_cache.subdirectory_name)


def lock_dir(conf):
    return os.path.join(conf.instances_path, 'locks')


def nova_image_backend(conf):
    """The image backend nova-compute uses for instance disks: the value
    of ``[libvirt] images_type``, with ``default`` resolved as nova does
    (``qcow2`` when ``use_cow_images``, else ``flat``)."""
    images_type = conf.libvirt.images_type
    if images_type == 'default':
        return 'qcow2' if conf.use_cow_images else 'flat'
    return images_type


#: why each backend but qcow2 cannot use a base that is a link to a device
_NOT_LINKABLE = {
    'flat': "nova copies the base into the instance disk with 'cp -r', "
            "which copies a linked base's symlink, not its bytes",
    'raw': "nova copies the base into the instance disk with 'cp -r', "
           "which copies a linked base's symlink, not its bytes",
    'lvm': 'nova writes the base into a logical volume: a link saves no '
           'copy',
    'rbd': 'nova imports the base into Ceph: a link saves no copy',
    'ploop': 'nova copies the base into a ploop image: a link saves no '
             'copy',
}


def linked_bases_serve_nova(conf):
    """``(True, None)`` when nova builds instance disks as qcow2 overlays
    backed by the base (so a base may be a link to a read-only device),
    else ``(False, why)``."""
    backend = nova_image_backend(conf)
    if backend == 'qcow2':
        return True, None
    how = '[libvirt] images_type = %s' % conf.libvirt.images_type
    if conf.libvirt.images_type == 'default':
        how += ' with use_cow_images = False'
    return False, ('nova uses the %s image backend (%s): %s; only qcow2 '
                   'overlays can be built on a linked base'
                   % (backend, how, _NOT_LINKABLE[backend]))


def reference():
    """docs/configuration.md, in Markdown, from the options themselves."""
    out = ['# Configuration reference', '',
           '<!-- generated by `python -m agent.config > '
           'docs/configuration.md`; do not edit -->', '',
           'INI files read with oslo.config: `--config-file` (repeatable, '
           'later files win) or `$%s` (colon-separated). Options that nova '
           'also has keep nova\'s name, group and default. The commented '
           'sample is `etc/template-agent.conf.sample`.' % CONFIG_ENV]
    for group, opts in list_opts():
        out += ['', '## [%s]' % group, '',
                '| option | type | default | what |', '|---|---|---|---|']
        for opt in opts:
            default = opt.sample_default if opt.sample_default is not None \
                else opt.default
            if isinstance(default, list):
                default = ','.join(map(str, default))
            kind = getattr(opt.type, 'type_name', type(opt).__name__)
            choices = getattr(opt.type, 'choices', None)
            if choices:
                kind += ' (%s)' % ', '.join(map(str, choices))
            text = ' '.join((opt.help or '').split()).replace('|', '\\|')
            out.append('| `%s` | %s | `%s` | %s |' % (
                opt.dest, kind, '' if default is None else default, text))
    return '\n'.join(out) + '\n'


if __name__ == '__main__':
    import sys
    sys.stdout.write(reference())
