"""The servers under test, each started as a subprocess on loopback: lollms_fast (its CLI),
llama-cpp-python's own server and llama.cpp's C++ `llama-server` (built by
build_llama_server.py). Each is polled until it answers HTTP, measured from outside through
/proc (CPU time of every thread, peak RSS), and stopped by its process id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """An ephemeral port nobody listens on right now (a tiny race is acceptable here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the kernel's own high-water mark of the resident set, so no sampling is
    needed to catch the peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


class ServerProcess:
    """One server subprocess. `url` answers HTTP once `start()` returns."""

    name = "server"
    ready_path = "/"

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.cmd, self.env, self.port, self.log_path = cmd, env, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0  # spawn -> answering HTTP

    def start(self, timeout: float = 120.0) -> ServerProcess:
        t0 = time.perf_counter()
        log = self.log_path.open("ab")
        # its own process group, so stopping it never touches anything else
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); "
                                   f"see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as resp:
                    if resp.status == 200:
                        self.start_s = time.perf_counter() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def main_thread_cpu_s(self) -> float:
        """CPU seconds of the process's first thread: the event loop of both Python servers
        (in llama-server it is the thread that runs the slots and llama_decode)."""
        with open(f"/proc/{self.pid}/task/{self.pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9

    def cpu_s(self) -> float:
        """CPU seconds of the whole process (every thread) so far, in nanosecond resolution:
        the sum of each thread's schedstat run time. (psutil's cpu_times come from clock
        ticks, 10 ms steps: too coarse for a one-second window.) Threads that have exited
        drop out of the sum; both servers keep their threads for their whole life."""
        total = 0
        for task in os.scandir(f"/proc/{self.pid}/task"):
            try:
                with open(f"{task.path}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # the thread ended meanwhile
        return total / 1e9

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # every server here shuts down cleanly on SIGINT
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def lollms_server(*, model: Path, data_dir: Path, n_predict: int, threads: int,
                  ctx_size: int, parallel: int, log_path: Path,
                  extra_env: dict[str, str] | None = None) -> ServerProcess:
    """lollms_fast through its CLI. Greedy with a fixed length: the config overrides the
    personality's sampling parameters (temperature 0, no repeat penalty, n_predict)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")}
    env.update({
        "LOLLMS_OVERRIDE_PERSONALITY_MODEL_PARAMETERS": "true",
        "LOLLMS_TEMPERATURE": "0",
        "LOLLMS_REPEAT_PENALTY": "1.0",
        "LOLLMS_N_PREDICT": str(n_predict),
        "LOLLMS_SEED": "0",
        **(extra_env or {}),
    })
    cmd = [sys.executable, "-m", "lollms_fast", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--model", str(model), "--data-dir", str(data_dir),
           "--n-threads", str(threads), "--ctx-size", str(ctx_size),
           "--parallel", str(parallel)]
    server = ServerProcess(cmd, env, port, log_path)
    server.name = "lollms_fast"
    # the engine is loaded in the app's startup context, before the port listens
    server.ready_path = "/get_generation_status"
    return server


def llama_cpp_server(*, model: Path, threads: int, n_ctx: int, log_path: Path
                     ) -> ServerProcess:
    """llama-cpp-python's server, as its documentation runs it. `--interrupt_requests False`:
    by default a new request aborts the one streaming, so concurrent clients would cut each
    other short; with it off they queue, which is the only way 8 clients all get answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
           "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx), "--host", "127.0.0.1", "--port", str(port),
           "--interrupt_requests", "False"]
    server = ServerProcess(cmd, dict(os.environ), port, log_path)
    server.name = "llama-cpp-python server"
    server.ready_path = "/v1/models"
    return server


def llama_server(*, binary: Path, model: Path, threads: int, ctx_size: int, parallel: int,
                 n_batch: int, log_path: Path) -> ServerProcess:
    """llama.cpp's own server with lollms_fast's shape: `parallel` slots of `ctx_size` tokens
    (-c is the total), the same threads for decode and prompt, the same batch, no web UI.
    Everything else is llama-server's default, as a user runs it: continuous batching,
    flash attention "auto" (on for CPU, as in lollms_fast), one KV stream per slot (lollms_fast:
    one unified KV), sliding-window layers kept to their window (lollms_fast: full, for
    prefix reuse), the prompt cache in RAM."""
    port = free_port()
    cmd = [str(binary), "-m", str(model), "-np", str(parallel), "-c", str(ctx_size * parallel),
           "-t", str(threads), "-tb", str(threads), "-b", str(n_batch), "-ub", str(n_batch),
           "--no-webui", "--host", "127.0.0.1", "--port", str(port)]
    # its LLAMA_ARG_* variables set what the command line leaves out: none from the caller
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    server = ServerProcess(cmd, env, port, log_path)
    server.name = "llama-server"
    server.ready_path = "/health"  # 503 while the model loads, 200 when the slots are ready
    return server
