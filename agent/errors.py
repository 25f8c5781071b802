"""Every error a user can see: one base, flat subclasses, message templates.

Each message says what failed, on what, and what to do. ``exit_code`` is what
the CLI returns for it.
"""


class AgentError(Exception):
    message = "An unknown error occurred."
    exit_code = 1
    #: False for errors another handler or a retry cannot fix.
    falls_through = True

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.message % kwargs
            except (KeyError, TypeError):
                message = self.message
        super().__init__(message)


class ConfigError(AgentError):
    message = "Invalid configuration: %(reason)s"
    exit_code = 2
    falls_through = False


class UnknownHandler(ConfigError):
    message = ("Unknown template image handler %(name)r in "
               "template_image_handler; valid names: %(valid)s.")


class InvalidImageId(AgentError):
    message = ("Invalid image id %(image_id)r: %(reason)s. Image ids are "
               "Glance ids (UUIDs) or short names of letters, digits, '.', "
               "'_' and '-'.")
    exit_code = 2
    falls_through = False


class ImageNotFound(AgentError):
    message = "Image %(image_id)s not found in %(source)s."
    falls_through = False


class ImageNotAuthorized(AgentError):
    message = ("Not authorized to read image %(image_id)s from %(source)s "
               "(HTTP %(status)s); check [glance] auth_token.")
    falls_through = False


class ImageNotActive(AgentError):
    message = ("Image %(image_id)s is %(status)s, not active; wait for its "
               "upload to finish.")
    falls_through = False


class SourceUnavailable(AgentError):
    message = ("Image source %(source)s is unavailable: %(reason)s. Check "
               "that it runs and that [glance] api_servers is right.")


class DownloadFailed(AgentError):
    message = ("Download of image %(image_id)s failed after %(attempts)d "
               "attempt(s): %(reason)s. Nothing was published; retry later.")


class DownloadTimedOut(DownloadFailed):
    """The whole download took longer than allowed: not retried, not handed
    to another handler (that would double the time nova's lock is held)."""
    message = ("Download of image %(image_id)s stopped after %(elapsed)d s, "
               "over [glance] download_timeout = %(limit)d s, with %(done)d "
               "of %(size)s bytes received. Nothing was published. Check "
               "Glance and the network, or raise download_timeout for images "
               "this large (0 = no limit).")
    falls_through = False


class DownloadTooSlow(DownloadFailed):
    """The source stayed under the minimum rate, on every attempt."""
    message = ("Download of image %(image_id)s failed after %(attempts)d "
               "attempt(s): on the last one the source sent %(got)d bytes "
               "in %(window)d s (%(rate)d bytes/s), under [glance] "
               "download_min_rate = "
               "%(min_rate)d bytes/s. Nothing was published. Check Glance and "
               "the network, or lower download_min_rate (0 = no minimum).")
    falls_through = False


class ImageUnacceptable(AgentError):
    """The image bits or metadata are unsafe or wrong: never retried."""
    message = "Image %(image_id)s refused: %(reason)s"
    falls_through = False


class WeakImageHash(ImageUnacceptable):
    """Nothing strong enough to verify the bits against."""
    message = ("Image %(image_id)s refused: %(what)s, nothing strong enough "
               "to prove that its bits are the ones uploaded. Nothing was "
               "downloaded. Have Glance compute a multihash (its "
               "hashing_algorithm, sha256 or stronger) and re-upload the "
               "image, or accept the risk with [glance] allow_weak_hashes = "
               "True.")


class UnknownHashAlgorithm(ImageUnacceptable):
    message = ("Image %(image_id)s refused: its os_hash_algo %(algo)r is not "
               "an algorithm the agent verifies (accepted: %(accepted)s). "
               "Nothing was downloaded. Set Glance's hashing_algorithm to one "
               "of them and upload the image again.")


