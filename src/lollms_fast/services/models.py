"""The model zoo (`/get_available_models`) and model install / uninstall (SPEC 3).

The zoo is a catalog `models.yaml` (the data dir's `models/<binding>/models.yaml` if there is
one, else the one shipped with the package) plus every local model file the catalog does not
name. An install streams an http(s) GGUF into a hidden temporary file beside its target,
checks its size and GGUF header, and links it into place without overwriting anything; on
any failure or cancellation nothing is left behind.

Downloads only reach public addresses unless `allow_private_downloads` is on: the host of the
URL and of every redirect hop is resolved and each address checked before the request, and
the connection's own resolver refuses private addresses again (no DNS-rebinding window).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
import yaml
from aiohttp.abc import AbstractResolver, ResolveResult

from ..config import Config
from ..errors import (
    BadRequest,
    Conflict,
    LollmsError,
    NotFound,
    PayloadTooLarge,
    UpstreamError,
)
from ..modelfiles import GGUF_MAGIC, LISTED_SUFFIXES
from ..personalities.loader import safe_name

if TYPE_CHECKING:
    from .engine_control import EngineControl
    from .settings import SettingsService

log = logging.getLogger("lollms_fast.models")

PACKAGED_CATALOG = Path(__file__).resolve().parent.parent / "models.yaml"
CATALOG_NAME = "models.yaml"
DEFAULT_ICON = "/images/default_model.png"  # the 2023 default

MAX_MODEL_BYTES = 512 * 1024**3  # larger than any GGUF a single machine runs
MAX_REDIRECTS = 5
PROGRESS_INTERVAL_S = 0.25  # at most four progress events a second
WRITE_BLOCK = 4 * 1024 * 1024  # bytes gathered before one write in a thread
DNS_TIMEOUT_S = 30.0
TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=120)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Report = Callable[[dict[str, Any]], Awaitable[None]]


# ------------------------------------------------------------------ the zoo


def _text(entry: Mapping[str, Any], key: str, default: str = "") -> str:
    value = entry.get(key)
    return value if isinstance(value, str) else default


def read_catalog(path: Path) -> list[dict[str, Any]]:
    """The entries of one catalog file, each checked; raises ValueError / OSError when the
    file is unreadable or not a list. Bad entries are skipped with a warning."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("expected a list of models")
    entries = []
    for i, item in enumerate(raw):
        try:
            entries.append(_catalog_entry(item))
        except ValueError as exc:
            log.warning("model catalog %s: entry %d skipped: %s", path, i + 1, exc)
    return entries


def _catalog_entry(item: Any) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError("not a mapping")
    filename = item.get("filename")
    if not isinstance(filename, str) or not safe_name(filename):
        raise ValueError("'filename' must be a plain file name")
    server = item.get("server")
    if not isinstance(server, str) or urlsplit(server).scheme not in ("http", "https"):
        raise ValueError("'server' must be an http(s) URL")
    filesize = item.get("filesize", 0)
    if isinstance(filesize, bool) or not isinstance(filesize, int) or filesize < 0:
        filesize = 0
    return {
        "title": _text(item, "title", filename),
        "icon": _text(item, "icon", DEFAULT_ICON),
        "license": _text(item, "license", "unknown"),
        "owner": _text(item, "owner"),
        "owner_link": _text(item, "owner_link"),
        "description": _text(item, "description"),
        "isInstalled": False,
        "path": server.rstrip("/") + "/" + filename,
        "filesize": filesize,
        "model_type": _text(item, "model_type", "gguf"),
        "filename": filename,
    }


def catalog_path(models_dir: Path, packaged: Path = PACKAGED_CATALOG) -> Path:
    local = models_dir / CATALOG_NAME
    return local if local.is_file() else packaged


def local_model_files(models_dir: Path) -> dict[str, int]:
    """{file name: size in bytes} of the model files in `models_dir` (no hidden files)."""
    found: dict[str, int] = {}
    try:
        entries = list(models_dir.iterdir())
    except OSError:
        return found
    for path in entries:
        if path.name.startswith(".") or path.suffix.lower() not in LISTED_SUFFIXES:
            continue
        try:
            if path.is_file():
                found[path.name] = path.stat().st_size
        except OSError:
            continue
    return found


