"""Dataset files read alike from folders and from .zip or .tar archives, without unpacking.

A path may step into archives: ``root/val2017.zip/val2017/000000000139.jpg`` names a member of
``val2017.zip``, and a .zip stored inside a .zip is entered the same way (COCO ships its panoptic
PNGs so). Archives are opened on first use in each process and never pickled, so a dataset that
holds DataPaths can go to DataLoader workers, forked or spawned, and each worker opens its own.
Members whose names escape the archive's folder (absolute, or through '..') are refused.
"""

import io
import os
import posixpath
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ARCHIVE_SUFFIXES = (".zip", ".tar")


@dataclass(frozen=True)
class DataPath:
    """A file or folder on disk, or inside an archive on disk (possibly inside nested zips).

    Build one with `resolve_path`. `member` is None for a plain disk path, else the path inside
    the innermost archive ("" for its top); `nested` names the zips entered inside `disk`.
    """

    disk: Path
    nested: tuple[str, ...] = ()
    member: str | None = None

    def __str__(self) -> str:
        if self.member is None:
            return str(self.disk)
        return "/".join(part for part in (str(self.disk), *self.nested, self.member) if part)

    def __truediv__(self, name: str) -> "DataPath":
        if self.member is None:
            _check_relative(name, str(self))
            return DataPath(self.disk / name)
        return DataPath(self.disk, self.nested, _join_member(self.member, name, str(self)))

    @property
    def name(self) -> str:
        return PurePosixPath(str(self)).name

    def is_file(self) -> bool:
        if self.member is None:
            return self.disk.is_file()
        return self.member in _archive(self.disk, self.nested).files

    def is_dir(self) -> bool:
        if self.member is None:
            return self.disk.is_dir()
        return self.member in _archive(self.disk, self.nested).folders

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def read_bytes(self) -> bytes:
        if self.member is None:
            if not self.disk.is_file():
                raise FileNotFoundError(f"File not found: {self}")
            return self.disk.read_bytes()
        archive = _archive(self.disk, self.nested)
        if self.member not in archive.files:
            raise FileNotFoundError(f"File not found: {self} (no member '{self.member}')")
        return archive.read(self.member)

    def files(self, suffix: str = "") -> list[str]:
        """Sorted relative paths (with '/') of the files below this folder that end in suffix."""
        if self.member is None:
            return sorted(
                Path(folder, name).relative_to(self.disk).as_posix()
                for folder, _, names in os.walk(self.disk, followlinks=True)
                for name in names
                if name.endswith(suffix)
            )
        prefix = f"{self.member}/" if self.member else ""
        return sorted(
            name[len(prefix) :]
            for name in _archive(self.disk, self.nested).files
            if name.startswith(prefix) and name.endswith(suffix)
        )


def resolve_path(path: "str | Path | DataPath") -> DataPath:
    """The DataPath of a path whose components may be archives (.zip, .tar) on disk or zips
    inside zips. A path with no archive in it stays a plain disk path, existing or not."""
    if isinstance(path, DataPath):
        return path
    parts = Path(path).parts
    for end in range(1, len(parts) + 1):
        disk = Path(*parts[:end])
        if disk.suffix in ARCHIVE_SUFFIXES and disk.is_file():
            break
    else:
        return DataPath(Path(path))
    nested, inner = [], []
    for part in parts[end:]:
        inner.append(part)
        candidate = "/".join(inner)
        # Only zips are entered inside archives (a tar member cannot be read in place).
        if disk.suffix == ".zip" and candidate.endswith(".zip"):
            if candidate in _archive(disk, tuple(nested)).files:
                nested.append(candidate)
                inner = []
    return DataPath(disk, tuple(nested), _join_member("", "/".join(inner), str(path)))


def find_first(root: str | Path, candidates: tuple[str, ...]) -> DataPath | None:
    """The first of the candidate paths (relative to root) that exists, else None."""
    for candidate in candidates:
        path = resolve_path(Path(root) / candidate)
        if path.exists():
            return path
    return None


def _check_relative(name: str, where: str) -> None:
    normalised = posixpath.normpath(name.replace("\\", "/")) if name else ""
    if normalised.startswith("/") or normalised == ".." or normalised.startswith("../"):
        raise ValueError(f"{where}: '{name}' escapes its folder; refusing to read it")


