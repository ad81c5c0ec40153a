"""The `lollms-fast` command: argv -> Config -> server, nothing more."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_MODEL_FILE, Config, ConfigError, load_config
from .errors import LollmsError
from .modelfiles import list_models, resolve_model, stderr_progress

COMMANDS = ("serve", "bench", "models", "migrate")

# flag -> config key; every serve flag maps to one setting
SERVE_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "host", str, "interface to listen on (default localhost)"),
    ("--port", "port", int, "TCP port (default 9600)"),
    ("--model", "model", str, "GGUF file: a path, or a name in <data-dir>/models/llama_cpp/"),
    ("--data-dir", "data_dir", str, "folder for models, databases, personalities and config "
                                    "(default ~/.local/share/lollms_fast)"),
    ("--db-path", "db_path", str, "SQLite file, relative to the data dir unless absolute"),
    ("--db-url", "db_url", str, "sqlite:///path or postgresql://user:pw@host/db (replicas)"),
    ("--socketio-redis-url", "socketio_redis_url", str,
     "redis://host:port/db shared by replicas (events, stop_gen, sessions)"),
    ("--n-threads", "n_threads", int, "CPU threads for llama.cpp (default: physical cores)"),
    ("--ctx-size", "ctx_size", int, "context size in tokens per slot (default 2048)"),
    ("--parallel", "parallel", int, "parallel generation slots (default 8)"),
    ("--ui-dir", "ui_dir", str, "serve another web UI build from this folder"),
    ("--api-key", "api_key", str, "require this key on every API request (never saved to "
                                  "the config file; --api-key-file keeps it out of `ps`)"),
    ("--ssl-certfile", "ssl_certfile", str, "serve HTTPS with this certificate (PEM)"),
    ("--ssl-keyfile", "ssl_keyfile", str, "the private key (PEM) of --ssl-certfile"),
    ("--chat-template-file", "chat_template_file", str,
     "Jinja chat template for /v1/chat/completions instead of the model's own"),
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                   help="folder for models, databases, personalities and config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lollms-fast",
        description="A fast, self-hosted LLM chat server speaking the lollms-webui API. "
                    "Without a command it runs `serve`.",
        epilog="Settings also come from LOLLMS_<SETTING> environment variables and "
               "<data-dir>/local_config.yaml (flags win, then environment, then the file).",
    )
    parser.add_argument("--version", action="version", version=f"lollms-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (default)",
                           description="Run the HTTP + Socket.IO server on one model.")
    for flag, key, kind, help_text in SERVE_FLAGS:
        serve.add_argument(flag, dest=key, type=kind, metavar=key.upper(), help=help_text)
    serve.add_argument("--api-key-file", dest="api_key_file", metavar="FILE",
                       help="read the API key from this file (its first line)")
    serve.add_argument("--debug", action="store_const", const=True, default=None,
                       help="debug logging, one line per request")
    serve.add_argument("--access-log", dest="access_log", action="store_const", const=True,
                       default=None, help="log one line per request (never keys or bodies)")
    serve.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="run N server processes on ports PORT .. PORT+N-1 behind your "
                            "proxy (one machine; see docs/deployment.md)")

    models = sub.add_parser("models", help="list the models available to the server",
                            description="List GGUF files in the models folder.")
    _add_common(models)
    _add_bench(sub.add_parser(
        "bench", help="measure a running server under load",
        description="Stream --requests answers through --clients concurrent clients from a "
                    "running server (lollms_fast, llama-server, Ollama, vLLM, ...) and report "
                    "time to first token, tokens/s, gaps between pieces and errors.",
        epilog="Exit status: 0 when every request succeeded, 1 when some failed, 2 when the "
               "run could not start. With --api lollms, --max-tokens and the sampling options "
               "given are set on the server with update_setting for the run (in memory, with "
               "override_personality_model_parameters on) and set back afterwards."))
    migrate = sub.add_parser(
        "migrate", help="copy every discussion from one database to another",
        description="Copy every discussion and message, ids and dates kept, from one store "
                    "into an empty other (SQLite -> PostgreSQL for replicas, or back), then "
                    "verify every row. The source is never modified. See docs/storage.md.",
        epilog="Exit status: 0 copied and verified, 1 refused (nothing written) or not "
               "verified, 2 a database that cannot be opened.")
    migrate.add_argument("--from", dest="source", required=True, metavar="URL",
                         help="sqlite:///path (relative to the current folder) or "
                              "postgresql://user:pw@host/db")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL",
                         help="an empty database, same forms")
    migrate.add_argument("--adopt-orphans", action="store_true",
                         help="copy messages whose discussion was deleted into recreated "
                              "discussions (refused without it)")
    migrate.add_argument("--replace-nul", action="store_true",
                         help="write U+FFFD for U+0000 in text going to PostgreSQL "
                              "(refused without it)")
    return parser


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:9600")
    p.add_argument("--api", choices=("lollms", "openai"), default="openai",
                   help="lollms: Socket.IO generate_msg; openai: streamed /v1 requests "
                        "(default openai)")
    p.add_argument("--clients", type=int, default=1, metavar="N",
                   help="concurrent clients (default 1)")
    p.add_argument("--requests", type=int, default=None, metavar="M",
                   help="requests in total, shared by the clients (default: one each)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="K",
                   help="tokens per answer at most (default 128; lollms: n_predict)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt of every request")
    prompt.add_argument("--prompts", type=Path, metavar="FILE.json",
                        help="a JSON list of prompts, used in turn")
    for flag, kind in (("--temperature", float), ("--top-k", int), ("--top-p", float),
                       ("--repeat-penalty", float), ("--seed", int)):
        p.add_argument(flag, type=kind, default=None,
                       help="sampling (default: the server's own)")
    p.add_argument("--model", help="the model name sent to an OpenAI server (default: the "
                                   "first of its /v1/models)")
    p.add_argument("--api-key", help="sent as Authorization: Bearer (openai) or X-API-Key "
                                     "(lollms)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="openai: /v1/completions (default) or /v1/chat/completions")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up on one answer after this long (default 300)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (it is off anyway when stderr is not a "
                        "terminal)")


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    try:
        prompts = (bench.load_prompts(args.prompts) if args.prompts is not None
                   else [args.prompt if args.prompt is not None else bench.DEFAULT_PROMPT])
    except bench.BenchError as exc:
        print(f"lollms-fast bench: error: {exc}", file=sys.stderr)
        return 2
    sampling = {name: getattr(args, name) for name in
                ("temperature", "top_k", "top_p", "repeat_penalty", "seed")
                if getattr(args, name) is not None}
    options = bench.BenchOptions(
        url=args.url, api=args.api, clients=args.clients,
        requests=args.requests if args.requests is not None else args.clients,
        max_tokens=args.max_tokens, prompts=prompts, sampling=sampling, model=args.model,
        api_key=args.api_key, endpoint=args.endpoint, timeout=args.timeout,
        progress=not args.no_progress)
    return bench.main(options, args.json)


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """`lollms-fast [--port N ...]` means `lollms-fast serve [--port N ...]`."""
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "serve")
    return args


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not debug:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def cmd_models(config: Config) -> int:
    names = list_models(config.models_dir)
    print(f"models folder: {config.models_dir}")
    for name in names:
        marker = "*" if name == config.model else " "
        print(f" {marker} {name}")
    if DEFAULT_MODEL_FILE not in names:
        print(f"   {DEFAULT_MODEL_FILE} (embedded default, assembled on first `serve`)")
    return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop: every streamed piece crosses the event loop (wake-up from the engine thread,
    a WebSocket write), and on a 2-core machine that CPU is taken from llama.cpp's threads.
    LOLLMS_FAST_ASYNCIO_LOOP=1 keeps the standard loop (for comparison and debugging)."""
    if os.environ.get("LOLLMS_FAST_ASYNCIO_LOOP") != "1":
        try:
            import uvloop
        except ImportError:  # a platform without uvloop wheels (Windows)
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def cmd_serve(config: Config) -> int:
    from aiohttp import web

    from .app import build_app

    setup_logging(config.debug)
    log = logging.getLogger("lollms_fast")
    started = time.perf_counter()
    if not is_loopback(config.host) and not config.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address "
                    "can read and change every discussion; set --api-key-file (see "
                    "docs/security.md)", config.host)
    try:
        context = ssl_context(config)
        model_path = resolve_model(config.model, config.models_dir, DEFAULT_MODEL_FILE,
                                   progress=stderr_progress("assembling default model"))
        app = build_app(config)  # an unknown db_url scheme, a missing driver
    except LollmsError as exc:  # a model, database or personality that cannot be used
        print(f"lollms-fast: error: {exc.message}", file=sys.stderr)
        return 2

    async def banner(_app: web.Application) -> None:
        url = f"{'https' if context else 'http'}://{config.host}:{config.port}/"
        log.info("lollms-fast %s serving on %s", __version__, url)
        log.info("model %s | threads %d | slots %d | ctx %d per slot | data %s",
                 model_path, config.n_threads, config.parallel, config.ctx_size,
                 config.data_dir)
        log.info("ready in %.2fs", time.perf_counter() - started)

    app.on_startup.append(banner)
    try:
        web.run_app(app, host=config.host, port=config.port, print=None, ssl_context=context,
                    shutdown_timeout=3.0, access_log=None, handle_signals=True,
                    loop=new_event_loop())
    except LollmsError as exc:  # a model, database or personality that cannot be used
        print(f"lollms-fast: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lollms-fast: error: cannot listen on {config.host}:{config.port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 2
    return 0


def read_key_file(path: Path) -> str:
    """The API key in a file: its first line, surrounding blanks removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the API key file {path}: {reason}") from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"the API key file {path} is empty")
    return lines[0].strip()


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """HTTPS when a certificate is configured; ConfigError if it cannot be used."""
    if not config.ssl_certfile and not config.ssl_keyfile:
        return None
    if not config.ssl_certfile or not config.ssl_keyfile:
        raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use the TLS certificate {config.ssl_certfile}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(normalise_argv(sys.argv[1:] if argv is None else argv))
    if args.command == "bench":  # a client of some server: no config of its own
        return cmd_bench(args)
    if args.command == "migrate":  # two databases named on the command line, no config
        from .storage import copy

        return copy.run(args.source, args.target, root=Path.cwd(),
                        adopt_orphans=args.adopt_orphans, replace_nul=args.replace_nul)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
    replicas = flags.pop("replicas", None)
    try:
        key_file = flags.pop("api_key_file", None)
        if key_file is not None:
            if flags.get("api_key") is not None:
                raise ConfigError("give --api-key or --api-key-file, not both")
            flags["api_key"] = read_key_file(Path(key_file))
        config = load_config(flags)
    except LollmsError as exc:
        print(f"lollms-fast: error: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "models":
        return cmd_models(config)
    if replicas is not None and replicas != 1:
        from . import replicas as supervisor

        return supervisor.supervise(config, replicas, supervisor.child_argv(args, SERVE_FLAGS))
    return cmd_serve(config)
