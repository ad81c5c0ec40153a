"""Configuration: one typed, frozen Config built from defaults < local_config.yaml < env < flags.

Every setting is declared once, in `SETTINGS` (name, type, default, help, limits). The
dataclass, the environment variables (`LOLLMS_<NAME>`), the YAML file, the validation of
`update_setting` and the documentation in docs/configuration.md all derive from that table
(a test checks the documentation against it).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from .errors import BadRequest, LollmsError
from .parsing import parse_int

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
CONFIG_FILE_NAME = "local_config.yaml"
ENV_PREFIX = "LOLLMS_"


def _physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lollms_fast"


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    # changing it needs the engine reloaded (model, context size, threads, slots)
    reload: bool = False
    # kept out of local_config.yaml (where the file lives, or the process's own place)
    persist: bool = True
    # never shown in full by get_config or logs
    secret: bool = False
    # a callable computing the default at start-up instead of a constant
    factory: Callable[[], Any] | None = None


SETTINGS: tuple[Setting, ...] = (
    # --- the 2023 keys (the seed's get_config) ---
    Setting("auto_read", bool, False, "Read answers aloud in the web UI (UI preference)."),
    Setting("binding", str, "llama_cpp", "Model binding; only llama_cpp exists.",
            choices=("llama_cpp",), reload=True),
    Setting("config", str, "local_config", "Name of the configuration file (without .yaml)."),
    Setting("ctx_size", int, 2048, "Context size in tokens per parallel slot.",
            lo=64, hi=262144, reload=True),
    Setting("db_path", str, "databases/database.db",
            "SQLite database file, relative to the data dir unless absolute."),
    Setting("debug", bool, False, "Debug logging (one line per request)."),
    Setting("host", str, "localhost", "Interface to listen on."),
    Setting("language", str, "en-US", "UI / speech language code."),
    Setting("model", str, DEFAULT_MODEL_FILE,
            "GGUF file name in <data_dir>/models/<binding>/, or a path to a GGUF file.",
            reload=True),
    Setting("n_predict", int, 1024, "Maximum number of tokens generated per answer.",
            lo=1, hi=262144),
    Setting("n_threads", int, None, "CPU threads for llama.cpp (default: physical cores).",
            lo=1, hi=1024, reload=True, factory=_physical_cores),
    Setting("nb_messages_to_remember", int, 5,
            "How many past messages of the branch go into the prompt.", lo=0, hi=100000),
    Setting("override_personality_model_parameters", bool, False,
            "Use the config's sampling parameters instead of the personality's."),
    Setting("personality", str, "lollms", "Personality folder name."),
    Setting("personality_category", str, "general", "Personality category folder."),
    Setting("personality_language", str, "english", "Personality language folder."),
    Setting("port", int, 9600, "TCP port to listen on.", lo=0, hi=65535),
    Setting("repeat_last_n", int, 40, "Tokens considered by the repeat penalty.",
            lo=0, hi=262144),
    Setting("repeat_penalty", float, 1.2, "Penalty for repeated tokens (1.0 = none).",
            lo=0.0, hi=10.0),
    Setting("seed", int, -1, "Sampling seed; -1 picks a random one per answer.",
            lo=-1, hi=2**63 - 1),
    Setting("temperature", float, 0.9, "Sampling temperature (0 = greedy).", lo=0.0, hi=10.0),
    Setting("top_k", int, 50, "Sample among the k most likely tokens (0 = all).",
            lo=0, hi=262144),
    Setting("top_p", float, 0.95, "Nucleus sampling probability mass.", lo=0.0, hi=1.0),
    Setting("use_avx2", bool, True, "Kept for compatibility; AVX2 is chosen at build time."),
    Setting("use_gpu", bool, False, "Offload all layers to the GPU (needs a GPU build).",
            reload=True),
    Setting("use_new_ui", bool, True, "Kept for compatibility; the built-in UI is always served."),
    Setting("version", int, 3, "Configuration format version."),
    Setting("voice", str, "", "Text-to-speech voice (UI preference)."),
    # --- this server's own keys ---
    Setting("data_dir", str, None,
            "Where models, databases, personalities and local_config.yaml live.",
            persist=False, factory=lambda: str(default_data_dir())),
    Setting("parallel", int, 8, "Parallel generation slots (concurrent answers).",
            lo=1, hi=256, reload=True),
    Setting("n_batch", int, 512, "Maximum tokens decoded in one llama_decode call.",
            lo=8, hi=65536, reload=True),
    Setting("kv_cache_ram_mb", int, 1024,
            "Host RAM for KV states of sequences evicted from their slot (0 = off).",
            lo=0, hi=1 << 24, reload=True),
    Setting("kv_cache_disk_mb", int, 4096,
            "Disk space under kv_cache_dir for KV states, kept across restarts "
            "(0 = off).", lo=0, hi=1 << 30, reload=True),
    Setting("kv_cache_dir", str, "kv_cache",
            "Folder of the KV disk tier, relative to the data dir unless absolute. One "
            "folder per server process: `serve --replicas` gives each replica "
            "kv_cache/<port>.", reload=True, persist=False),
    Setting("queue_size", int, 64,
            "Requests allowed to wait for a free slot; more get a 'busy' error.", lo=0, hi=100000),
    Setting("api_key", str, "",
            "If set, every API request and Socket.IO connection must present it.",
            secret=True, persist=False),
    Setting("allowed_origins", str, "",
            "Comma-separated extra origins allowed for cross-origin Socket.IO/HTTP ('*' = any).",),
    Setting("allowed_hosts", str, "",
            "Comma-separated extra host names the server answers to, besides localhost, "
            "loopback addresses, the bind address and the machine's name ('*' = any)."),
    Setting("max_body_size", int, 8 * 1024 * 1024,
            "Largest accepted request body (and Socket.IO message) in bytes.",
            lo=1024, hi=2**34),
    Setting("max_import_size", int, 64 * 1024 * 1024,
            "Largest /import_multiple_discussions body in bytes.", lo=1024, hi=2**36),
    Setting("max_import_messages", int, 200_000,
            "Most discussions, and most messages, one import may hold.", lo=1, hi=100_000_000),
    Setting("max_prompt_chars", int, 100_000,
            "Longest prompt in characters, checked before tokenizing; longer stored messages "
            "are left out of the history.", lo=1, hi=100_000_000),
    Setting("durable", bool, False, "SQLite synchronous=FULL instead of NORMAL."),
    Setting("db_url", str, "",
            "Discussions database: sqlite:///path (relative to the data dir; sqlite:////path "
            "absolute) or postgresql://user:password@host:port/dbname for replicas. Empty: "
            "the SQLite file db_path.", secret=True),
    Setting("socketio_redis_url", str, "",
            "redis://host:port/db shared by replicas: Socket.IO events, stop_gen and settings "
            "changes cross replicas, and browser sessions live there. Empty: one process.",
            secret=True),
    Setting("ui_dir", str, "", "Serve the web UI from this folder instead of the built-in one."),
    Setting("allow_private_downloads", bool, False,
            "Let install_model download from loopback and private-network addresses."),
    Setting("access_log", bool, False,
            "Log one line per HTTP request (client, method, path, status, time; never query "
            "strings, keys or bodies)."),
    Setting("ssl_certfile", str, "", "TLS certificate (PEM) to serve HTTPS with."),
    Setting("ssl_keyfile", str, "", "TLS private key (PEM) of ssl_certfile."),
    Setting("chat_template_file", str, "",
            "Jinja chat template for /v1/chat/completions, used instead of the model's own "
            "(for a GGUF without one); relative to the data dir unless absolute."),
    Setting("strict_model_names", bool, False,
            "/v1 requests naming another model than the loaded one get a 404 (off: the "
            "loaded model answers whatever name a client sends)."),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

# keys that only the command line / environment decide (the file cannot move the data dir)
_NOT_FROM_FILE = frozenset({"data_dir"})
# what reset_settings keeps: where the data lives, the key and the UI (SPEC section 3)
KEPT_ON_RESET = ("data_dir", "db_path", "db_url", "socketio_redis_url", "api_key", "ui_dir")


def _default(name: str) -> Any:
    """The dataclass field of setting `name`, its default taken from SETTINGS."""
    s = SETTINGS_BY_NAME[name]
    if s.factory is not None:
        return field(default_factory=s.factory)
    return field(default=s.default)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The effective configuration. Immutable: `updated()` returns a new one.

    One field per entry of SETTINGS, in its order and of its type (checked at import), so
    that every setting is typed for callers; `extra` holds the file's unknown keys, and
    `overrides` what the environment and the command line set (reset_settings keeps it).
    """

    auto_read: bool = _default("auto_read")
    binding: str = _default("binding")
    config: str = _default("config")
    ctx_size: int = _default("ctx_size")
    db_path: str = _default("db_path")
    debug: bool = _default("debug")
    host: str = _default("host")
    language: str = _default("language")
    model: str = _default("model")
    n_predict: int = _default("n_predict")
    n_threads: int = _default("n_threads")
    nb_messages_to_remember: int = _default("nb_messages_to_remember")
    override_personality_model_parameters: bool = _default(
        "override_personality_model_parameters")
    personality: str = _default("personality")
    personality_category: str = _default("personality_category")
    personality_language: str = _default("personality_language")
    port: int = _default("port")
    repeat_last_n: int = _default("repeat_last_n")
    repeat_penalty: float = _default("repeat_penalty")
    seed: int = _default("seed")
    temperature: float = _default("temperature")
    top_k: int = _default("top_k")
    top_p: float = _default("top_p")
    use_avx2: bool = _default("use_avx2")
    use_gpu: bool = _default("use_gpu")
    use_new_ui: bool = _default("use_new_ui")
    version: int = _default("version")
    voice: str = _default("voice")
    data_dir: str = _default("data_dir")
    parallel: int = _default("parallel")
    n_batch: int = _default("n_batch")
    kv_cache_ram_mb: int = _default("kv_cache_ram_mb")
    kv_cache_disk_mb: int = _default("kv_cache_disk_mb")
    kv_cache_dir: str = _default("kv_cache_dir")
    queue_size: int = _default("queue_size")
    api_key: str = _default("api_key")
    allowed_origins: str = _default("allowed_origins")
    allowed_hosts: str = _default("allowed_hosts")
    max_body_size: int = _default("max_body_size")
    max_import_size: int = _default("max_import_size")
    max_import_messages: int = _default("max_import_messages")
    max_prompt_chars: int = _default("max_prompt_chars")
    durable: bool = _default("durable")
    db_url: str = _default("db_url")
    socketio_redis_url: str = _default("socketio_redis_url")
    ui_dir: str = _default("ui_dir")
    allow_private_downloads: bool = _default("allow_private_downloads")
    access_log: bool = _default("access_log")
    ssl_certfile: str = _default("ssl_certfile")
    ssl_keyfile: str = _default("ssl_keyfile")
    chat_template_file: str = _default("chat_template_file")
    strict_model_names: bool = _default("strict_model_names")
    extra: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    # the file's own (validated) values: what `save` keeps for a setting that a flag or the
    # environment overrides and nobody changed since (a replica's --port, a db_url password
    # given by environment never land in the shared file)
    from_file: dict[str, Any] = field(default_factory=dict)

    # --- derived paths ---
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def config_path(self) -> Path:
        return self.data_path / CONFIG_FILE_NAME

    @property
    def models_dir(self) -> Path:
        return self.data_path / "models" / self.binding

    @property
    def chat_template_path(self) -> Path | None:
        if not self.chat_template_file:
            return None
        p = Path(self.chat_template_file).expanduser()
        return p if p.is_absolute() else self.data_path / p

    @property
    def database_path(self) -> Path:
        p = Path(self.db_path).expanduser()
        return p if p.is_absolute() else self.data_path / p

    @property
    def database_url(self) -> str:
        """`db_url`, or the SQLite file `db_path` as a URL."""
        return self.db_url or f"sqlite:///{self.database_path}"

    @property
    def kv_cache_path(self) -> Path:
        p = Path(self.kv_cache_dir).expanduser()
        return p if p.is_absolute() else self.data_path / p

    @property
    def personalities_dir(self) -> Path:
        return self.data_path / "personalities"

    # --- transformations ---
    def updated(self, changes: Mapping[str, Any]) -> Config:
        """A copy with `changes` validated and applied; BadRequest (config unchanged) if any is
        invalid. Unknown names are refused."""
        clean = {name: validate(name, value) for name, value in changes.items()}
        return dataclasses.replace(self, **clean)

    def to_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for s in SETTINGS:
            value = getattr(self, s.name)
            if s.secret and value and not reveal_secrets:
                value = "********"
            out[s.name] = value
        return out

    def file_dict(self) -> dict[str, Any]:
        """What `save()` writes: persisted settings plus the unknown keys read from the file.
        A setting still at the value a flag or the environment gave it is written as the
        file had it (or left out): flags and environment are this run's, not the file's."""
        out: dict[str, Any] = dict(self.extra)
        for s in SETTINGS:
            if not s.persist:
                continue
            value = getattr(self, s.name)
            if s.name in self.overrides and self.overrides[s.name] == value:
                if s.name in self.from_file:
                    out[s.name] = self.from_file[s.name]
                continue
            out[s.name] = value
        return out

    def save(self, path: Path | None = None) -> Path:
        target = path or self.config_path
        atomic_write_text(target, yaml.safe_dump(self.file_dict(), sort_keys=True,
                                                 allow_unicode=True))
        return target



