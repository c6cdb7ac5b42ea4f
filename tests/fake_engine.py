"""A fake serving engine for tests of mapd.serve: ``python tests/fake_engine.py --port N [options]``.

It serves GET /health, GET /v1/models and POST /v1/chat/completions (tests.openai_server.FakeOpenAIServer's
handler, replying "<model> read: <last message>") on the given port, and can misbehave:

  --fail-at-start        print an error and exit 3 before listening
  --start-delay S        wait S seconds before listening (a slow model load)
  --die-after S          exit 7 S seconds after it started listening
  --ignore-sigterm       ignore SIGTERM (only SIGKILL stops it)
  --child-pid-file F     spawn a child process (sleeps) and write its pid to F
  --no-health            no /health route (404), as some servers: readiness must use /v1/models
  --health-status CODE   /health answers CODE (e.g. 503: loading forever)
  --requests-file F      append one line per chat completion request to F (its model and last message)
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.openai_server import FakeOpenAIServer, _QuietServer, _handler_class, _send, default_reply  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--fail-at-start", action="store_true")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--die-after", type=float, default=None)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--child-pid-file", default=None)
    parser.add_argument("--no-health", action="store_true")
    parser.add_argument("--health-status", type=int, default=200)
    parser.add_argument("--served-model-name", default=None)  # accepted and ignored, as a real engine's flag
    parser.add_argument("--requests-file", default=None)
    args = parser.parse_args()

    print(f"fake engine: loading model (port {args.port})", flush=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(args.child_pid_file).write_text(str(child.pid))
    if args.fail_at_start:
        print("fake engine: error: CUDA out of memory (injected failure)", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(args.start_delay)

    def reply(messages: list[dict], model: str) -> str:
        if args.requests_file:
            with open(args.requests_file, "a", encoding="utf-8") as log:
                log.write(json.dumps({"model": model, "last": messages[-1]["content"]}) + "\n")
        return default_reply(messages, model)

    fake = FakeOpenAIServer(reply)
    base = _handler_class(fake)

    class Handler(base):
        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health" and not args.no_health:
                return _send(self, args.health_status, {"status": "ok" if args.health_status == 200 else "loading"})
            return super().do_GET()

    httpd = _QuietServer((args.host, args.port), Handler)
    print(f"fake engine: listening on http://{args.host}:{args.port}", flush=True)
    if args.die_after is not None:
        def die() -> None:
            time.sleep(args.die_after)
            print("fake engine: fatal: worker crashed (injected)", flush=True)
            import os

            os._exit(7)

        threading.Thread(target=die, daemon=True).start()
    httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
