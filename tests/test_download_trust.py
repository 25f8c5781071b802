"""What a download trusts and how long it may take, against the Glance
stand-in (a real HTTP server on loopback), the real CLI and a real
``template-agent serve``: weak or unknown hashes, wrong answers to Range
requests, a dripping or stalled source, cancellation and SIGTERM."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from agent import config
from agent.images import download
from tests.conftest import REPO, files_written, make_raw, same_content
from tests.test_service import Service

MiB = 1024 * 1024


def sha1(image_id):
    return hashlib.sha1(image_id.encode()).hexdigest()


def hexdigest(path, algo):
    with open(path, 'rb') as f:
        return hashlib.new(algo, f.read()).hexdigest()


def fetch(env, image_id, timeout):
    """``template-agent fetch`` in a subprocess that must end within
    ``timeout`` seconds; ``(CompletedProcess, seconds it took)``."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, '-m', 'agent.cli', '--config-file', env.conf_path,
         'fetch', image_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail('fetch of %s still running after %d s' % (image_id,
                                                              timeout))
    elapsed = time.monotonic() - started
    return subprocess.CompletedProcess(proc.args, proc.returncode, out,
                                       err), elapsed


def assert_refused(env, proc, image_id, *words):
    """One clear error line, exit 1, nothing of ``image_id`` in _base
    (neither its name nor a temporary one)."""
    assert proc.returncode == 1, proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line.startswith('error: ')]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], proc.stderr
    assert not [name for name in env.base_files()
                if name.startswith(sha1(image_id))]