def _check_fields() -> None:
    """Config declares exactly the settings of SETTINGS, in order, with their types."""
    declared = [(f.name, f.type) for f in dataclasses.fields(Config)]
    expected = [(s.name, s.type.__name__) for s in SETTINGS]
    expected += [("extra", "dict[str, Any]"), ("overrides", "dict[str, Any]"),
                 ("from_file", "dict[str, Any]")]
    if declared != expected:
        raise TypeError(f"Config fields differ from SETTINGS: {declared} != {expected}")


_check_fields()


def reload_keys(old: Config, new: Config) -> list[str]:
    """The engine-level settings (`reload`) whose value differs between two configs: the
    one place that decides whether a change needs a new engine."""
    return [s.name for s in SETTINGS
            if s.reload and getattr(old, s.name) != getattr(new, s.name)]


def reset_config(config: Config) -> Config:
    """The defaults with the environment and command line applied (what this process would
    start with without local_config.yaml), keeping KEPT_ON_RESET and the unknown keys."""
    kept = {name: getattr(config, name) for name in KEPT_ON_RESET}
    return Config(extra=config.extra, overrides=config.overrides, from_file=config.from_file,
                  **{**config.overrides, **kept})


# ---------------------------------------------------------------- validation


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadRequest(f"{name} must be a boolean (true/false), got {value!r}")


