"""Pure logic: names, durations, sizes, sparse writes, metrics text."""

import hashlib
import os
import threading

import pytest

from agent import api, cli, core, errors, files, metrics, naming
from agent.images import download


def test_base_names_are_nova_s():
    assert naming.base_filename('cirros') == hashlib.sha1(
        b'cirros').hexdigest()
    sha1 = naming.base_filename('x')
    assert naming.parse_base_filename(sha1) == (sha1, None)
    assert naming.parse_base_filename(sha1 + '_10737418240') == (
        sha1, 10737418240)
    for name in (sha1 + '.part', sha1[:-1], sha1.upper(), 'locks'):
        assert naming.parse_base_filename(name) is None
    assert naming.temp_owner(sha1 + '.converted') == sha1
    assert naming.temp_owner('x.part') is None


@pytest.mark.parametrize('image_id', [
    'cirros', '0b6e1c0e-7f4c-4ad5-9f4e-6d5c1f0a6b11', 'a.b_c-d', 'x' * 255])
def test_valid_image_ids(image_id):
    assert naming.validate_image_id(image_id) == image_id


@pytest.mark.parametrize('image_id', [
    '', '.', '..', 'a/../b', '../x', '/etc/passwd', 'a\\b', 'x\0', '-x',
    'x' * 256, 'a b', 'é'])
def test_invalid_image_ids(image_id):
    from agent import errors
    with pytest.raises(errors.InvalidImageId):
        naming.validate_image_id(image_id)


@pytest.mark.parametrize('text,seconds', [
    ('0', 0), ('90', 90), ('30s', 30), ('10m', 600), ('2h', 7200),
    ('1d', 86400), ('1w', 604800), (' 1.5h ', 5400)])
def test_durations(text, seconds):
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize('text', ['', 'soon', '-1', '1y', '1 2'])
def test_bad_durations(text):
    with pytest.raises(ValueError, match='not a duration'):
        cli.parse_duration(text)


def test_human_bytes():
    assert [cli.human_bytes(n) for n in (None, 0, 1023, 1024, 1536,
                                         5 * 1024 ** 3, 3 * 1024 ** 5)] == [
        '-', '0 B', '1023 B', '1.0 KiB', '1.5 KiB', '5.0 GiB', '3072.0 TiB']


def test_bytes_by_source_read_and_add_up():
    assert cli.sources_text(None) is None
    assert cli.sources_text({'peers': 3 * 1024 ** 2, 'glance': 0}) == \
        '3.0 MiB from peers, 0 B from glance'
    assert core._summed([{'peers': 5, 'glance': 1}, {'glance': 2}]) == {
        'peers': 5, 'glance': 3}


def test_a_job_keeps_the_bytes_by_source_it_was_told():
    jobs = api.Jobs()
    told = threading.Event()

    def fn(progress):
        progress(10, 100)
        progress(40, 100, sources={'peers': 30, 'glance': 10})
        told.set()
        return 'done'
    job = jobs.start('fetch', 'x', fn)
    assert job.done.wait(10) and told.is_set()
    assert job.to_dict()['progress'] == {
        'done': 40, 'total': 100, 'sources': {'peers': 30, 'glance': 10}}
    assert job.result == 'done'


def test_sparse_writes_leave_zero_blocks_as_holes(tmp_path):
    block = download.SPARSE_BLOCK
    data = (b'\0' * block * 4 + b'x' * block + b'\0' * block * 4 +
            b'y' * 10)
    path = tmp_path / 'out'
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, len(data) + block)
        download._pwrite_sparse(fd, data, block)
        download._pwrite_sparse(fd, b'\0' * block * 8, 0)  # all holes
    finally:
        os.close(fd)
    assert path.read_bytes() == b'\0' * block + data
    st = os.stat(path)
    # two written runs of at most one block each (+ filesystem slack)
    assert st.st_blocks * 512 <= 4 * block


