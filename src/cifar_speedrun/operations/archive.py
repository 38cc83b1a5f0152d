"""Extract a CIFAR-10 archive a user was handed: only the images the dataset needs, within limits.

Two classes of harm come from an archive: members that write elsewhere, and members that cost
without bound. A tar member named `../../x` or `/etc/x`, or a link pointing out of the folder, would
make a plain `extractall()` (what torchvision's extract_archive calls, without a filter on Python
3.11) write outside the extraction folder: such members (links, devices and FIFOs too) refuse the
whole archive, naming the first one. A 2 MB tar.gz can hold a 1 GiB member of zeros, or 200,000
empty files: so only image files of the dataset's layout (`[top/]train|test/<class>/<image>`) are
extracted, each at most `MAX_IMAGE_BYTES`, at most `MAX_IMAGES` of them and `MAX_TOTAL_BYTES` in
all; at most `MAX_MEMBERS` entries and `MAX_ARCHIVE_BYTES` (skipped members included) are read, and
a larger archive file is not read at all. Everything else (a README, macOS's `__MACOSX/` and `._*`
twins, `.DS_Store`) is skipped. Each limit, and an archive without the layout, is one line naming
the archive and what it holds. Python's own `filter="data"` is applied on top where it exists.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cifar_speedrun.errors import UserError

# CIFAR-10: 60,000 images (50,000 train + 10,000 test), 32x32 RGB. The limits are multiples of it.
CIFAR10_IMAGES = 60_000
# A dataset of this shape holds at most twice CIFAR-10's images (room for a larger test split).
MAX_IMAGES = 2 * CIFAR10_IMAGES
# A 32x32 RGB image is 3,072 bytes raw; BMP, PNG or 16-bit TIFF encodings with metadata stay under
# 16 KiB (the JPEG copy's largest is 1,124 bytes). 256 KiB leaves room and refuses anything bigger.
MAX_IMAGE_BYTES = 256 * 1024
# 60,000 images at 16 KiB each: about 5x a lossless PNG copy of CIFAR-10 (the JPEG copy holds 55 MB).
MAX_TOTAL_BYTES = CIFAR10_IMAGES * 16 * 1024
# Entries read (folders, skipped files included): the images, their folders, a macOS `._*` twin for
# each image, and as much again; more is not a CIFAR-sized archive.
MAX_MEMBERS = 5 * CIFAR10_IMAGES
# Bytes of all members together, skipped ones included (reading a .tar.gz decompresses every member it
# passes, so a 2 KB .tar.bz2 can hold a 2 GB README): twice the images' limit. Also the largest
# archive file that is read at all.
MAX_ARCHIVE_BYTES = 2 * MAX_TOTAL_BYTES
# The longest file name most filesystems take (bytes).
MAX_NAME_BYTES = 255
SPLITS = ("train", "test")


def _outside(name: str) -> bool:
    """A member name that would land outside the extraction folder: absolute, a drive, or climbing out with `..`.

    Decided on the name alone (normalized, as the path it names): no link is ever extracted (links are
    refused before anything is written), so no folder inside the target can lead elsewhere, and the
    60,000 names of CIFAR-10 are checked without a filesystem call each."""
    if not name or PurePosixPath(name).is_absolute() or os.path.isabs(name) or ":" in PurePosixPath(name).parts[0]:
        return True
    normal = os.path.normpath(name)
    return normal == os.pardir or normal.startswith(os.pardir + os.sep)


def unsafe_tar_member(member: tarfile.TarInfo) -> str | None:
    """Why `member` must not be extracted, or None when it is a plain file or folder inside the target."""
    if member.issym() or member.islnk():
        return f"a link ({member.name} -> {member.linkname})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if not (member.isreg() or member.isdir()):
        return "not a regular file or folder"
    if _outside(member.name):
        return "a path outside the extraction folder"
    return None


def unsafe_zip_member(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # zips often carry no file type
        return "not a regular file or folder"
    if _outside(info.filename):
        return "a path outside the extraction folder"
    return None


def _image_extensions() -> tuple[str, ...]:
    from cifar_speedrun.operations.layout import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _classes() -> tuple[str, ...]:
    from cifar_speedrun.operations.layout import CIFAR10_CLASSES

    return CIFAR10_CLASSES


@dataclass
class _Selection:
    """What an archive holds, as the members are read: the image members to extract and the rest."""

    archive: Path
    top: str | None = None  # the one folder above train/ and test/ ("" for none), from the first image
    images: list[str] = field(default_factory=list)
    total_bytes: int = 0
    all_bytes: int = 0
    members: int = 0
    skipped: int = 0
    tops: set[str] = field(default_factory=set)  # the archive's own top-level entries, for messages

    def consider(self, name: str, size: int, is_dir: bool) -> bool:
        """True when the member `name` is an image of the layout, to extract; checks every limit."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise UserError(f"refusing to extract {self.archive.name}: it holds more than {MAX_MEMBERS:,} entries, "
                            f"not a CIFAR-sized dataset ({CIFAR10_IMAGES:,} images)")
        self.all_bytes += max(0, size)
        if self.all_bytes > MAX_ARCHIVE_BYTES:
            raise UserError(f"refusing to extract {self.archive.name}: its members add up to more than "
                            f"{MAX_ARCHIVE_BYTES:,} bytes (at {name[:80]!r}), more than a CIFAR-sized dataset holds")
        parts = PurePosixPath(name).parts
        if parts:
            self.tops.add(parts[0][:MAX_NAME_BYTES])
        if is_dir:
            return False
        if any(len(part.encode(errors="replace")) > MAX_NAME_BYTES for part in parts) or not self._in_layout(parts):
            self.skipped += 1
            return False
        top = parts[0] if len(parts) == 4 else ""
        if self.top is None:
            self.top = top
        elif top != self.top:
            raise UserError(f"refusing to extract {self.archive.name}: it holds two datasets "
                            f"({self.top or '.'}/ and {top or '.'}/); give an archive of one")
        if size > MAX_IMAGE_BYTES:
            raise UserError(f"refusing to extract {self.archive.name}: member {name!r} is {size:,} bytes, more than "
                            f"{MAX_IMAGE_BYTES:,} for a 32x32 image; the archive is not a CIFAR-10 dataset")
        self.total_bytes += size
        if self.total_bytes > MAX_TOTAL_BYTES:
            raise UserError(f"refusing to extract {self.archive.name}: its images add up to more than "
                            f"{MAX_TOTAL_BYTES:,} bytes, more than a CIFAR-sized dataset holds")
        self.images.append(name)
        if len(self.images) > MAX_IMAGES:
            raise UserError(f"refusing to extract {self.archive.name}: it holds more than {MAX_IMAGES:,} images, "
                            f"not a CIFAR-sized dataset ({CIFAR10_IMAGES:,})")
        return True

    @staticmethod
    def _in_layout(parts: tuple[str, ...]) -> bool:
        if len(parts) not in (3, 4) or parts[0] == "__MACOSX":
            return False
        split, label, filename = parts[-3:]
        return (split in SPLITS and label in _classes() and not filename.startswith(".")
                and filename.lower().endswith(_image_extensions()))

    def dataset_root(self, target: Path) -> Path:
        if self.skipped:
            print(f"[data] {self.archive.name}: extracting {len(self.images):,} images; skipped {self.skipped:,} other "
                  "files (__MACOSX/, ._*, hidden, non-image, outside train|test/<class>/)", flush=True)
        if self.top is None:
            shown = ", ".join(sorted(self.tops)[:8]) or "nothing"
            raise UserError(f"{self.archive.name} holds no images in train/<class>/ or <folder>/train/<class>/ "
                            f"(its top-level entries: {shown}); CIFAR-10 needs train/ and test/, each with the 10 "
                            "class folders")
        return target / self.top if self.top else target


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract the dataset images of a .tar/.tar.gz/.tgz/.zip into `target`; returns the folder holding
    train/ and test/. Refuses, in one line, any unsafe member and any limit crossed."""
    target.mkdir(parents=True, exist_ok=True)
    selection = _Selection(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                chosen = []
                for info in bundle.infolist():
                    reason = unsafe_zip_member(info)
                    if reason:
                        raise UserError(f"refusing to extract {archive}: member {info.filename!r} is {reason}; "
                                        "an image dataset holds only folders and image files")
                    if selection.consider(info.filename, info.file_size, info.is_dir()):
                        chosen.append(info)
                root = selection.dataset_root(target)
                for info in chosen:  # zipfile reads at most file_size bytes of each
                    bundle.extract(info, target)
            return root
        with tarfile.open(archive) as bundle:  # tarfile detects gzip/bz2/xz itself
            members = []
            for member in bundle:
                reason = unsafe_tar_member(member)
                if reason:
                    raise UserError(f"refusing to extract {archive}: member {member.name!r} is {reason}; "
                                    "an image dataset holds only folders and image files")
                if selection.consider(member.name, member.size, member.isdir()):
                    members.append(member)
            root = selection.dataset_root(target)
            if hasattr(tarfile, "data_filter"):
                bundle.extractall(target, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; every member was checked above
                bundle.extractall(target, members=members)
        return root
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(f"could not extract {archive} ({type(error).__name__}: {first}); the archive is corrupt "
                        "or not a .tar/.tar.gz/.zip: replace it") from error


def check_archive_size(archive: Path) -> None:
    """An archive file larger than anything it may hold is refused before it is read (hashed) at all."""
    size = archive.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise UserError(f"{archive} is {size:,} bytes, more than a CIFAR-sized dataset archive ({MAX_ARCHIVE_BYTES:,}):"
                        " point data.path at a CIFAR-10 archive or folder")