def available_models(models_dir: Path, packaged: Path = PACKAGED_CATALOG
                     ) -> list[dict[str, Any]]:
    """Blocking (run in a thread): the catalog's entries, then local GGUF files it lacks."""
    source = catalog_path(models_dir, packaged)
    try:
        catalog = read_catalog(source)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.warning("model catalog %s is unusable, listing local files only: %s",
                    source, exc)
        catalog = []
    local = local_model_files(models_dir)
    listed: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry in catalog:
        name = entry.pop("filename")
        if name in seen:
            continue
        seen.add(name)
        if name in local:
            entry["isInstalled"] = True
            entry["filesize"] = local[name]
        listed.append(entry)
    for name in sorted(local):
        if name in seen or not name.lower().endswith(".gguf"):
            continue
        listed.append({
            "title": name, "icon": DEFAULT_ICON, "license": "unknown", "owner": "",
            "owner_link": "", "description": "A local model file (not in the catalog).",
            "isInstalled": True, "path": name, "filesize": local[name],
            "model_type": "gguf",
        })
    return listed


# ------------------------------------------------------------------ address checks


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, shared, reserved, multicast, unspecified
    addresses (an IPv4-mapped IPv6 address is judged as its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local
                                 or ip.is_loopback or ip.is_unspecified or ip.is_private)


class BlockedAddress(OSError):
    """A download host resolved to an address the server may not reach."""


async def resolve_public(host: str, port: int, family: int = socket.AF_UNSPEC
                         ) -> list[tuple[int, int, str, int]]:
    """(family, proto, address, port) of every address of `host`; BlockedAddress if any of
    them is not public (a name with one private address is refused as a whole)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM),
            DNS_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc}") from None
    found: list[tuple[int, int, str, int]] = []
    for fam, _type, proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if not is_public_address(address):
            raise BlockedAddress(
                f"host {host!r} resolves to the non-public address {address}; downloads "
                f"from loopback or private networks need the setting allow_private_downloads")
        found.append((fam, proto, address, int(sockaddr[1])))
    if not found:
        raise OSError(f"cannot resolve host {host!r}")
    return found


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver for downloads: the address connected to is one that was checked
    (a name cannot resolve to a public address for the check and a private one after)."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host=address, port=p, family=fam, proto=proto,
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                for fam, proto, address, p in await resolve_public(host, port, family)]

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------ names and URLs


def model_name_from_url(url: str) -> str:
    """The file name an install writes: the URL path's last segment, percent-decoded,
    which must be a plain `.gguf` file name; any `..` segment (raw or encoded) is refused."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise BadRequest(f"only http and https downloads are allowed, not "
                         f"{parts.scheme or 'a bare path'!r}")
    if not parts.hostname:
        raise BadRequest("the URL has no host")
    segments = parts.path.split("/")
    if any(unquote(s) in (".", "..") for s in segments[1:]):
        raise BadRequest("the URL path may not contain '.' or '..' segments")
    name = unquote(segments[-1])
    if not safe_name(name) or ":" in name:
        raise BadRequest(f"{name!r} is not a plain file name")
    if not name.lower().endswith(".gguf"):
        raise BadRequest(f"{name!r} is not a .gguf file")
    return name


def model_name_from_path(path: str) -> str:
    """The file name `uninstall_model` deletes: a plain name, or the last segment of a URL
    (what the zoo lists as `path`). Anything with a directory part is refused."""
    parts = urlsplit(path)
    if parts.scheme.lower() in ("http", "https"):
        return model_name_from_url(path)
    if not safe_name(path) or ":" in path:
        raise BadRequest(f"{path!r} is not a model file name")
    return path