def _to_int(name: str, value: Any) -> int:
    """Settings also come from YAML, the environment and old UIs: integral floats and text
    with surrounding blanks are accepted, then the one strict parser decides."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        value = value.strip()
    return parse_int(name, value)


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise BadRequest(f"{name} must be a number, got {value!r}") from None
    else:
        raise BadRequest(f"{name} must be a number, got {value!r}")
    if result != result or result in (float("inf"), float("-inf")):
        raise BadRequest(f"{name} must be a finite number")
    return result


def validate(name: str, value: Any) -> Any:
    """Convert and check one setting's value; BadRequest if the name or value is bad."""
    s = SETTINGS_BY_NAME.get(name)
    if s is None:
        raise BadRequest(f"unknown setting {name!r}")
    if s.type is bool:
        result: Any = _to_bool(name, value)
    elif s.type is int:
        result = _to_int(name, value)
    elif s.type is float:
        result = _to_float(name, value)
    else:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise BadRequest(f"{name} must be a string, got {value!r}")
        result = str(value)
        if len(result) > 4096:
            raise BadRequest(f"{name} is too long")
    if s.lo is not None and result < s.lo:
        raise BadRequest(f"{name} must be >= {s.lo}, got {result}")
    if s.hi is not None and result > s.hi:
        raise BadRequest(f"{name} must be <= {s.hi}, got {result}")
    if s.choices is not None and result not in s.choices:
        raise BadRequest(f"{name} must be one of {', '.join(s.choices)}, got {result!r}")
    return result


