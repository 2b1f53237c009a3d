"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


class VlmError(Exception):
    """A problem with the user's input: a bad name, a missing file, a wrong option."""


class ImageError(VlmError):
    """An image file that cannot be used (corrupt, truncated, empty, not an image, too large).

    The message always names the file, so a caller can log it, skip it and count it.
    """
