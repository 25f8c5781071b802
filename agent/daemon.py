"""``template-agent serve``: the systemd service.

At start it runs ``init()`` (every handler re-prepares its bases: links
restored after a reboot, half-written files removed), opens the local API,
then tells systemd READY=1. The main loop pings the watchdog at half of
``WATCHDOG_USEC``, keeps ``STATUS=`` current, runs the cache manager pass
every ``[image_cache] manager_interval`` seconds (0 = every 60 s, -1 =
never, as nova) in a worker thread, and writes the metrics textfile.
With ``[p2p] enabled`` it also shares image bytes with its peers
(``agent.p2p``): the listener and the key are set up while still root, the
swarm starts once the agent works as the owner of ``instances_path``.
SIGHUP reloads the configuration ([p2p] changes need a restart); SIGTERM
stops taking work, cancels
in-flight jobs at their next progress report (their handlers roll back, so
nothing partial is published), sends STOPPING=1 and exits 0.
"""

import logging
import os
import resource
import signal
import threading
import time

from agent import api, config, core, errors, logs, metrics, systemd
from agent.cache import manager

LOG = logging.getLogger(__name__)
DEFAULT_PASS_INTERVAL = 60
TEXTFILE_INTERVAL = 60
STOP_TIMEOUT = 60
GAUGE_TTL = 30


