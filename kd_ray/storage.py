"""Where runs live: a local folder, or any pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://``).

``location(path_or_uri)`` returns a ``pathlib.Path`` for a local path (so local runs behave as
they always did) and a ``RemotePath`` for a URI: the small part of Path's interface our run files
use (``/``, ``name``, ``parent``, ``exists``, ``read_text``, ``write_bytes``, ``glob``, ...), over
``pyarrow.fs``. Object stores have no rename and no append: ``append_text`` rewrites the object
(run files are small), and folders that must appear whole are written locally first and copied
with ``upload`` (readers check a manifest written last). Credentials and endpoints come from the
environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...) or the URI's query (``?endpoint_override=``).
"""
from __future__ import annotations

import fnmatch
import functools
import io
import os
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from urllib.parse import urlsplit

from kd_ray.errors import ConfigError, first_line

# Forwarded from the driver to every Ray worker when run.storage is a URI (cluster.session).
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
               "GOOGLE_APPLICATION_CREDENTIALS")


def is_uri(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, netloc: str, query: str):
    import pyarrow.fs as pafs  # local: pyarrow is imported only by runs that use a URI

    uri = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    return pafs.FileSystem.from_uri(uri)[0]


class RemotePath:
    """A path on a pyarrow filesystem, named by its URI (``str()`` gives the URI back)."""

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.scheme, self.query = parts.scheme, parts.query
        self.fs_path = (parts.netloc + parts.path).rstrip("/")
        try:
            self.fs = _filesystem(parts.scheme, parts.netloc, parts.query)
        except Exception as exc:  # unknown scheme, missing driver library, bad options
            raise ConfigError(f"storage {uri}: {first_line(exc)[:200]}: use a local folder or a URI pyarrow "
                              "can open (s3://bucket/prefix, gs://bucket/prefix)") from None

    def _child(self, fs_path: str) -> RemotePath:
        return RemotePath(f"{self.scheme}://{fs_path}" + (f"?{self.query}" if self.query else ""))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.fs_path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name) -> RemotePath:
        return self._child(f"{self.fs_path}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.fs_path).name

    @property
    def parent(self) -> RemotePath:
        return self._child(str(PurePosixPath(self.fs_path).parent))

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def _info(self):
        return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def stat(self):
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(2, "not found", str(self))
        return SimpleNamespace(st_size=info.size, st_mtime_ns=info.mtime_ns)

    def read_bytes(self) -> bytes:
        if not self.is_file():
            raise FileNotFoundError(2, "not found", str(self))
        with self.fs.open_input_stream(self.fs_path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.fs_path) as f:  # one object: appears whole or not at all
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.fs_path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        if self.exists() or not missing_ok:
            self.fs.delete_file(self.fs_path)

    def iterdir(self):
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        return [self._child(info.path) for info in infos]

    def glob(self, pattern: str):
        """Direct children whose name matches ``pattern`` (no ``**``)."""
        return [p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)]

    def expanduser(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self


def location(path) -> Path | RemotePath:
    """A Path for a local path, a RemotePath for a URI."""
    if isinstance(path, (Path, RemotePath)):
        return path
    if is_uri(path):
        return RemotePath(str(path))
    return Path(str(path).removeprefix("file://"))


def storage_root(storage) -> str:
    """A storage URI as given; a local folder made absolute (workers run elsewhere)."""
    return str(storage) if is_uri(storage) else str(Path(storage).expanduser().resolve())


def append_text(path, text: str) -> None:
    path = location(path)
    if isinstance(path, Path):
        with open(path, "a") as out:
            out.write(text)
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)


def rmtree(path) -> None:
    path = location(path)
    if isinstance(path, Path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.delete_dir(path.fs_path)


def upload(local_dir, dest, skip=()) -> None:
    """Copy a local folder's files (all levels) into ``dest``; files named in ``skip`` go last."""
    dest, local_dir = location(dest), Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for file in sorted(files, key=lambda p: p.name in skip):
        target = dest
        for part in file.relative_to(local_dir).parts:
            target = target / part
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())


def download(src, local_dir) -> Path:
    """Copy a remote folder (all levels) into ``local_dir``; returns ``local_dir``."""
    src, local_dir = location(src), Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            download(child, local_dir / child.name)
        else:
            (local_dir / child.name).write_bytes(child.read_bytes())
    return local_dir


def open_bytes(path) -> io.BytesIO:
    return io.BytesIO(location(path).read_bytes())


def local_mirror(path) -> Path:
    """A local folder standing for a remote one (TensorBoard files are written on the head node)."""
    path = location(path)
    if isinstance(path, Path):
        return path
    root = Path(os.environ.get("KD_RAY_LOCAL_MIRROR", Path.home() / ".cache" / "kd_ray" / "storage"))
    return root / path.scheme / path.fs_path


def check_storage(uri: str) -> None:
    """Refuse a URI whose bucket is missing or unreachable, in one line (driver pre-flight)."""
    import pyarrow.fs as pafs

    try:
        path = location(uri)
    except ConfigError as exc:
        raise ConfigError(f"run.{exc}") from None
    bucket = path.fs_path.split("/")[0]
    try:
        kind = path.fs.get_file_info(bucket).type
    except Exception as exc:  # no credentials, no route to the endpoint
        raise ConfigError(f"run.storage {uri}: cannot reach it ({first_line(exc)[:200]}); check the URI, "
                          "the credentials and AWS_ENDPOINT_URL") from None
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"run.storage {uri}: bucket {bucket!r} not found: create it or set "
                          "run.storage to an existing bucket/prefix")


def save_figure(fig, path, dpi: int = 120) -> None:
    """A matplotlib figure as PNG at ``path``: a local file or an object in storage alike."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    location(path).write_bytes(buffer.getvalue())


def local_copy(path, stamp: str = "manifest.json") -> Path:
    """A local copy of a remote folder, downloaded once per machine (under ``local_mirror``) and
    kept while its ``stamp`` file is unchanged: readers that seek (the teacher cache's row files)
    read a local disk, never the object store row by row."""
    path = location(path)
    target = local_mirror(path)
    remote_stamp = (path / stamp).read_bytes()
    if (target / stamp).is_file() and (target / stamp).read_bytes() == remote_stamp:
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    download(path, tmp)
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process on this machine finished its copy first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    return target
