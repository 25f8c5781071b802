"""Format inspection of image bits before any ``qemu-img`` touches them.

The rules are nova's ``do_image_deep_inspection`` (the fix of
bug 2059809): the claimed ``disk_format`` must have an inspector, the content
must match it (raw may hold a GPT or an ISO; ami/aki/ari are raw), and the
inspector's safety checks must pass: no backing file, no qcow2 data file, no
unknown qcow2 features, only safe VMDK create types, no multiple formats.
"""

from agent import deferred, errors

# its LUKS helpers (and cryptography) load only if a LUKS image is
# decrypted, which needs a passphrase the agent never gives
with deferred.deferring_submodule('oslo_utils.imageutils', '_luks',
                                  annotations=('LUKSHeader',)):
    from oslo_utils.imageutils import format_inspector

AMI_FORMATS = ('ami', 'aki', 'ari')
#: disk formats the agent knows how to turn into a raw base
SUPPORTED_FORMATS = ('raw', 'qcow2', 'vmdk', 'vhd', 'vhdx', 'vdi', 'iso') + \
    AMI_FORMATS
#: oslo's inspector names -> qemu-img's driver names
QEMU_FORMATS = {'vhd': 'vpc', 'ami': 'raw', 'aki': 'raw', 'ari': 'raw',
                'iso': 'raw', 'gpt': 'raw'}


def new_stream_inspector(chunks):
    """Wrap an iterator of chunks; the result detects the format as it goes."""
    return format_inspector.InspectWrapper(chunks)


def stream_result(wrapper, image_id):
    """The detected inspector of a finished ``new_stream_inspector``."""
    try:
        wrapper.close()
        return wrapper.format
    except format_inspector.ImageFormatError as exc:
        raise errors.ImageUnacceptable(image_id=image_id, reason=str(exc))


def inspect_file(path, image_id=None):
    try:
        return format_inspector.detect_file_format(path)
    except format_inspector.ImageFormatError as exc:
        raise errors.ImageUnacceptable(image_id=image_id or path,
                                       reason=str(exc))


def glance_format(inspector):
    """The Glance ``disk_format`` to register for detected content."""
    name = str(inspector)
    return 'raw' if name in ('gpt',) else name


def check_image(inspector, disk_format, image_id, max_virtual_size=0):
    """Raise ImageUnacceptable unless the content is safe and as claimed."""
    if disk_format not in SUPPORTED_FORMATS:
        raise errors.ImageUnacceptable(
            image_id=image_id,
            reason='disk_format %r is not supported (supported: %s)'
            % (disk_format, ', '.join(SUPPORTED_FORMATS)))
    if inspector is None:
        raise errors.ImageUnacceptable(image_id=image_id,
                                       reason='its format could not be '
                                       'determined')
    detected = str(inspector)
    if not (detected == disk_format or
            (disk_format == 'raw' and detected in ('gpt', 'iso')) or
            (disk_format in AMI_FORMATS and detected == 'raw')):
        raise errors.ImageUnacceptable(
            image_id=image_id,
            reason='its content is %s but its disk_format says %s'
            % (detected, disk_format))
    try:
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as exc:
        raise errors.ImageUnacceptable(
            image_id=image_id,
            reason='safety check failed: %s' % '; '.join(
                '%s (%s)' % (name, failure)
                for name, failure in sorted(exc.failures.items())))
    except format_inspector.ImageFormatError as exc:
        raise errors.ImageUnacceptable(image_id=image_id, reason=str(exc))
    virtual_size = inspector.virtual_size
    if max_virtual_size and virtual_size > max_virtual_size:
        raise errors.ImageTooLarge(image_id=image_id, size=virtual_size,
                                   limit=max_virtual_size // (1024 ** 3))
    return virtual_size


def qemu_format(inspector):
    name = str(inspector)
    return QEMU_FORMATS.get(name, name)
