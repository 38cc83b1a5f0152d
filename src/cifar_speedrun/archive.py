"""Extract a dataset archive a user was handed, without letting it write anywhere else.

A tar member named `../../x` or `/etc/x`, or a link pointing out of the folder, would make a plain
`extractall()` (what torchvision's extract_archive calls, without a filter on Python 3.11) write
outside the extraction folder. Every member is checked first: only regular files and folders whose
paths stay inside the target are extracted; links, devices and FIFOs are refused, and the first bad
member is named in one line. Python's own `filter="data"` is applied on top where it exists.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from cifar_speedrun.errors import UserError


def _outside(name: str, target: Path) -> bool:
    if not name or PurePosixPath(name).is_absolute() or os.path.isabs(name) or ":" in PurePosixPath(name).parts[0]:
        return True
    resolved = (target / name).resolve()
    return resolved != target.resolve() and target.resolve() not in resolved.parents


def unsafe_tar_member(member: tarfile.TarInfo, target: Path) -> str | None:
    """Why `member` must not be extracted into `target`, or None when it is a plain file or folder inside."""
    if member.issym() or member.islnk():
        return f"a link ({member.name} -> {member.linkname})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if not (member.isreg() or member.isdir()):
        return "not a regular file or folder"
    if _outside(member.name, target):
        return "a path outside the extraction folder"
    return None


def unsafe_zip_member(info: zipfile.ZipInfo, target: Path) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # zips often carry no file type
        return "not a regular file or folder"
    if _outside(info.filename, target):
        return "a path outside the extraction folder"
    return None


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .tar/.tar.gz/.tgz/.zip into `target`, refusing any member that would escape it."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    reason = unsafe_zip_member(info, target)
                    if reason:
                        raise UserError(f"refusing to extract {archive}: member {info.filename!r} is {reason}; "
                                        "an image dataset holds only folders and image files")
                bundle.extractall(target)
            return
        with tarfile.open(archive) as bundle:  # tarfile detects gzip/bz2/xz itself
            members = bundle.getmembers()
            for member in members:
                reason = unsafe_tar_member(member, target)
                if reason:
                    raise UserError(f"refusing to extract {archive}: member {member.name!r} is {reason}; "
                                    "an image dataset holds only folders and image files")
            if hasattr(tarfile, "data_filter"):
                bundle.extractall(target, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; every member was checked above
                bundle.extractall(target, members=members)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(f"could not extract {archive} ({type(error).__name__}: {first}); the archive is corrupt "
                        "or not a .tar/.tar.gz/.zip: replace it") from error