def _check_hop(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadRequest(f"redirected to a {scheme or 'relative'!r} URL; only http and https "
                         f"are allowed")
    if not parts.hostname:
        raise BadRequest("the URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise BadRequest("the URL has an invalid port") from None
    return parts.hostname, port


# ------------------------------------------------------------------ the service


@dataclass
class _Install:
    task: asyncio.Task[Any]
    owner: str | None


class ModelService:
    """Lists the zoo and installs / uninstalls model files of the current binding.

    Reads the live settings (binding, models folder, allow_private_downloads, the configured
    model) and the config the running engine was built from (to protect the loaded model)."""

    def __init__(self, settings: SettingsService, engine: EngineControl[Any] | None = None,
                 *, packaged_catalog: Path = PACKAGED_CATALOG,
                 max_bytes: int = MAX_MODEL_BYTES) -> None:
        self.settings = settings
        self.engine = engine
        self.packaged_catalog = packaged_catalog
        self.max_bytes = max_bytes
        self._installs: dict[str, _Install] = {}

    async def available(self) -> list[dict[str, Any]]:
        models_dir = self.settings.config.models_dir
        return await asyncio.to_thread(available_models, models_dir, self.packaged_catalog)

    # -------------------------------------------------------------- install

    async def install(self, payload: Any, report: Report, owner: str | None = None) -> None:
        """`install_model`: every outcome is reported (`succeeded` or `failed`); only a
        cancellation (client gone, shutdown) ends it silently, after cleaning up."""
        try:
            url = self._path_field(payload)
            name = model_name_from_url(url)
            await self._install(url, name, report, owner)
        except LollmsError as exc:
            log.info("install_model failed: %s", exc.message)
            await report({"status": "failed", "progress": 0, "error": exc.message})
            return
        except Exception as exc:  # a bug must not leave the client waiting forever
            log.exception("install_model failed")
            await report({"status": "failed", "progress": 0,
                          "error": f"internal error ({type(exc).__name__})"})
            return
        await report({"status": "succeeded", "progress": 100, "error": ""})

    async def _install(self, url: str, name: str, report: Report, owner: str | None) -> None:
        config = self.settings.config
        models_dir = config.models_dir
        if name in self._installs:
            raise Conflict(f"{name} is already being downloaded")
        task = asyncio.current_task()
        assert task is not None
        self._installs[name] = _Install(task, owner)
        try:
            if await asyncio.to_thread(os.path.lexists, models_dir / name):
                raise Conflict(f"model {name} is already installed")
            await asyncio.to_thread(models_dir.mkdir, parents=True, exist_ok=True)
            # created on the loop (one quick syscall): a cancellation cannot land between
            # the file's creation and the `finally` that removes it
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=models_dir)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    await self._download(url, out, report, config.allow_private_downloads,
                                         models_dir)
                    await asyncio.to_thread(_flush, out)
                await asyncio.to_thread(_link_into_place, tmp, models_dir / name)
                log.info("installed model %s from %s", name, url)
            finally:
                await asyncio.shield(asyncio.to_thread(tmp.unlink, missing_ok=True))
        finally:
            self._installs.pop(name, None)

    async def _download(self, url: str, out: Any, report: Report, allow_private: bool,
                        models_dir: Path) -> None:
        resolver: AbstractResolver | None = None if allow_private else PublicOnlyResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT,
                                         auto_decompress=False) as session:
            try:
                resp = await self._open(session, url, allow_private)
                try:
                    await self._receive(resp, out, report, models_dir)
                finally:
                    resp.close()  # drops the connection at once if the body was not read
            except aiohttp.ClientConnectorError as exc:
                blocked = _blocked_cause(exc)
                if blocked is not None:
                    raise BadRequest(str(blocked)) from None
                raise UpstreamError(f"cannot connect to {exc.host}: "
                                     f"{exc.os_error.strerror or exc.os_error}") from None
            except aiohttp.ClientPayloadError:
                raise UpstreamError("the download broke off before the end (the server "
                                     "closed the connection)") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"download failed: {exc}") from None
            except asyncio.TimeoutError:
                raise UpstreamError("download timed out (the server stopped "
                                     "sending)") from None

    async def _open(self, session: aiohttp.ClientSession, url: str,
                    allow_private: bool) -> aiohttp.ClientResponse:
        """GET with redirects followed by hand, each hop's scheme and host checked."""
        for _ in range(MAX_REDIRECTS + 1):
            host, port = _check_hop(url)
            if not allow_private:
                try:
                    await resolve_public(host, port)
                except BlockedAddress as exc:
                    raise BadRequest(str(exc)) from None
                except OSError as exc:
                    raise UpstreamError(str(exc)) from None
            resp = await session.get(url, allow_redirects=False,
                                     headers={"Accept-Encoding": "identity"})
            if resp.status not in REDIRECT_STATUSES:
                if resp.status != 200:
                    resp.release()
                    raise UpstreamError(f"the server answered HTTP {resp.status} "
                                         f"{resp.reason or ''}".rstrip())
                return resp
            location = resp.headers.get("Location")
            resp.release()
            if not location:
                raise UpstreamError(f"HTTP {resp.status} redirect without a Location")
            url = urljoin(url, location)
        raise UpstreamError(f"more than {MAX_REDIRECTS} redirects")

    async def _receive(self, resp: aiohttp.ClientResponse, out: Any, report: Report,
                       models_dir: Path) -> None:
        encoding = resp.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("", "identity"):
            raise UpstreamError(f"the server sent a {encoding}-encoded body")
        total = resp.content_length
        if total is not None:
            if total == 0:
                raise UpstreamError("the server sent an empty file")
            if total > self.max_bytes:
                raise PayloadTooLarge(f"the file is {total} bytes, more than the limit "
                                      f"of {self.max_bytes}")
            free = (await asyncio.to_thread(shutil.disk_usage, models_dir)).free
            if total > free:
                raise UpstreamError(f"not enough disk space ({total} bytes needed, "
                                     f"{free} free)")
        await report({"status": "progress", "progress": 0})
        received = 0
        checked = False
        pending = bytearray()
        last_report = time.monotonic()
        last_percent = 0
        async for chunk in resp.content.iter_chunked(1 << 20):
            received += len(chunk)
            if received > self.max_bytes or (total is not None and received > total):
                raise UpstreamError("the server sent more bytes than announced")
            pending += chunk
            if not checked and len(pending) >= len(GGUF_MAGIC):
                if bytes(pending[:len(GGUF_MAGIC)]) != GGUF_MAGIC:
                    raise UpstreamError("not a GGUF model file (bad header)")
                checked = True
            if len(pending) >= WRITE_BLOCK:
                await asyncio.to_thread(out.write, pending)
                pending = bytearray()
            now = time.monotonic()
            if total and now - last_report >= PROGRESS_INTERVAL_S:
                percent = min(99, received * 100 // total)
                if percent != last_percent:
                    last_report, last_percent = now, percent
                    await report({"status": "progress", "progress": percent})
        if pending:
            await asyncio.to_thread(out.write, pending)
        if received == 0:
            raise UpstreamError("the server sent an empty file")
        if total is not None and received != total:
            raise UpstreamError(f"the download broke off: {received} of {total} bytes")
        if not checked:
            raise UpstreamError("not a GGUF model file (too short)")

    # -------------------------------------------------------------- uninstall

    async def uninstall(self, payload: Any, report: Report) -> None:
        try:
            name = model_name_from_path(self._path_field(payload))
            await asyncio.to_thread(self._delete, name)
        except LollmsError as exc:
            log.info("uninstall_model refused: %s", exc.message)
            await report({"status": "failed", "progress": 0, "error": exc.message})
            return
        except OSError as exc:
            await report({"status": "failed", "progress": 0,
                          "error": f"cannot delete the file: {exc.strerror or exc}"})
            return
        log.info("uninstalled model %s", name)
        await report({"status": "succeeded", "progress": 100, "error": ""})

    def _delete(self, name: str) -> None:
        """Blocking: unlink `models_dir/name` if it is a model file inside the folder that
        is neither configured nor loaded."""
        models_dir = self.settings.config.models_dir
        if Path(name).suffix.lower() not in LISTED_SUFFIXES:
            raise BadRequest(f"{name!r} is not a model file (.gguf or .bin)")
        path = models_dir / name
        if not os.path.lexists(path):
            raise NotFound(f"model {name} is not installed")
        real_root = models_dir.resolve()
        target = path.resolve()
        if target.parent != real_root or not target.is_file():
            raise BadRequest(f"{name} is not a model file inside the models folder")
        if target in set(self._in_use()):
            raise Conflict(f"{name} is the current model; choose another model before "
                           f"uninstalling it")
        path.unlink()

    def _in_use(self) -> Iterator[Path]:
        """Resolved paths of the configured model and of the one the running engine uses."""
        configs: list[Config] = [self.settings.config]
        if self.engine is not None and self.engine.applied is not None:
            configs.append(self.engine.applied)
        for config in configs:
            candidate = Path(config.model).expanduser()
            if not (candidate.is_absolute() or len(candidate.parts) > 1):
                candidate = config.models_dir / candidate
            try:
                yield candidate.resolve()
            except OSError:
                continue

    # -------------------------------------------------------------- cancellation

    def cancel_owner(self, owner: str) -> None:
        """The client that asked is gone: its downloads stop and clean up."""
        for install in list(self._installs.values()):
            if install.owner == owner:
                install.task.cancel()

    async def shutdown(self) -> None:
        tasks = [i.task for i in self._installs.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _path_field(payload: Any) -> str:
        path = payload.get("path") if isinstance(payload, Mapping) else None
        if not isinstance(path, str) or not path.strip():
            raise BadRequest("expected an object {\"path\": URL or file name}")
        return path.strip()


def _flush(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _link_into_place(tmp: Path, target: Path) -> None:
    """Publish the finished download without ever replacing an existing file: a hard link
    fails if the target appeared meanwhile; where links are unsupported, check then rename."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise Conflict(f"model {target.name} appeared while downloading; "
                       f"the existing file was kept") from None
    except OSError:
        if os.path.lexists(target):
            raise Conflict(f"model {target.name} appeared while downloading; "
                           f"the existing file was kept") from None
        os.replace(tmp, target)


def _blocked_cause(exc: BaseException) -> BlockedAddress | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BlockedAddress):
            return seen
        seen = seen.__cause__ or seen.__context__
    os_error = getattr(exc, "os_error", None)
    return os_error if isinstance(os_error, BlockedAddress) else None