def test_sparse_writes_of_a_receive_buffer_with_a_short_tail(tmp_path):
    """A reused receive buffer (bytearray) is written like bytes: zero
    blocks, a non-zero block that starts with zeros, a short tail."""
    block = download.SPARSE_BLOCK
    data = bytearray(b'\0' * block * 3 + b'\0' * 100 + b'z' +
                     b'\0' * (block - 101) + b'\0' * 300 + b't')
    path = tmp_path / 'out'
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, len(data))
        download._pwrite_sparse(fd, data, 0)
        download._pwrite_sparse(fd, bytearray(500), len(data))  # a hole
        os.ftruncate(fd, len(data) + 500)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(data) + b'\0' * 500
    # the three leading zero blocks stay holes
    assert os.stat(path).st_blocks * 512 <= 3 * block


def test_hasher_reads_back_what_it_had_no_room_for(tmp_path):
    """Chunks the hasher's queue has no room for are read back from the
    file, holes (trailing ones too) as zeros: the digest is that of the
    bytes as sent, whichever way each chunk came."""
    import time
    block = download.SPARSE_BLOCK
    chunks = [b'a' * block, bytes(block), b'b' * 7 + bytes(block - 7),
              bytes(block), b'c' * block, bytes(block)]
    fd = os.open(tmp_path / 'out', os.O_RDWR | os.O_CREAT, 0o600)
    hasher = download._Hasher(fd, 'sha512', download._Buffers(0))
    handed = []
    try:
        offset = 0
        for i, chunk in enumerate(chunks):
            download._pwrite_sparse(fd, chunk, offset)
            end = offset + len(chunk)
            if i == 4:  # after a read-back, in memory again
                hasher.start()
                while not hasher.feed(offset, chunk):
                    time.sleep(0.01)
                handed.append(i)
            elif i < 4 and hasher.feed(offset, chunk):
                handed.append(i)
            else:  # no room (the fourth), or as if none (the last)
                os.ftruncate(fd, end)
            offset = end
        os.ftruncate(fd, offset)
        hasher.finish(offset, lambda: None)
        digest = hasher.hexdigest()
    finally:
        os.close(fd)
    # the first three went in memory, the fourth was read back (a hole at
    # the end of the file then), the fifth in memory, the last read back
    assert handed == [0, 1, 2, 4]
    assert digest == hashlib.sha512(b''.join(chunks)).hexdigest()


def test_metrics_text_is_prometheus_exposition():
    registry = metrics.Registry()
    registry.inc('template_agent_fetches_total', handler='downloading',
                 result='prepared')
    registry.inc('template_agent_fetches_total', 2, handler='downloading',
                 result='prepared')
    registry.inc('template_agent_fetches_total', handler='a"b\\c\nd',
                 result='error')
    text = registry.render([('template_agent_base_images', {}, 3)])
    lines = text.splitlines()
    assert '# TYPE template_agent_fetches_total counter' in lines
    assert ('template_agent_fetches_total{handler="downloading",'
            'result="prepared"} 3') in lines
    assert ('template_agent_fetches_total{handler="a\\"b\\\\c\\nd",'
            'result="error"} 1') in lines
    assert 'template_agent_base_images 3' in lines
    assert text.endswith('\n')
    with pytest.raises(AssertionError):
        registry.inc('not_declared_total')


def test_a_directory_removed_while_in_use_is_refused(tmp_path):
    """Whoever owns ``_base``'s parent can move its entries out and remove
    it while the agent holds it open: a clear refusal, not ext4's bare
    EPERM."""
    base = tmp_path / '_base'
    base.mkdir()
    dir_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(base)
        with pytest.raises(errors.UnsafePath,
                           match='removed while in use') as refused:
            fd = files.new_anonymous(dir_fd) or \
                files.new_named('x.part', dir_fd)
            files.publish(fd, 'x', dir_fd)
        assert str(base) in str(refused.value)
    finally:
        os.close(dir_fd)