# ---------------------------------------------------------------- loading


class ConfigError(LollmsError):
    """The configuration file or environment is unusable (reported as one line by the CLI)."""


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in SETTINGS:
        key = ENV_PREFIX + s.name.upper()
        if key in environ:
            out[s.name] = environ[key]
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return {str(k): v for k, v in data.items()}


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """defaults < <data_dir>/local_config.yaml < LOLLMS_* environment < flags."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = env_overrides(os.environ if environ is None else environ)

    data_dir = flags.get("data_dir") or env.get("data_dir") or str(default_data_dir())
    config_file = Path(data_dir).expanduser() / CONFIG_FILE_NAME
    from_file = read_config_file(config_file)

    # unknown keys, and the file's own value of settings it never writes (an api_key kept in
    # the file stays there; one given by flag or environment is never written to it)
    extra = {k: v for k, v in from_file.items()
             if k not in SETTINGS_BY_NAME or not SETTINGS_BY_NAME[k].persist}
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    file_values: dict[str, Any] = {}
    for layer_name, layer in (("file " + str(config_file), from_file), ("environment", env),
                              ("command line", flags)):
        for name, value in layer.items():
            if name not in SETTINGS_BY_NAME or (layer is from_file and name in _NOT_FROM_FILE):
                continue
            if value is None and layer is from_file:
                continue
            try:
                values[name] = validate(name, value)
            except BadRequest as exc:
                raise ConfigError(f"{layer_name}: {exc.message}") from None
            if layer is not from_file:
                overrides[name] = values[name]
            else:
                file_values[name] = values[name]
    values["data_dir"] = str(Path(data_dir).expanduser())
    return Config(extra=extra, overrides=overrides, from_file=file_values, **values)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

