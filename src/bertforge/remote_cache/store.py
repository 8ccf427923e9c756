"""One remote cache location, spoken to through fsspec: s3:// (s3fs), gs:// (gcsfs), file://, or any other
protocol fsspec knows. Credentials and endpoints come from the storage library's own sources (for S3:
the AWS_* environment variables, ~/.aws files, instance roles); none is ever taken from a recipe, and
the URL is printed with any user:password or query string removed.

Two writes must be atomic for the cache to be safe to share: a blob appears whole or not at all, and an
entry's manifest is created only if absent. Object stores give the first with every PUT; the second is
S3's conditional PUT (If-None-Match, which s3fs sends for mode="create"), GCS's generation match. On a
filesystem path (file://, a mount shared between runners) both are a temp file, then a hard link that
fails when the name exists. Other protocols fall back to fsspec's check-then-write (not atomic).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bertforge.errors import BertforgeError

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "r2"}
BLOCK = 1 << 20


class RemoteError(BertforgeError):
    """The remote cache could not be read or written (unreachable, refused, or it failed mid-way)."""


class BlobMismatch(BertforgeError):
    """A fetched blob whose bytes are not the ones its name (their sha256) promises."""


def redacted(url: str) -> str:
    """The URL without user:password@ or a query string (where signed URLs and keys travel)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host if parts.username or parts.password else parts.netloc, parts.path, "", ""))