def _raise_open_files_limit():
    """Raise the soft limit of open files to the hard one: every API
    connection holds a descriptor, and the soft limit is often 1024 (systemd
    keeps it there for programs using select()) below a far higher hard
    one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            LOG.warning('cannot raise the open files limit from %d to %d: '
                        '%s', soft, hard, exc)


class Service:
    def __init__(self, config_files, verbose=False):
        self.config_files = config_files
        self.verbose = verbose
        self.agent = None
        self.api = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._pass_thread = None
        self._last_pass = None
        self._gauges = (None, [])
        self.swarm = None

    # -- lifecycle ----------------------------------------------------------
    def run(self):
        logs.setup(self.verbose)
        _raise_open_files_limit()
        systemd.notify('STATUS=starting')  # connects while still root
        conf = config.load(self.config_files)
        # bound while still root (the socket's directory is root's), then
        # the agent core drops to the owner of instances_path
        self.api = api.ApiServer(self, conf.api)
        try:
            if conf.p2p.enabled:
                from agent.p2p.swarm import Swarm
                self.swarm = Swarm(conf)
            self.agent = core.TemplateAgent(conf)
        except BaseException:
            self.api.server.server_close()
            if self.swarm is not None:
                self.swarm.stop()
            raise
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        systemd.notify('STATUS=restoring base images (init)')
        report = self.agent.init()
        LOG.info('init done', extra={'init': report})
        if self.swarm is not None:
            self.swarm.on_demand = self._fetch_for_peer
            self.swarm.start()
            self.agent.context.swarm = self.swarm
        self.api.start()
        systemd.notify('READY=1', 'STATUS=' + self.status_line())
        LOG.info('serving on %s', conf.api.socket_path)
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return 0

    def _main_loop(self):
        watchdog = systemd.watchdog_interval()
        next_ping = time.monotonic()
        next_pass = time.monotonic() + self._pass_interval()
        next_textfile = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if watchdog and now >= next_ping:
                systemd.notify('WATCHDOG=1')
                next_ping = now + watchdog
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
                next_pass = now + self._pass_interval()
            if now >= next_pass:
                self._start_pass()
                next_pass = now + self._pass_interval()
            if now >= next_textfile:
                self._write_textfile()
                next_textfile = now + TEXTFILE_INTERVAL
            wait = min(t for t in (next_ping if watchdog else now + 1,
                                   next_pass, next_textfile, now + 1))
            self._stop.wait(max(0.05, wait - time.monotonic()))

    def _pass_interval(self):
        interval = self.agent.conf.image_cache.manager_interval
        if interval < 0:
            return float('inf')
        return interval or DEFAULT_PASS_INTERVAL

    def _shutdown(self):
        LOG.info('stopping')
        systemd.notify('STOPPING=1', 'STATUS=stopping')
        if self.api is not None:
            if not self.api.jobs.cancel_all(STOP_TIMEOUT):
                LOG.error('jobs still running after %d s: %s', STOP_TIMEOUT,
                          [j.id for j in self.api.jobs.running()])
            self.api.stop()
        if self.swarm is not None:
            self.swarm.stop()
        if self._pass_thread is not None:
            self._pass_thread.join(STOP_TIMEOUT)
        self._write_textfile()
        self.agent.close()

    def reload(self):
        """SIGHUP: load the configuration again; keep the old one on error."""
        try:
            new = core.TemplateAgent(config.load(self.config_files))
        except (errors.AgentError, Exception) as exc:  # keep serving
            LOG.error('reload failed, keeping the running configuration: %s',
                      exc)
            return False
        if new.conf.api.socket_path != self.agent.conf.api.socket_path:
            LOG.warning('[api] socket_path changes need a restart')
        new.context.swarm = self.swarm
        self.agent = new
        if self.api is not None:
            self.api.limits = new.conf.api
        LOG.info('configuration reloaded')
        systemd.notify('STATUS=' + self.status_line())
        return True

    def _fetch_for_peer(self, image_id):
        """A peer asks this agent for ``image_id``, which it does not
        share: fetch it as a job, as if nova had asked (checked against
        Glance with this agent's own credentials, like any fetch), unless
        its base is here already. Whether it started."""
        agent = self.agent
        if self.api.jobs.cancelling.is_set() or \
                os.path.lexists(agent.base_path(image_id)):
            return False
        self.api.jobs.start('fetch', image_id, lambda progress: {
            'path': agent.fetch_image(image_id, progress=progress)})
        return True

    # -- the cache manager pass -------------------------------------------
    def _start_pass(self):
        if self._pass_thread is not None and self._pass_thread.is_alive():
            return
        self._pass_thread = threading.Thread(target=self._run_pass,
                                             name='manager-pass', daemon=True)
        self._pass_thread.start()

    def _run_pass(self):
        try:
            report = self.agent.prune()
            self._last_pass = time.time()
            LOG.info('cache manager pass: removed %d, %d in use',
                     len(report['removed']), len(report['in_use']),
                     extra={'removed': report['removed']})
        except errors.AgentError as exc:
            LOG.error('cache manager pass failed: %s', exc)
        except Exception:
            LOG.exception('cache manager pass crashed')
        systemd.notify('STATUS=' + self.status_line())
        self._write_textfile()

    # -- status and metrics -----------------------------------------------
    def status_line(self):
        try:
            bases = len(manager.base_names(self.agent.base_dir))
        except (errors.AgentError, OSError) as exc:
            return 'cannot read %s: %s' % (self.agent.base_dir, exc)
        jobs = len(self.api.jobs.running()) if self.api else 0
        last = time.strftime('%H:%M:%S', time.localtime(self._last_pass)) \
            if self._last_pass else 'never'
        return '%d base images, %d jobs running, last pass %s' % (
            bases, jobs, last)

    def metrics_text(self):
        stamp, gauges = self._gauges
        if stamp is None or time.monotonic() - stamp > GAUGE_TTL:
            try:
                gauges = self.agent.metrics_gauges()
            except errors.AgentError as exc:
                LOG.warning('metrics: %s', exc)
            self._gauges = (time.monotonic(), gauges)
        return metrics.REGISTRY.render(gauges)

    def _write_textfile(self):
        path = self.agent.conf.metrics.textfile_path
        if path:
            try:
                metrics.write_textfile(path, self.metrics_text())
            except OSError as exc:
                LOG.warning('cannot write metrics to %s: %s', path, exc)
