"""Which processes hold given files or devices open (context
``process_context``: CAP_SYS_PTRACE to read any ``/proc/PID/fd``,
CAP_DAC_READ_SEARCH to stat what they point at).

The caller names the files it asks about by key; only matches come back,
so the answer tells nothing about other files.
"""

from agent import privileged
from agent.hypervisor import open_files


@privileged.process_context.entrypoint
def holders(keys, exclude_pids=()):
    """``agent.hypervisor.open_files.holders``, privileged."""
    return open_files.holders(keys, exclude_pids)