def scrub(text: str) -> str:
    """A library's error message with every credential this process knows of blanked out."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS",
                 "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?i)(signature|credential|x-amz-security-token)=[^&\s\"']+", r"\1=***", text)


def describe(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return scrub(f"{type(error).__name__}: {first}" if first else type(error).__name__)


@dataclass(frozen=True)
class Listed:
    path: str  # relative to the store's root
    size: int
    modified: float  # seconds since the epoch (modified_time)


def modified_time(info: dict[str, Any]) -> float:
    """A file's modification time from an fsspec info dict: s3fs LastModified, local mtime, gcsfs updated
    (an ISO string), adlfs last_modified / creation_time, memory created. A store that says none reads
    as written now: read as 0 (1970), prune took every file of it as old."""
    modified = (info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("last_modified")
                or info.get("creation_time") or info.get("created") or time.time())
    if hasattr(modified, "timestamp"):
        return float(modified.timestamp())
    if isinstance(modified, str):
        return datetime.datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
    return float(modified)


def conflicting_write(exc: OSError) -> bool:
    """Whether an object store refused a write because another one to the same key was in flight."""
    import errno

    return exc.errno == errno.EBUSY or "ConditionalRequestConflict" in str(exc)


class RemoteStore:
    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.shown = redacted(self.url)
        try:
            protocol = fsspec.core.split_protocol(self.url)[0] or "file"
            # a fresh instance (fsspec reuses one per arguments, which would keep an endpoint the
            # environment no longer names), and no listing cache: another runner writes meanwhile
            options = {"skip_instance_cache": True, **({"use_listings_cache": False}
                                                       if protocol in OBJECT_STORES else {})}
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its package not installed
            from bertforge.errors import UsageError

            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
            hint = f" (pip install 'bertforge[{extra}]')" if extra and isinstance(exc, ImportError) else ""
            raise UsageError(f"remote cache {self.shown}: {describe(exc)}{hint}") from None
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = protocol in ("file", "local")
        self.object_store = protocol in OBJECT_STORES

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}"

    @contextlib.contextmanager
    def _failing_as(self, what: str) -> Iterator[None]:
        try:
            yield
        except (BlobMismatch, FileExistsError, FileNotFoundError):
            raise
        except Exception as exc:  # any storage library's error: one line, credentials scrubbed
            raise RemoteError(f"remote cache {self.shown}: {what} failed ({describe(exc)})") from None

    def check(self) -> None:
        """One request, so an unreachable or refusing store is found before any stage runs."""
        with self._failing_as("reaching it"):
            self.fs.exists(self._full("stages"))

    def read(self, path: str) -> bytes | None:
        with self._failing_as(f"reading {path}"):
            try:
                return self.fs.cat_file(self._full(path))
            except FileNotFoundError:
                return None

    def exists(self, path: str) -> bool:
        with self._failing_as(f"looking up {path}"):
            return self.fs.exists(self._full(path))

    def size(self, path: str) -> int | None:
        found = self.stat(path)
        return found.size if found is not None else None

    def stat(self, path: str) -> Listed | None:
        """The file's size and modification time; None where there is none."""
        with self._failing_as(f"looking up {path}"):
            try:
                info = self.fs.info(self._full(path))
            except FileNotFoundError:
                return None
        return Listed(path, int(info.get("size") or 0), modified_time(info))

    def create(self, path: str, data: bytes) -> bool:
        """Write `data` at `path` only if nothing is there; False (nothing written) when something is."""
        full = self._full(path)
        with self._failing_as(f"writing {path}"):
            if self.local:
                Path(full).parent.mkdir(parents=True, exist_ok=True)
                staged = Path(f"{full}.tmp-{uuid.uuid4().hex}")
                staged.write_bytes(data)
                try:
                    os.link(staged, full)  # fails when the name exists: atomic create-if-absent
                except FileExistsError:
                    return False
                finally:
                    staged.unlink()
                return True
            for attempt in range(5):
                try:
                    self.fs.pipe_file(full, data, mode="create")
                    return True
                except FileExistsError:
                    return False
                except OSError as exc:
                    # S3 answers a conditional PUT racing another with 409 ConditionalRequestConflict
                    # ("retry the upload"); s3fs passes it on as a plain OSError
                    if not conflicting_write(exc) or attempt == 4:
                        raise
                    if self.fs.exists(full):
                        return False
                    time.sleep(0.05 * (attempt + 1))
            return False

    def overwrite(self, path: str, data: bytes) -> None:
        with self._failing_as(f"writing {path}"):
            if self.local:
                self._put_local_atomic(data, self._full(path))
            else:
                self.fs.pipe_file(self._full(path), data)

    def _put_local_atomic(self, data: bytes | Path, full: str) -> None:
        Path(full).parent.mkdir(parents=True, exist_ok=True)
        staged = Path(f"{full}.tmp-{uuid.uuid4().hex}")
        try:
            if isinstance(data, Path):
                import shutil

                shutil.copyfile(data, staged)
            else:
                staged.write_bytes(data)
            os.replace(staged, full)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def put_file(self, local: Path, path: str) -> None:
        """Upload a file so that it appears whole or not at all (a PUT on an object store, temp file and
        rename on a filesystem path, upload then move elsewhere)."""
        full = self._full(path)
        with self._failing_as(f"uploading {path}"):
            if self.local:
                self._put_local_atomic(Path(local), full)
            elif self.object_store:
                self.fs.put_file(str(local), full)
            else:
                staged = f"{full}.tmp-{uuid.uuid4().hex}"
                self.fs.put_file(str(local), staged)
                self.fs.mv(staged, full)

    def get_verified(self, path: str, dest: Path, sha256: str, size: int) -> None:
        """Download `path` to `dest`, hashing as it streams; BlobMismatch when its size or sha256 is not
        the promised one (the partial file is removed), FileNotFoundError when absent."""
        digest = hashlib.sha256()
        written = 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._failing_as(f"downloading {path}"), self.fs.open(self._full(path), "rb") as source, \
                    open(dest, "wb") as target:
                for block in iter(lambda: source.read(BLOCK), b""):
                    digest.update(block)
                    target.write(block)
                    written += len(block)
            if written != size:
                raise BlobMismatch(f"{written} bytes where {size} were promised (truncated or replaced)")
            if digest.hexdigest() != sha256:
                raise BlobMismatch("its bytes do not hash to its name (altered)")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise

    def rehash(self, path: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with self._failing_as(f"reading {path}"), self.fs.open(self._full(path), "rb") as source:
            for block in iter(lambda: source.read(BLOCK), b""):
                digest.update(block)
                size += len(block)
        return digest.hexdigest(), size

    def listing(self, prefix: str) -> list[Listed]:
        """Every file under `prefix` (recursively), relative to the root."""
        with self._failing_as(f"listing {prefix}"):
            try:
                found: dict[str, Any] = self.fs.find(self._full(prefix), detail=True)
            except FileNotFoundError:
                return []
        listed = []
        for full, info in found.items():
            if info.get("type") == "directory":
                continue
            listed.append(Listed(full[len(self.root) + 1:] if full.startswith(self.root + "/") else full,
                                 int(info.get("size") or 0), modified_time(info)))
        return sorted(listed, key=lambda item: item.path)

    def remove(self, path: str) -> None:
        with self._failing_as(f"removing {path}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._full(path))
