"""mapd owns a model server's life: it picks the port, starts the command, waits until it answers,
logs its output, and stops its whole process group, whatever happens (docs/scaling.md).

    from mapd.models import servable
    from mapd.serve import ServerFailed, served

    folder = servable("embedded:smollm2-135m-instruct")       # a folder a server can load (mapd.models)
    with served("transformers serve {model} --port {port}", folder, name="student",
                log_path=run_dir / "server.log") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        client.chat.completions.create(model=server.model_name, messages=..., temperature=0)
        server.check()   # raises ServerFailed (with the log's last lines) if the server has died

``served(command, model, *, name, log_path, ready_timeout_s=600, host="127.0.0.1", stop_grace_s=10,
         port_attempts=3)`` -> context manager yielding a :class:`Server`
    ``command`` is a template. Its fields are ``{model}`` (the model reference, e.g. from ``mapd.models.servable``),
    ``{port}`` (required: a free port mapd picks), ``{name}`` (the served model name) and ``{host}``; values are
    shell-quoted (do not quote the fields yourself). A simple command, with leading ``VAR=value`` assignments
    (``CUDA_VISIBLE_DEVICES=0,1 vllm serve ...``), runs directly; a line with shell syntax (``&&``, ``$X``,
    pipes, globs) runs under ``/bin/sh -c``. mapd talks to the server at ``host``; a template without ``{host}``
    leaves the bind address to the server's default (vLLM: all interfaces; transformers serve: localhost). Any other ``{word}`` is an error; other braces (JSON arguments) are kept.
    The command starts in its own session and process group, with stdout and stderr appended to ``log_path``
    after a header line naming the command. mapd polls ``GET /health`` every 0.5 s (a 404 there falls back to
    ``GET /v1/models``) until one answers 200. Then it yields the :class:`Server`. On leaving the block
    (normally, on an exception, on Ctrl-C) it sends SIGTERM to the whole group, SIGKILL after ``stop_grace_s``,
    and waits until no process of the group is left.

    ServerFailed: an unknown field or no ``{port}`` (before anything starts); the command exiting before it is
    ready; not ready after ``ready_timeout_s``. A start that fails because its port was taken in the meantime
    (the log says "address already in use") is retried on another free port, ``port_attempts`` times in all.

``Server`` (frozen dataclass): ``base_url`` ("http://{host}:{port}/v1"), ``model_name`` (what requests must
    name as ``model``: ``name`` when the template uses ``{name}``, else the ``{model}`` value, as transformers
    serve and SGLang serve the path they were given), ``process`` (the Popen of the group leader), ``log_path``,
    ``command`` (as run), ``port``. ``check()`` raises ServerFailed naming the exit code and quoting the log's
    last lines if the server has exited; call it when a request fails to connect, to report the real cause.

No server outlives mapd: besides the ``finally`` above, an ``atexit`` hook stops any server still running, and
a small watchdog process (its own session) stops the group when mapd dies in any way (SIGKILL and the OOM
killer included): it holds a pipe from mapd and acts on end-of-file. Stopping a group also stops every process
its leader started in another session (torchrun's workers). :func:`start_group` and :func:`stop_group` give
any command this care (``train.launch`` runs through them); :func:`command_env` finds commands installed beside
mapd's interpreter when they are not on PATH.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mapd.errors import MapdError
from mapd.log import log

FIELDS = ("model", "port", "name", "host")
NOT_STARTED = "http://127.0.0.1:9/v1"  # a server not started yet (every call so far cached): no request goes there
TAIL_LINES = 10
_FIELD = re.compile(r"\{(\w*)\}")
_PORT_TAKEN = re.compile(r"address already in use|errno 98|eaddrinuse|errno 48", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class CommandFailed(MapdError):
    """A command mapd ran that failed: one line naming the command, with its log's last lines (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, *, command: str = "", log_path: Path | None = None, tail: list[str] | None = None,
                 returncode: int | None = None) -> None:
        self.command, self.log_path, self.tail, self.returncode = command, log_path, tail or [], returncode
        if self.tail:
            message += f"; last lines of {log_path}: " + " | ".join(self.tail)
        elif log_path is not None:
            message += f"; {log_path} has no output"
        super().__init__(message)


class ServerFailed(CommandFailed):
    """A model server that would not start, or died (exit code 2, as before the launcher's failures had one)."""

    exit_code = 2


