"""karbor-fs: protect real Linux file systems with karbor-async.

A mounted file system (``Linux::FileSystem``, id: its mount point) is
quiesced with ``FIFREEZE``; the image file it lives in (``Linux::DiskImage``,
id: its path, found through the loop device it is mounted from) is cut with
``FICLONE`` while it is frozen, then thawed, and the clone is streamed into the
bank. A dead-man thaw (:func:`thaw_mount`) is armed before every freeze. See
``plugins/fs/README.md`` for the model and its reasons.
"""

from karbor_fs.protectables import ImageProtectable
from karbor_fs.protections import FILESYSTEM, IMAGE, FsProtection, clone_path, thaw_mount

__all__ = ["FILESYSTEM", "IMAGE", "FsProtection", "ImageProtectable", "clone_path", "thaw_mount"]