def _join_member(base: str, name: str, where: str) -> str:
    _check_relative(name, where)
    joined = posixpath.normpath(posixpath.join(base, name)) if (base or name) else ""
    return "" if joined == "." else joined


# Open archives of this process, by (disk path, nested zips); emptied in a new process.
_archives: dict[tuple[Path, tuple[str, ...]], "_ZipArchive | _TarArchive"] = {}
_archives_pid = None


def _archive(disk: Path, nested: tuple[str, ...]) -> "_ZipArchive | _TarArchive":
    global _archives_pid
    if _archives_pid != os.getpid():
        # A forked child must not share its parent's file offsets: start afresh.
        _archives.clear()
        _archives_pid = os.getpid()
    key = (disk, nested)
    if key not in _archives:
        if nested:
            parent = _archive(disk, nested[:-1])
            where = "/".join([str(disk), *nested])
            _archives[key] = _ZipArchive(parent.stored_member_opener(nested[-1]), where)
        elif disk.suffix == ".tar":
            _archives[key] = _TarArchive(disk)
        else:
            _archives[key] = _ZipArchive(lambda: open(disk, "rb"), str(disk))
    return _archives[key]


def _index(where: str, names: list[str]) -> tuple[set[str], set[str]]:
    """Normalised file names of an archive and the folders above them; refuses escaping names."""
    files, folders = set(), {""}
    for name in names:
        _check_relative(name, f"{where} member")
        name = posixpath.normpath(name)
        files.add(name)
        parent = posixpath.dirname(name)
        while parent not in folders:
            folders.add(parent)
            parent = posixpath.dirname(parent)
    return files, folders


class _ZipArchive:
    def __init__(self, open_file: Callable[[], io.RawIOBase], where: str):
        self.open_file, self.where = open_file, where
        try:
            self.zip = zipfile.ZipFile(open_file())
        except zipfile.BadZipFile as error:
            raise ValueError(f"{where}: not a readable zip archive ({error})") from error
        infos = [info for info in self.zip.infolist() if not info.is_dir()]
        self.files, self.folders = _index(where, [info.filename for info in infos])
        self.info = {posixpath.normpath(info.filename): info for info in infos}

    def read(self, name: str) -> bytes:
        return self.zip.read(self.info[name])

    def stored_member_opener(self, name: str) -> Callable[[], io.RawIOBase]:
        """A function opening the bytes of a member stored uncompressed, as a seekable file."""
        info = self.info[name]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ValueError(
                f"{self.where}/{name}: this archive inside an archive is compressed or "
                f"encrypted and cannot be read in place; extract {name} from {self.where} "
                "into the same folder"
            )
        with self.open_file() as file:
            file.seek(info.header_offset)
            header = file.read(30)
        signature, name_length, extra_length = struct.unpack("<4s22xHH", header)
        if signature != b"PK\x03\x04":
            raise ValueError(f"{self.where}/{name}: corrupt local file header")
        start = info.header_offset + 30 + name_length + extra_length
        return lambda: _Window(self.open_file(), start, info.file_size)


class _TarArchive:
    def __init__(self, path: Path):
        try:
            self.tar = tarfile.open(path)
        except tarfile.ReadError as error:
            raise ValueError(f"{path}: not a readable tar archive ({error})") from error
        members = [member for member in self.tar.getmembers() if member.isfile()]
        self.files, self.folders = _index(str(path), [member.name for member in members])
        self.member = {posixpath.normpath(member.name): member for member in members}

    def read(self, name: str) -> bytes:
        return self.tar.extractfile(self.member[name]).read()


class _Window(io.RawIOBase):
    """Read-only, seekable view of `size` bytes of `file` from offset `start`."""

    def __init__(self, file, start: int, size: int):
        self.file, self.start, self.size, self.position = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, origin + offset)
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        if count == 0:
            return 0
        self.file.seek(self.start + self.position)
        read = self.file.readinto(memoryview(buffer)[:count])
        self.position += read
        return read

    def close(self) -> None:
        self.file.close()
        super().close()