# ------------------------------------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class Server:
    """A running server; see the module docstring."""

    base_url: str
    model_name: str
    process: subprocess.Popen = field(repr=False)
    log_path: Path
    command: str = ""
    port: int = 0
    _log_offset: int = field(default=0, repr=False)

    def check(self) -> None:
        """Raise ServerFailed (exit code, log tail) if the server's process has exited; else return."""
        code = self.process.poll()
        if code is not None:
            raise ServerFailed(f"server `{self.command}` {_exit_words(code)} while mapd was using it",
                               command=self.command, log_path=self.log_path,
                               tail=log_tail(self.log_path, self._log_offset), returncode=code)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it); the server binds it a moment later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:  # an address of another machine, a name that does not resolve
            raise ServerFailed(f"host {host!r}: a server cannot listen there ({exc}); use an address of this "
                               "machine, e.g. 127.0.0.1") from exc
        return probe.getsockname()[1]


def render(command: str, values: dict[str, str]) -> str:
    """The command line with its ``{field}``s replaced by shell-quoted values; ServerFailed on an unknown one."""
    used = _FIELD.findall(command)
    unknown = sorted({f for f in used if f not in FIELDS})
    if unknown:
        raise ServerFailed(f"server command `{command}`: unknown field(s) {', '.join('{' + f + '}' for f in unknown)}"
                           f" (known: {', '.join('{' + f + '}' for f in FIELDS)})", command=command)
    if "port" not in used:
        raise ServerFailed(f"server command `{command}` has no {{port}}: mapd picks the port, so the command must "
                           "take it from {port} (e.g. --port {port})", command=command)
    return _FIELD.sub(lambda m: shlex.quote(str(values[m.group(1)])), command)


def served_model_name(command: str, model: str, name: str) -> str:
    """What requests to the server must name as ``model``: ``name`` when the template passes ``{name}``, else
    the ``{model}`` value (transformers serve and SGLang serve the path they were given)."""
    return name if "{name}" in command else model


@contextlib.contextmanager
def served(command: str, model: str, *, name: str, log_path: Path, ready_timeout_s: float = 600.0,
           host: str = "127.0.0.1", stop_grace_s: float = 10.0, port_attempts: int = 3) -> Iterator[Server]:
    """Start the server, wait until it is ready, yield it, stop its process group (module docstring)."""
    log_path = Path(log_path)
    render(command, {"model": model, "port": 0, "name": name, "host": host})  # template errors before anything runs
    model_name = served_model_name(command, model, name)
    for attempt in range(1, port_attempts + 1):
        port = free_port(host)
        line = render(command, {"model": model, "port": port, "name": name, "host": host})
        server = _start(line, log_path, host=host, port=port, model_name=model_name, grace_s=stop_grace_s)
        try:
            _wait_ready(server, ready_timeout_s)
        except ServerFailed as failure:
            stop_group(server, stop_grace_s)
            if attempt < port_attempts and failure.returncode is not None and \
                    any(_PORT_TAKEN.search(text) for text in failure.tail):
                log.info(f"server port {port} was taken before the server bound it; trying another port")
                continue
            raise
        except BaseException:
            stop_group(server, stop_grace_s)
            raise
        break
    try:
        yield server
    finally:
        stop_group(server, stop_grace_s)


# The process groups running now, for the atexit hook: leader process -> its watchdog (None if it could not start).
_running: dict[subprocess.Popen, subprocess.Popen | None] = {}
_running_lock = threading.Lock()


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a command mapd starts runs in: mapd's own, unbuffered Python output, and the folder of
    mapd's interpreter appended to PATH, so ``transformers``, ``vllm`` or ``accelerate`` installed beside mapd
    are found when that environment is not activated (what PATH finds first still wins)."""
    env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"), **(extra or {})}
    beside = str(Path(sys.executable).parent)
    path = env.get("PATH", os.defpath)
    if beside not in path.split(os.pathsep):
        env["PATH"] = path + os.pathsep + beside if path else beside
    return env


def start_group(argv: list[str], *, env: dict[str, str], stdout, grace_s: float) -> subprocess.Popen:
    """Start ``argv`` in its own session and process group, watched: whatever happens to mapd (SIGKILL
    included), the group and every process it started are stopped (:func:`stop_group`; its watchdog, the
    atexit hook). ``stdout`` receives stdout and stderr. A command that cannot be run fails like a shell
    would (exit code 127, after a line naming it in ``stdout``)."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    except OSError as exc:
        message = f"mapd: cannot run {argv[0]}: {exc}\n".encode()
        if isinstance(stdout, int):
            os.write(stdout, message)
        else:
            stdout.write(message)
            stdout.flush()
        process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(127)"], stdin=subprocess.DEVNULL,
                                   stdout=stdout, start_new_session=True)
    try:
        watchdog = subprocess.Popen([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[3]); "
                                     "from mapd.serve import _watch; _watch(int(sys.argv[1]), float(sys.argv[2]))",
                                     str(process.pid), str(grace_s), str(Path(__file__).resolve().parents[1])],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
    except OSError:
        watchdog = None  # best effort: the finally and atexit still stop the group
    with _running_lock:
        _running[process] = watchdog
    return process


