"""A JSON file written as its items come: flat memory over any number of images, and a
complete file (or none) whatever happens, a full disk included."""

import json
import os
from pathlib import Path

# Room kept beyond the bytes that closing a StreamedJson appends: file systems allocate whole
# blocks (up to 64 KiB), so n bytes freed in one file may hold fewer in another.
RESERVE_MARGIN = 128 << 10


class StreamedJson:
    """A JSON file written as its list items come, without keeping them: byte for byte what
    `json.dump` writes of the whole, a list (`key` None) or an object of the list `key`, the
    lists `side_keys` and the `members` (JSON values known from the start), in that order.

    The items of `key` go straight into a temporary beside `path`, those of each side list into
    a part file; `close` appends the side lists and `members` and renames the temporary to
    `path`, which appears only then (an interrupted run leaves no truncated file). Writes are
    unbuffered, so what is on disk is known: an `add` that fails (a full disk) is truncated
    away and the file still closes into the items added before it. A reserve file as large as
    what closing appends (plus RESERVE_MARGIN), grown with the side lists, is deleted just
    before closing: closing needs no free space.
    """

    def __init__(
        self,
        path: str | Path,
        key: str | None = None,
        side_keys: tuple[str, ...] = (),
        members: dict | None = None,
    ):
        if key is None and (side_keys or members):
            raise ValueError("StreamedJson: a file that is one list has no other members")
        self.path, self.key, self.side_keys = Path(path), key, side_keys
        self._members = "".join(
            f", {json.dumps(name)}: {json.dumps(value)}" for name, value in (members or {}).items()
        )
        self._paths = {
            key: self.path.with_name(self.path.name + ".partial"),
            **{side: self.path.with_name(f"{self.path.name}.{side}.part") for side in side_keys},
        }
        self._reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._files, self._reserve, self._reserve_size = {}, None, 0
        self._sizes, self._counts = dict.fromkeys(self._paths, 0), dict.fromkeys(self._paths, 0)
        try:
            for name, part in self._paths.items():
                self._files[name] = open(part, "wb", buffering=0)
            self._reserve = open(self._reserve_path, "wb", buffering=0)
            self._append(key, ("[" if key is None else f"{{{json.dumps(key)}: [").encode())
            self._grow_reserve(self._closing_size() + RESERVE_MARGIN)
        except BaseException:
            self.discard()
            raise

    def add(self, items: dict) -> None:
        """Append items to their lists ({key: [item, ...]}, None the key of a file that is one
        list): all of them, or on an error none."""
        texts = {
            key: ((", " if self._counts[key] else "") + ", ".join(map(json.dumps, values))).encode()
            for key, values in items.items()
            if values
        }
        sizes, reserve_size = dict(self._sizes), self._reserve_size
        try:
            for key, text in texts.items():
                self._append(key, text)
            self._grow_reserve(sum(len(text) for key, text in texts.items() if key != self.key))
        except BaseException:
            for name, size in sizes.items():
                _truncate(self._files[name], size)
            _truncate(self._reserve, reserve_size)
            self._sizes, self._reserve_size = sizes, reserve_size
            raise
        for key, values in items.items():
            self._counts[key] += len(values)

    def close(self) -> Path:
        """Complete `path` and remove the temporary files; returns `path`."""
        try:
            self._reserve.close()
            self._reserve_path.unlink()
            self._append(self.key, b"]")
            for side in self.side_keys:
                self._append(self.key, f", {json.dumps(side)}: [".encode())
                self._files[side].close()
                with open(self._paths[side], "rb") as part:
                    while chunk := part.read(1 << 20):
                        self._append(self.key, chunk)
                self._append(self.key, b"]")
            if self.key is not None:
                self._append(self.key, f"{self._members}}}".encode())
            self._files[self.key].close()
            os.replace(self._paths[self.key], self.path)
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary files."""
        for name, file in self._files.items():
            file.close()
            self._paths[name].unlink(missing_ok=True)
        if self._reserve is not None:
            self._reserve.close()
            self._reserve_path.unlink(missing_ok=True)

    def _closing_size(self) -> int:
        """The bytes `close` appends besides the items of the side lists."""
        if self.key is None:
            return len(b"]")
        lists = "".join(f", {json.dumps(side)}: []" for side in self.side_keys)
        return len(f"]{lists}{self._members}}}".encode())

    def _append(self, key, data: bytes) -> None:
        _write_all(self._files[key], data)
        self._sizes[key] += len(data)

    def _grow_reserve(self, size: int) -> None:
        # Random bytes: a compressing file system would store zeros in no space.
        _write_all(self._reserve, os.urandom(size))
        self._reserve_size += size


def _write_all(file, data: bytes) -> None:
    """Write all of `data` to an unbuffered file (a raw write may write part of it)."""
    view = memoryview(data)
    try:
        while view:
            view = view[file.write(view) :]
    except OSError as error:
        raise OSError(error.errno, error.strerror, file.name) from error


def _truncate(file, size: int) -> None:
    file.truncate(size)
    file.seek(size)