class ChecksumMismatch(ImageUnacceptable):
    message = ("Image %(image_id)s refused: its %(algo)s is %(actual)s but "
               "the image metadata says %(expected)s. The data is corrupt or "
               "was tampered with; nothing was published.")


class ImageCorrupt(ImageUnacceptable):
    message = ("Image %(image_id)s refused: qemu-img check finds the %(fmt)s "
               "image damaged (%(reason)s). Converted, it would become a base "
               "with parts silently zero-filled; nothing was published. "
               "Upload an intact image.")


class ImageTooLarge(ImageUnacceptable):
    message = ("Image %(image_id)s refused: virtual size %(size)d bytes is "
               "over max_image_virtual_size_gb=%(limit)d.")


class InsufficientSpace(AgentError):
    message = ("Not enough space in %(path)s for image %(image_id)s: need "
               "%(needed)d bytes, %(free)d free. Free space (template-agent "
               "prune) and retry.")
    falls_through = False


class BaseImageNotFound(AgentError):
    message = "No base image for image %(image_id)s in %(path)s."


class BaseImageInUse(AgentError):
    message = ("Base image %(path)s is in use by %(users)s; it is not "
               "removed.")


class UsageUnknown(AgentError):
    message = ("Cannot tell whether base images are in use: %(reason)s. "
               "Nothing is removed while usage is unknown.")


class HandlerCannotServe(AgentError):
    message = "Handler %(handler)s cannot serve image %(image_id)s: %(reason)s"


class NoHandlerSucceeded(AgentError):
    message = ("No handler could prepare image %(image_id)s: %(reasons)s")


class ConversionFailed(AgentError):
    message = ("qemu-img could not convert image %(image_id)s: %(reason)s")
    falls_through = False


class VolumeNotFound(AgentError):
    message = "Volume %(volume_id)s not found in the %(backend)s backend."


class VolumeTooSmall(AgentError):
    message = ("Volume %(volume_id)s has %(size)d bytes, too small for image "
               "%(image_id)s (%(needed)d bytes).")


class BackendUnavailable(AgentError):
    message = "Volume backend %(backend)s cannot work on this host: %(reason)s"


class VolumeAttached(AgentError):
    message = ("Volume %(volume_id)s is attached to %(hosts)s; it is not "
               "deleted while a host holds it.")


class VolumeServiceFailed(BackendUnavailable):
    message = ("Cinder at %(endpoint)s failed to %(action)s: %(reason)s. "
               "Check that Cinder (api, scheduler, volume) and its storage "
               "are up and that the [cinder] options reach it; nothing was "
               "left half made.")


class VolumeWriteFailed(BackendUnavailable):
    message = ("Writing the image into volume %(volume_id)s (Ceph RBD "
               "image %(rbd_image)s) failed: %(reason)s. Check that Ceph "
               "(monitors and OSDs) answers this host; the volume is deleted "
               "(or left to reclaim while Cinder cannot delete it).")


class VolumeExportFailed(BackendUnavailable):
    message = ("Exporting volume %(volume_id)s (Ceph RBD image %(rbd_image)s) "
               "on this host failed: %(reason)s. Check that Ceph (monitors "
               "and OSDs) answers this host; nothing is left exported.")


class CacheEntryHeld(AgentError):
    message = ("Image-volume cache entry of image %(image_id)s is held by "
               "%(holders)s; it is not evicted.")


class CacheEntryNotFound(AgentError):
    message = "No image-volume cache entry for image %(image_id)s."
    falls_through = False


class Cancelled(AgentError):
    message = 'Cancelled: the service is stopping; nothing was published.'
    falls_through = False


class JobCancelled(Cancelled):
    message = 'Cancelled on request; nothing was published.'


class UnsafePath(AgentError):
    message = ("Refusing %(path)s: %(reason)s. The directories under "
               "instances_path must be real directories owned by the user "
               "that owns instances_path; fix them (e.g. chown -R nova: "
               "$instances_path/_base) and retry.")