def _watch(pgid: int, grace_s: float) -> None:
    """The watchdog (its own process): on end-of-file from mapd, unless told "done", stop the group."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.stdin.readline().strip() != "done":
        _terminate(pgid, _tree(pgid), grace_s)


def _start(line: str, log_path: Path, *, host: str, port: int, model_name: str, grace_s: float) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(log_path, "ab") as out:
        out.write(f"===== mapd {stamp}: starting server on port {port}: {line}\n".encode())
        out.flush()
        offset = out.tell()
        log.info(f"starting server: {line} (log: {log_path})")
        argv, assignments = _argv(line)
        process = start_group(argv, env=command_env(assignments), stdout=out, grace_s=grace_s)
    url_host = f"[{host}]" if ":" in host else host
    return Server(base_url=f"http://{url_host}:{port}/v1", model_name=model_name, process=process,
                  log_path=log_path, command=line, port=port, _log_offset=offset)


def run_watched(line: str, log_path: Path, *, what: str, grace_s: float = 30.0) -> None:
    """Run a command line to its end in a watched group (:func:`start_group`; run like a server command, see
    :func:`_argv`), its output shown as it comes and appended to ``log_path`` after a header line. CommandFailed
    (``what``, the exit code, the log's last lines) when it exits non-zero; Ctrl-C stops the group and propagates."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv, assignments = _argv(line)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(log_path, "ab") as out:
        out.write(f"===== mapd {stamp}: running: {line}\n".encode())
        out.flush()
        offset = out.tell()
        read, write = os.pipe()
        try:
            process = start_group(argv, env=command_env(assignments), stdout=write, grace_s=grace_s)
        finally:
            os.close(write)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            with open(read, "rb", buffering=0) as pipe:
                while chunk := pipe.read(65536):  # progress bars redraw with \r: pass chunks on, not lines
                    out.write(chunk)
                    out.flush()
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
            code = process.wait()
        finally:
            stop_group(process, grace_s)  # at once when it has exited; else (Ctrl-C, an error) it is stopped
    if code != 0:
        raise CommandFailed(f"{what}: `{line}` {_exit_words(code)}", command=line, log_path=log_path,
                            tail=log_tail(log_path, offset), returncode=code)


def command_missing(line: str) -> str | None:
    """The program a command line (a template or launcher) would run, when it is found neither on PATH nor beside
    mapd's interpreter; None when it is found, or the line runs under /bin/sh (the shell reports it then)."""
    import shutil

    argv, assignments = _argv(line)
    if argv[:2] == ["/bin/sh", "-c"] or shutil.which(argv[0], path=command_env(assignments)["PATH"]):
        return None
    return argv[0]


_SHELL = re.compile(r"[|&;<>()$`\\*?\[\]~\n]")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def _argv(line: str) -> tuple[list[str], dict[str, str]]:
    """How to run the line: a simple command (``VAR=x cmd args``) runs directly, so the group's leader is the
    server itself and its exit code or signal is the server's; anything with shell syntax runs under /bin/sh."""
    if not _SHELL.search(line):
        with contextlib.suppress(ValueError):
            words = shlex.split(line)
            assignments = {}
            while words and _ASSIGNMENT.match(words[0]):
                key, _, value = words.pop(0).partition("=")
                assignments[key] = value
            if words:
                return words, assignments
    return ["/bin/sh", "-c", line], {}


def _wait_ready(server: Server, timeout_s: float) -> None:
    root = server.base_url[: -len("/v1")]
    started = time.monotonic()
    while True:
        code = server.process.poll()
        if code is not None:
            raise ServerFailed(f"server `{server.command}` {_exit_words(code)} before it was ready",
                               command=server.command, log_path=server.log_path,
                               tail=log_tail(server.log_path, server._log_offset), returncode=code)
        if _ready(root):
            log.info(f"server ready after {time.monotonic() - started:.1f} s: {server.base_url}")
            return
        if time.monotonic() - started > timeout_s:
            raise ServerFailed(f"server `{server.command}` not ready after {timeout_s:g} s (no 200 from "
                               f"{root}/health or {root}/v1/models)", command=server.command,
                               log_path=server.log_path, tail=log_tail(server.log_path, server._log_offset))
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=0.5)  # returns at once if it exits


