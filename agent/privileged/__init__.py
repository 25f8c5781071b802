"""The agent's privileged operations, each in an oslo.privsep context with
the smallest capability set it needs (as os-brick's ``os_brick.privileged``
and nova's ``nova.privsep``).

Everything else runs unprivileged, as the owner of ``instances_path``
(``agent.identity``). When the agent starts as root and drops to that user,
each context's daemon is forked first (``Method.FORK``) and keeps only its
capabilities; when the agent does not drop (it was started by the owner
itself, or ``instances_path`` belongs to root), the entrypoints run in
process. Each entrypoint checks its arguments against what it can verify
itself: it never trusts a path or a device number it is handed.

=================  ==============================  =======================
context            capabilities                    what
=================  ==============================  =======================
``loop_context``   CAP_SYS_ADMIN,                  attach a file the agent's
                   CAP_DAC_READ_SEARCH             user owns as a read-only
                                                   loop device; detach or
                                                   resize such devices
``process_context``CAP_SYS_PTRACE,                 which processes hold given
                   CAP_DAC_READ_SEARCH             files or devices open
                                                   (``/proc/PID/fd``)
``os_brick``       os-brick's own (CAP_SYS_ADMIN,  os-brick connector calls
                   CAP_DAC_READ_SEARCH)
=================  ==============================  =======================

``rbd_exports_context`` (CAP_SYS_ADMIN, CAP_KILL, CAP_DAC_READ_SEARCH), forked
only with ``[volume_linking] backend = cinder``: ``qemu-storage-daemon`` FUSE
exports of attached RBD volumes and loop devices on them, in a root-owned
directory (``agent.privileged.rbd_exports``).
"""

from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

#: the uid whose files may be exported as loop devices; set by
#: ``agent.identity`` before the daemons fork, so they keep their own copy
TRUSTED_UID = 0

loop_context = priv_context.PrivContext(
    __name__, cfg_section='privsep_loop_devices',
    pypath=__name__ + '.loop_context',
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_DAC_READ_SEARCH],
    logger_name=__name__ + '.loop_devices', timeout=120)

process_context = priv_context.PrivContext(
    __name__, cfg_section='privsep_process_files',
    pypath=__name__ + '.process_context',
    capabilities=[caps.CAP_SYS_PTRACE, caps.CAP_DAC_READ_SEARCH],
    logger_name=__name__ + '.process_files', timeout=120)

rbd_exports_context = priv_context.PrivContext(
    __name__, cfg_section='privsep_rbd_exports',
    pypath=__name__ + '.rbd_exports_context',
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_KILL,
                  caps.CAP_DAC_READ_SEARCH],
    logger_name=__name__ + '.rbd_exports', timeout=600)

#: the contexts every dropped agent forks; ``rbd_exports_context`` only
#: with ``[volume_linking] backend = cinder`` (``agent.identity``)
CONTEXTS = (loop_context, process_context)

# in process until ``agent.identity.enter`` forks the daemons and drops
for _context in CONTEXTS + (rbd_exports_context,):
    _context.set_client_mode(False)
