"""Documents to text: txt, md, pdf (pypdf), docx (python-docx).

Each parser returns sections (text plus where it came from, such as a PDF page) so that a
passage can be cited by page. A file that cannot be read raises DocumentError with a
message for the person who uploaded it; the rest of a batch goes on.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = (".txt", ".md", ".markdown", ".pdf", ".docx")
MAX_FILE_BYTES = 50 * 1024 * 1024


class DocumentError(ValueError):
    """A file we cannot read, with a reason its owner can act on."""


@dataclass(frozen=True)
class Section:
    text: str
    location: str | None = None  # "p. 3"


@dataclass(frozen=True)
class ParsedDocument:
    source_name: str
    title: str
    sections: tuple[Section, ...]
    sha256: str

    @property
    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)

    @property
    def chars(self) -> int:
        return sum(len(s.text) for s in self.sections)


def _decode(data: bytes, name: str) -> str:
    for encoding in ("utf-8-sig", "gb18030"):  # gb18030 covers GBK/GB2312 files from Chinese Windows
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise DocumentError(f"{name}: not UTF-8 or GB18030 text; save it as UTF-8 and upload it again.")


def _pdf_sections(data: bytes, name: str) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password only to stop editing.
            try:
                if not reader.decrypt(""):
                    raise DocumentError(f"{name}: the PDF is password-protected; upload an unprotected copy.")
            except DocumentError:
                raise
            except Exception as exc:
                raise DocumentError(f"{name}: the PDF is encrypted and cannot be opened ({exc}).") from exc
        sections = []
        for number, page in enumerate(reader.pages, 1):
            text = page.extract_text() or ""
            if text.strip():
                sections.append(Section(text, f"p. {number}"))
        return sections
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise DocumentError(f"{name}: not a readable PDF ({type(exc).__name__}: {exc}).") from exc


MAX_UNPACKED_BYTES = 200 * 1024 * 1024


def _check_unpacked_size(data: bytes, name: str) -> None:
    """A .docx is a zip: refuse one that would inflate past MAX_UNPACKED_BYTES (a zip bomb)
    before any XML is read. Python's zip reader stops at the sizes the archive declares."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DocumentError(f"{name}: not a readable .docx file ({type(exc).__name__}: {exc}).") from exc
    if unpacked > MAX_UNPACKED_BYTES:
        raise DocumentError(f"{name}: expands to {unpacked / 2**20:,.0f} MiB when unpacked, over the "
                            f"{MAX_UNPACKED_BYTES // 2**20} MiB limit; it is not a normal Word document.")


def _docx_sections(data: bytes, name: str) -> list[Section]:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    _check_unpacked_size(data, name)
    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, OSError) as exc:
        raise DocumentError(f"{name}: not a readable .docx file ({type(exc).__name__}: {exc}).") from exc
    except Exception as exc:  # zipfile.BadZipFile and lxml errors
        raise DocumentError(f"{name}: not a readable .docx file ({type(exc).__name__}: {exc}).") from exc
    lines = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    return [Section("\n".join(lines))]


def _title(sections: list[Section], fallback: str) -> str:
    for section in sections:
        for line in section.text.splitlines():
            line = line.strip().lstrip("#").strip()
            if line:
                return line[:120]
    return fallback


def plain_name(name: str) -> str:
    """The file name without any folders: an upload's name is a label, never a path
    (both separators: a Windows browser may send backslashes)."""
    return str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].strip()


def parse_bytes(data: bytes, name: str) -> ParsedDocument:
    name = plain_name(name)
    if name in ("", ".", ".."):
        raise DocumentError("The file has no name; give it one with an extension such as .md.")
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED:
        raise DocumentError(f"{name}: {suffix or 'no extension'} is not supported; use {', '.join(SUPPORTED)}.")
    if len(data) > MAX_FILE_BYTES:
        raise DocumentError(f"{name}: {len(data) / 2**20:.0f} MiB is over the {MAX_FILE_BYTES // 2**20} MiB limit.")
    if suffix == ".pdf":
        sections = _pdf_sections(data, name)
    elif suffix == ".docx":
        sections = _docx_sections(data, name)
    else:
        sections = [Section(_decode(data, name))]
    sections = [Section(_normalise(s.text), s.location) for s in sections]
    sections = [s for s in sections if s.text]
    if not sections:
        raise DocumentError(f"{name}: no text found (a scanned PDF needs OCR first).")
    stem = Path(name).stem
    title = _title(sections, stem) if suffix in (".md", ".markdown") else stem
    return ParsedDocument(Path(name).name, title, tuple(sections), hashlib.sha256(data).hexdigest())


def parse_file(path: Path | str) -> ParsedDocument:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"{path.name}: cannot be read ({exc.strerror or exc}).") from exc
    return parse_bytes(data, path.name)


_SPACES = re.compile(r"[ \t\u3000\xa0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()