_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy


def _status(url: str) -> int | None:
    try:
        with _no_proxy.open(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):  # refused, reset, timed out: not up yet
        return None


def _ready(root: str) -> bool:
    """/health answers 200; or it does not exist (404) and /v1/models answers 200."""
    health = _status(root + "/health")
    if health == 200:
        return True
    return health == 404 and _status(root + "/v1/models") == 200


def _exit_words(code: int) -> str:
    with contextlib.suppress(ValueError):
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        if code > 128:  # a shell reports its command's death by signal N as 128 + N
            return f"exited with code {code} ({signal.Signals(code - 128).name}?)"
    return f"exited with code {code}"


def log_tail(path: Path, offset: int = 0, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines written to ``path`` after ``offset`` (progress-bar redraws split, colours removed)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(offset, size - 65536))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    parts = [_ANSI.sub("", part).strip() for part in re.split(r"[\r\n]+", text)]
    return [part[:300] for part in parts if part][-lines:]


def _group_alive(pgid: int) -> bool:
    """Whether any process (zombies aside) is left in the process group."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _tree(pgid: int) -> list:
    """The group's leader and every process it started (psutil Processes): a launcher's workers (torchrun's)
    run in sessions of their own, so stopping the group alone would leave them running."""
    import psutil

    try:
        leader = psutil.Process(pgid)
        return [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return []


def _alive(pgid: int, tree: list) -> bool:
    """Whether any process of the group or of ``tree`` is left (zombies aside)."""
    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return _group_alive(pgid) or any(running(process) for process in tree)


def _signal_all(pgid: int, tree: list, signum: int) -> None:
    _signal_group(pgid, signum)
    for process in tree:
        with contextlib.suppress(Exception):  # gone meanwhile; is_running guards against a reused pid
            if process.is_running():
                process.send_signal(signum)


def _terminate(pgid: int, tree: list, grace_s: float, reap=lambda: None) -> None:
    """SIGTERM the group and ``tree``; SIGKILL what is left after ``grace_s``."""
    _signal_all(pgid, tree, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap()  # the leader, so a zombie does not count as alive
        if not _alive(pgid, tree):
            return
        time.sleep(0.1)
    log.info(f"process group {pgid} still running {grace_s:g} s after SIGTERM: SIGKILL")
    _signal_all(pgid, tree, signal.SIGKILL)


def stop_group(server: Server | subprocess.Popen, grace_s: float) -> None:
    """Stop a group :func:`start_group` started: SIGTERM it and every process its leader started, SIGKILL them
    after ``grace_s``, wait until none is left, then let the watchdog go."""
    process = server.process if isinstance(server, Server) else server
    pgid = process.pid  # start_new_session: the leader's pid is the group's id
    tree = _tree(pgid)
    try:
        _terminate(pgid, tree, grace_s, reap=process.poll)
    except KeyboardInterrupt:  # a second Ctrl-C while waiting: no more grace
        _signal_all(pgid, tree, signal.SIGKILL)
        raise
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        deadline = time.monotonic() + 5
        while _alive(pgid, tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        with _running_lock:
            watchdog = _running.pop(process, None)
        if watchdog is not None:
            with contextlib.suppress(OSError, ValueError):
                watchdog.stdin.write(b"done\n")
                watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                watchdog.wait(timeout=5)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@atexit.register
def _stop_all() -> None:
    """Stop every group still running when the interpreter exits (a with-block skipped by a crash)."""
    with _running_lock:
        processes = list(_running)
    for process in processes:
        with contextlib.suppress(Exception):
            stop_group(process, 3.0)
