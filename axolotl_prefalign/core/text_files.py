"""Text files as users' tools write them: byte-order marks, UTF-16, CRLF, gzip.

Spreadsheet exports and editors on other systems write UTF-8 with a byte-order
mark, UTF-16, CRLF line ends or cp1252 bytes, and copies get cut off. Each file is
read as the user meant, or the read ends in one line naming the file, the 1-based
line and the fix. Compression is told by the file's first bytes, not its name (a
`.gz` that holds plain text is read as text); gzip is read, other compressions are
named and refused.
"""

from __future__ import annotations

import codecs
import gzip
import shlex
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# First bytes of compressed files; what decompresses each, for the error's fix.
MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bz2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
    b"7z\xbc\xaf\x27\x1c": "7z",
}
UNPACK = {
    "bz2": "bunzip2 -c",
    "xz": "unxz -c",
    "zstd": "zstd -dc",
    "zip": "unzip -p",
    "7z": "7z x -so",
}
SUFFIXES = {".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zip": "zip", ".7z": "7z"}
# UTF-32 first: its little-endian mark begins with UTF-16's.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
ENCODING_NAMES = {
    "utf-8-sig": "UTF-8 with a byte-order mark",
    "utf-16": "UTF-16",
    "utf-32": "UTF-32",
}


class DataFileError(ValueError):
    """A local data file that cannot be read at all (missing, empty, not a list)."""

    def __reduce__(self):
        return (type(self), self.args)


@dataclass(frozen=True)
class TextFile:
    """A file's compression and encoding, as its first bytes say."""

    path: Path
    compression: str | None  # "gzip" or None
    encoding: str  # utf-8, utf-8-sig, utf-16 or utf-32
    bom: int  # bytes of byte-order mark to skip

    @property
    def recoded(self) -> str | None:
        """Why `datasets` would misread the file as named (then a UTF-8 copy is
        read in its place), or None."""
        if self.encoding != "utf-8":
            return ENCODING_NAMES[self.encoding]
        named_gz = self.path.name.lower().endswith(".gz")
        if named_gz and self.compression is None:
            return "plain text under a .gz name"
        if self.compression and not named_gz:
            return "gzip data without a .gz name"
        return None


def _head(path: Path, compression: str | None) -> bytes:
    try:
        with _open(path, compression) as fh:
            return fh.read(4)
    except (OSError, EOFError, zlib.error) as err:
        raise _damaged(path, 1, err) from None


def sniff(path: str | Path) -> TextFile:
    """The compression and encoding of `path`; one clear error when it is a
    folder, unreadable, empty or compressed in a way that is not read."""
    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"{path} is a folder, not a file")
    try:
        with path.open("rb") as fh:
            first = fh.read(8)
    except FileNotFoundError:
        raise DataFileError(f"{path} does not exist") from None
    except OSError as err:
        raise DataFileError(f"{path}: cannot be read ({err.strerror})") from None
    if not first:
        raise DataFileError(f"{path}: the file is empty (no rows)")
    found = next((k for magic, k in MAGIC.items() if first.startswith(magic)), None)
    by_name = SUFFIXES.get(path.suffix.lower())
    unsupported = found if found not in (None, "gzip") else by_name
    if unsupported:
        plain = path.stem if by_name else "unpacked-" + path.name
        unpack = f"{UNPACK[unsupported]} {shlex.quote(str(path))} > " + shlex.quote(
            str(path.with_name(plain))
        )
        raise DataFileError(
            f"{path}: {unsupported}-compressed files are not read (unsupported "
            f"compression); unpack it (`{unpack}`) or compress it with gzip (.gz)"
        )
    head = _head(path, found)
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return TextFile(path, found, encoding, len(bom))
    return TextFile(path, found, "utf-8", 0)


def _open(path: Path, compression: str | None) -> BinaryIO:
    if compression == "gzip":
        return gzip.open(path, "rb")
    return path.open("rb")


def _damaged(path: Path, line: int, err: BaseException) -> DataFileError:
    return DataFileError(
        f"{path}, line {line}: the gzip data is damaged or cut off ({err}); copy the "
        f"file again (`gzip -t {shlex.quote(str(path))}` checks it)"
    )


def _iconv(tf: TextFile, source: str) -> str:
    """The command that converts the file to UTF-8."""
    name = tf.path.name[:-3] if tf.compression else tf.path.name
    out = shlex.quote(str(tf.path.with_name("utf8-" + name)))
    src = shlex.quote(str(tf.path))
    if tf.compression:
        return f"zcat {src} | iconv -f {source} -t utf-8 > {out}"
    return f"iconv -f {source} -t utf-8 {src} > {out}"


def _line_text(tf: TextFile, n: int, raw: bytes) -> str:
    """One line decoded as UTF-8, without its line end (LF or CRLF)."""
    if b"\x00" in raw:
        col = raw.index(b"\x00") + 1
        if raw.count(b"\x00") * 3 >= len(raw):
            fix = (
                "looks like UTF-16 without a byte-order mark; convert it with "
                f"`{_iconv(tf, 'utf-16le')}`"
            )
        else:
            fix = "a binary or damaged file (was it cut off or overwritten?)"
        raise DataFileError(f"{tf.path}, line {n}: NUL byte at column {col}: {fix}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        col = len(raw[: err.start].decode("utf-8", errors="replace")) + 1
        raise DataFileError(
            f"{tf.path}, line {n}: not UTF-8 (byte 0x{raw[err.start]:02X} at column "
            f"{col}); it was probably saved as cp1252/Latin-1 (Excel, Windows "
            f"editors): convert it with `{_iconv(tf, 'cp1252')}` and use that file"
        ) from None
    return text.rstrip("\r\n")


def _wide_lines(tf: TextFile, data: bytes) -> Iterator[tuple[int, str]]:
    """Lines of a UTF-16/UTF-32 file (decoded whole: its line ends are not b"\\n")."""
    try:
        text = data.decode(tf.encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].decode(tf.encoding, errors="replace").count("\n") + 1
        raise DataFileError(
            f"{tf.path}, line {line}: not valid {ENCODING_NAMES[tf.encoding]} (the "
            "byte-order mark says so); save it again as UTF-8"
        ) from None
    for n, line in enumerate(text.split("\n"), 1):
        if "\x00" in line:
            raise DataFileError(f"{tf.path}, line {n}: NUL character: a damaged file")
        yield n, line.rstrip("\r")


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of a user's text file."""
    tf = sniff(path)
    n = 0
    try:
        with _open(tf.path, tf.compression) as fh:
            if tf.encoding in ("utf-16", "utf-32"):
                yield from _wide_lines(tf, fh.read())
                return
            fh.read(tf.bom)
            for n, raw in enumerate(fh, 1):
                yield n, _line_text(tf, n, raw)
    except (OSError, EOFError, zlib.error) as err:
        raise _damaged(tf.path, n + 1, err) from None


def read_text(path: str | Path) -> str:
    """A user's whole text file (JSON, YAML), decoded as `text_lines` reads it."""
    return "\n".join(line for _, line in text_lines(path))