# -- no unverified bytes ------------------------------------------------------
@pytest.mark.parametrize('fields,what,warning', [
    (dict(os_hash_algo=None, os_hash_value=None), 'only an md5 checksum',
     'verifying with it only'),
    (dict(os_hash_algo=None, os_hash_value=None, checksum=None),
     'no hash at all', 'downloading it unverified'),
    (dict(os_hash_algo='sha1'), 'its multihash uses sha1',
     'verifying with it only'),
], ids=['md5-only', 'no-hash', 'sha1-multihash'])
def test_weak_or_missing_hash_is_refused_unless_the_operator_allows_it(
        glance_env, glance, image_files, fields, what, warning):
    raw = image_files['disk.raw']
    if fields.get('os_hash_algo') == 'sha1':
        fields = dict(fields, os_hash_value=hexdigest(raw, 'sha1'))
    glance.add('weak', raw, **fields)
    proc, _ = fetch(glance_env, 'weak', timeout=60)
    assert_refused(glance_env, proc, 'weak', what,
                   'allow_weak_hashes = True')
    assert glance.downloads('weak') == 0  # refused before any byte
    # the operator's explicit choice: accepted, with a warning
    glance_env.configure(glance={'allow_weak_hashes': True})
    proc, _ = fetch(glance_env, 'weak', timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert warning in proc.stderr and 'allow_weak_hashes' in proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    assert same_content(path, raw)
    assert glance_env.base_files() == [sha1('weak')]


def test_weak_hash_allowed_is_still_verified(glance_env, glance,
                                            image_files):
    glance_env.configure(glance={'allow_weak_hashes': True})
    glance.add('bad-md5', image_files['disk.raw'], os_hash_algo=None,
               os_hash_value=None, checksum='0' * 32)
    proc, _ = fetch(glance_env, 'bad-md5', timeout=60)
    assert_refused(glance_env, proc, 'bad-md5', 'its md5 is', 'tampered')
    # and the operator is told that only md5 stood between
    assert 'image bad-md5: it has only an md5 checksum; verifying with it ' \
        'only' in proc.stderr


@pytest.mark.parametrize('allow_weak', [False, True])
def test_unknown_hash_algorithm_is_a_typed_error(glance_env, glance,
                                                 image_files, allow_weak):
    glance_env.configure(glance={'allow_weak_hashes': allow_weak})
    glance.add('odd', image_files['disk.raw'], os_hash_algo='whirlpool',
               os_hash_value='ab' * 64)
    proc, _ = fetch(glance_env, 'odd', timeout=60)
    assert_refused(glance_env, proc, 'odd', "os_hash_algo 'whirlpool'",
                   'accepted: sha256', 'hashing_algorithm')
    assert glance.downloads('odd') == 0


@pytest.mark.parametrize('algo', ['sha256', 'SHA384', 'sha3_512',
                                  'blake2b'])
def test_strong_algorithms_are_verified_and_bad_digests_refused_early(
        glance_env, glance, image_files, algo):
    raw = image_files['disk.raw']
    good = hexdigest(raw, algo.lower())
    glance.add('strong', raw, os_hash_algo=algo, os_hash_value=good.upper())
    proc, _ = fetch(glance_env, 'strong', timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert same_content(proc.stdout.strip().splitlines()[-1], raw)
    row = glance_env.cli_json('show', 'strong')
    assert (row['hash_algo'], row['hash_value']) == (algo.lower(), good)
    # a digest of the wrong length cannot match: refused before any byte
    glance.add('short', raw, os_hash_algo=algo, os_hash_value=good[:-2])
    proc, _ = fetch(glance_env, 'short', timeout=60)
    assert_refused(glance_env, proc, 'short', 'hex digest')
    assert glance.downloads('short') == 0
    # and a wrong one is caught after the download
    glance.add('wrong', raw, os_hash_algo=algo,
               os_hash_value=hexdigest(image_files['disk.qcow2'],
                                       algo.lower()))
    proc, _ = fetch(glance_env, 'wrong', timeout=60)
    assert_refused(glance_env, proc, 'wrong', 'tampered')
    assert glance_env.base_files() == [sha1('strong')]


@pytest.mark.parametrize('mode', ['wrong-offset', 'missing', 'malformed'])
def test_a_206_that_is_not_the_range_asked_for_is_refused(
        glance_env, glance, image_files, mode):
    # no hash to catch it afterwards: only the check of the answer does
    glance_env.configure(glance={'allow_weak_hashes': True})
    glance.add('resumed', image_files['disk.raw'], os_hash_algo=None,
               os_hash_value=None, checksum=None)
    glance.fail('resumed', truncate_after=3 * MiB // 2, times=1)
    glance.answer_ranges('resumed', mode)
    proc, _ = fetch(glance_env, 'resumed', timeout=60)
    assert_refused(glance_env, proc, 'resumed', 'Content-Range',
                   'after 3 attempt')
    assert glance.downloads('resumed') == 3  # num_retries = 2


def test_a_wrong_206_once_then_a_right_one_gives_the_right_bytes(
        glance_env, glance, image_files):
    glance_env.configure(glance={'allow_weak_hashes': True})
    glance.add('resumed', image_files['disk.raw'], os_hash_algo=None,
               os_hash_value=None, checksum=None)
    glance.fail('resumed', truncate_after=3 * MiB // 2, times=1)
    glance.answer_ranges('resumed', 'wrong-offset', times=1)
    proc, _ = fetch(glance_env, 'resumed', timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert same_content(proc.stdout.strip().splitlines()[-1],
                        image_files['disk.raw'])
    assert glance.downloads('resumed') == 3


def test_a_200_to_a_range_request_starts_over_from_that_answer(
        glance_env, glance, image_files):
    glance.add('norange', image_files['disk.qcow2'], disk_format='qcow2')
    glance.fail('norange', truncate_after=MiB // 2, times=1)
    glance.answer_ranges('norange', 'ignore')
    proc, _ = fetch(glance_env, 'norange', timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert same_content(proc.stdout.strip().splitlines()[-1],
                        image_files['disk.raw'])
    # the cut stream and the 200 that replaced it; no third request
    assert glance.downloads('norange') == 2


# -- bounded time -------------------------------------------------------------
def test_a_dripping_source_is_refused_by_the_minimum_rate(
        glance_env, glance, image_files):
    glance_env.configure(glance={'download_min_rate': 64 * 1024,
                                 'download_min_rate_window': 1,
                                 'read_timeout': 30, 'num_retries': 1})
    glance.add('drip', image_files['disk.raw'])
    glance.fail('drip', drip_after=MiB)  # then 1 byte/s, every time
    proc, elapsed = fetch(glance_env, 'drip', timeout=60)
    assert_refused(glance_env, proc, 'drip', 'after 2 attempt',
                   'download_min_rate = 65536')
    # two windows of about a second, a backoff of 0.5 s, start-up
    assert elapsed < 15, elapsed
    assert glance.downloads('drip') == 2  # resumed once, with Range


def test_a_download_past_its_deadline_is_stopped(glance_env, glance,
                                                 image_files):
    glance_env.configure(glance={'download_timeout': 2,
                                 'download_min_rate': 0,
                                 'read_timeout': 30})
    glance.add('late', image_files['disk.raw'])
    glance.fail('late', drip_after=MiB)
    proc, elapsed = fetch(glance_env, 'late', timeout=60)
    assert_refused(glance_env, proc, 'late', 'download_timeout = 2 s',
                   'raise download_timeout')
    assert elapsed < 10, elapsed
    assert glance.downloads('late') == 1


@pytest.fixture
def served(glance_env):
    """``template-agent serve`` on the Glance stand-in's configuration;
    killed in any case at the end."""
    svc = Service(glance_env)
    try:
        yield svc
    finally:
        svc.close()


def _stalled_fetch(service, env, glance, src, stall):
    """Start a fetch of ``src`` that stalls (mid-stream after 1 MiB, or
    before any header) and wait until it is under way."""
    glance.add('stalled', src)
    if stall == 'mid-stream':
        glance.fail('stalled', stall_after=MiB, stall_seconds=600, times=1)
    else:
        glance.fail('stalled', stall_headers=True, stall_seconds=600,
                    times=1)
    job = service.api().request('POST', '/v1/images/stalled/fetch', {})
    deadline = time.monotonic() + 30
    if stall == 'mid-stream':
        while time.monotonic() < deadline and not any(
                st.st_size >= MiB for st in files_written(
                    service.proc.pid, env.base_dir)):
            time.sleep(0.05)
        assert files_written(service.proc.pid, env.base_dir), service.log()
    else:
        while time.monotonic() < deadline and not \
                glance.downloads('stalled'):
            time.sleep(0.05)
        assert glance.downloads('stalled') == 1, service.log()
    time.sleep(1)  # well into the stall
    job = service.api().request('GET', '/v1/jobs/%s' % job['id'])
    assert job['state'] == 'running', job
    return job


@pytest.mark.parametrize('stall', ['mid-stream', 'before-headers'])
def test_cancelling_a_stalled_fetch_through_the_api(served, glance_env,
                                                    glance, image_files,
                                                    stall):
    # long enough that nothing but the cancel can end the stall
    glance_env.configure(glance={'read_timeout': 120})
    served.start()
    job = _stalled_fetch(served, glance_env, glance,
                         image_files['disk.raw'], stall)
    started = time.monotonic()
    answer = served.api().cancel_job(job['id'])
    assert answer['id'] == job['id']
    job = served.api().request('GET', '/v1/jobs/%s?wait=10' % job['id'])
    elapsed = time.monotonic() - started
    assert job['state'] == 'cancelled', job
    assert elapsed < 5, elapsed
    assert 'Cancelled' in job['error']['message']
    # nothing under a name, no nameless file still open
    assert glance_env.base_files() == []
    assert files_written(served.proc.pid, glance_env.base_dir) == []
    # nova's lock is free again: the next fetch (no fault left) works
    path = served.api().fetch_image('stalled')
    assert same_content(path, image_files['disk.raw'])


@pytest.mark.parametrize('stall', ['mid-stream', 'before-headers'])
def test_sigterm_while_a_download_stalls_exits_within_5_s(
        served, glance_env, glance, tmp_path, stall):
    glance_env.configure(glance={'read_timeout': 120})
    src = make_raw(str(tmp_path / 'big.raw'), data_mib=16, total_mib=16)
    served.start()
    _stalled_fetch(served, glance_env, glance, src, stall)
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    try:
        served.proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    elapsed = time.monotonic() - started
    assert served.proc.returncode == 0, served.log()
    assert elapsed < 5, elapsed
    assert 'STOPPING=1' in served.notify.messages
    assert glance_env.base_files() == []  # no final name, no temp name


def test_cli_through_the_service_gives_the_same_clear_refusal(
        served, glance_env, glance, image_files):
    glance.add('md5only', image_files['disk.raw'], os_hash_algo=None,
               os_hash_value=None)
    direct = glance_env.cli('--direct', 'fetch', 'md5only', check=False)
    served.start()
    through = glance_env.cli('fetch', 'md5only', check=False)
    for proc in (direct, through):
        assert_refused(glance_env, proc, 'md5only', 'only an md5 checksum',
                       'allow_weak_hashes')
    assert through.stderr == direct.stderr
    assert glance.downloads('md5only') == 0


def test_the_limits_are_on_and_weak_hashes_off_by_default():
    conf = config.load([])
    limits = download.DownloadLimits.from_conf(conf)
    assert limits == download.DownloadLimits()
    assert limits.allow_weak_hashes is False
    assert (limits.timeout, limits.min_rate, limits.rate_window) == \
        (3600, 64 * 1024, 60)
