"""mapd.serve: a server's whole life (start, readiness, failures, stop of its process group) with a fake engine
(tests/fake_engine.py, a real HTTP server in a real subprocess), then servable() and a real `transformers serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mapd import serve
from mapd.models import servable
from mapd.serve import Server, ServerFailed, served

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
ENGINE = f"{sys.executable} {REPO / 'tests' / 'fake_engine.py'} --port {{port}}"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def chat(server: Server, text: str) -> str:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content


def test_ready_then_a_real_completion_then_the_group_is_gone(tmp_path):
    log_path = tmp_path / "run" / "server.log"
    child_file = tmp_path / "child.pid"
    with served(f"{ENGINE} --served-model-name {{name}} --child-pid-file {child_file}", "/models/m", name="student",
                log_path=log_path, ready_timeout_s=30) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert server.model_name == "student"  # the template uses {name}: requests name it
        assert chat(server, "2+2?") == "student read: 2+2?"
        server.check()  # alive: no error
        leader, child = server.process.pid, int(child_file.read_text())
        assert alive(leader) and alive(child)
    assert not alive(leader)
    assert wait_gone(child, 5), "a process the server spawned outlived the with-block"
    text = log_path.read_text()
    assert text.startswith("===== mapd ") and f"starting server on port {server.port}: " in text
    assert "fake engine: listening on" in text


def test_model_name_is_the_model_value_without_a_name_field(tmp_path):
    with served(ENGINE, "/models/student", name="student", log_path=tmp_path / "s.log") as server:
        assert server.model_name == "/models/student"
        assert chat(server, "hi") == "/models/student read: hi"


def test_a_shell_line_with_an_assignment_is_served_and_stopped_whole(tmp_path):
    child_file = tmp_path / "child.pid"
    line = f"cd {tmp_path} && FAKE=1 {ENGINE} --child-pid-file {child_file} --ignore-sigterm"
    with served(line, "m", name="n", log_path=tmp_path / "s.log", stop_grace_s=1) as server:
        assert chat(server, "x") == "m read: x"
        assert server.process.args[:2] == ["/bin/sh", "-c"]
        child = int(child_file.read_text())
    assert not alive(server.process.pid) and wait_gone(child, 5)


def test_a_server_without_health_is_ready_through_v1_models(tmp_path):
    with served(f"{ENGINE} --no-health", "m", name="n", log_path=tmp_path / "s.log", ready_timeout_s=30) as server:
        assert chat(server, "x") == "m read: x"


def test_a_command_that_exits_at_once_fails_fast_with_the_log_tail(tmp_path):
    log_path = tmp_path / "s.log"
    with pytest.raises(ServerFailed) as failure:  # the exit is seen at once: no wait for the 600 s ready timeout
        with served(f"{ENGINE} --fail-at-start", "m", name="n", log_path=log_path):
            pytest.fail("the block must not run")
    message = str(failure.value)
    assert "\n" not in message  # one line
    assert "fake_engine.py" in message and "exited with code 3 before it was ready" in message
    assert "CUDA out of memory (injected failure)" in message and str(log_path) in message
    assert failure.value.returncode == 3 and failure.value.tail[-1].endswith("(injected failure)")


def test_a_missing_command_fails_with_the_shells_message(tmp_path):
    with pytest.raises(ServerFailed, match=r"exited with code 127 .*cannot run no-such-engine-xyz: .*No such file"):
        with served("no-such-engine-xyz serve {model} --port {port}", "m", name="n", log_path=tmp_path / "s.log"):
            pass
    with pytest.raises(ServerFailed, match=r"exited with code 127 .*no-such-engine-xyz: not found"):  # via sh
        with served("cd . && no-such-engine-xyz serve {model} --port {port}", "m", name="n",
                    log_path=tmp_path / "s.log"):
            pass


def test_template_errors_fail_before_anything_starts(tmp_path):
    log_path = tmp_path / "s.log"
    with pytest.raises(ServerFailed, match=r"unknown field\(s\) \{gpus\}.*known: \{model\}, \{port\}"):
        with served(f"{ENGINE} --tp {{gpus}}", "m", name="n", log_path=log_path):
            pass
    with pytest.raises(ServerFailed, match=r"has no \{port\}"):  # a hard-coded port: mapd could not find it
        with served(f"{sys.executable} {REPO / 'tests' / 'fake_engine.py'} --port 8000", "m", name="n",
                    log_path=log_path):
            pass
    assert not log_path.exists()
    # simple commands run directly (the leader is the server), shell syntax under /bin/sh
    assert serve._argv("CUDA_VISIBLE_DEVICES=0,1 vllm serve '/m x' --port 5") == \
        (["vllm", "serve", "/m x", "--port", "5"], {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert serve._argv("cd /x && vllm serve m")[0] == ["/bin/sh", "-c", "cd /x && vllm serve m"]
    # JSON arguments keep their braces; fields are shell-quoted
    assert serve.render("x --kw '{\"a\": 1}' --m {model} --port {port}", {"model": "a b", "port": 5}) == \
        "x --kw '{\"a\": 1}' --m 'a b' --port 5"


def test_a_host_a_server_cannot_listen_on_is_one_line_before_anything_starts(tmp_path):
    """A host of another machine (or, in the config, no host at all) is a one-line error, never a traceback."""
    from pydantic import ValidationError

    from mapd.config import StudentConfig, TeacherConfig

    with pytest.raises(ServerFailed, match=r"host '192\.0\.2\.1': a server cannot listen there .*127\.0\.0\.1"):
        with served(f"{sys.executable} -c pass {{port}}", "m", name="t", log_path=tmp_path / "s.log", host="192.0.2.1"):
            pass
    assert not (tmp_path / "s.log").exists()  # nothing was started
    for section, fields in ((StudentConfig, {}), (TeacherConfig, {"name": "t", "model": "m", "serve": "x {port}"})):
        with pytest.raises(ValidationError, match="'no such host' is neither an IP address nor a host name"):
            section(host="no such host", **fields)


def test_a_taken_port_is_never_handed_out_and_a_lost_race_is_retried(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        assert all(serve.free_port() != busy for _ in range(50))
        # the race: the port was free when mapd picked it, taken when the server bound it
        real = serve.free_port
        picks = iter([busy])
        monkeypatch.setattr(serve, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
        log_path = tmp_path / "s.log"
        with served(ENGINE, "m", name="n", log_path=log_path, ready_timeout_s=30) as server:
            assert server.port != busy and chat(server, "x") == "m read: x"
        text = log_path.read_text()
        assert f"starting server on port {busy}" in text and "Address already in use" in text
        # when every attempt finds its port taken, the failure says so
        monkeypatch.setattr(serve, "free_port", lambda host="127.0.0.1": busy)
        with pytest.raises(ServerFailed, match="exited with code 1 before it was ready.*Address already in use"):
            with served(ENGINE, "m", name="n", log_path=log_path, port_attempts=2):
                pass
        assert text.count("===== mapd") == 2 and log_path.read_text().count("===== mapd") == 4
    finally:
        taken.close()


def test_readiness_timeout(tmp_path):
    child_file = tmp_path / "child.pid"
    with pytest.raises(ServerFailed, match=r"not ready after 1.5 s .*fake engine: loading model"):  # ready at 60 s
        with served(f"{ENGINE} --start-delay 60 --child-pid-file {child_file}", "m", name="n",
                    log_path=tmp_path / "s.log", ready_timeout_s=1.5):
            pass
    assert wait_gone(int(child_file.read_text()), 5)
    with pytest.raises(ServerFailed, match=r"not ready after 1 s"):  # /health says 503 (loading) forever
        with served(f"{ENGINE} --health-status 503", "m", name="n", log_path=tmp_path / "s.log", ready_timeout_s=1):
            pass


def test_the_group_is_stopped_after_an_exception_and_ctrl_c(tmp_path):
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        child_file = tmp_path / f"child-{type(error).__name__}.pid"
        with pytest.raises(type(error)):
            with served(f"{ENGINE} --child-pid-file {child_file}", "m", name="n", log_path=tmp_path / "s.log",
                        ready_timeout_s=30) as server:
                leader = server.process.pid
                raise error
        assert not alive(leader)
        assert wait_gone(int(child_file.read_text()), 5)
    assert serve._running == {}


def test_a_server_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    with served(f"{ENGINE} --ignore-sigterm", "m", name="n", log_path=tmp_path / "s.log", stop_grace_s=1.5) as server:
        leader = server.process.pid
        left_at = time.monotonic()
    assert time.monotonic() - left_at >= 1.5
    assert not alive(leader) and server.process.returncode == -signal.SIGKILL  # it ignores SIGTERM


def test_a_server_that_dies_mid_run_is_reported_by_check(tmp_path):
    with served(f"{ENGINE} --die-after 0.5", "m", name="n", log_path=tmp_path / "s.log", ready_timeout_s=30) as server:
        server.process.wait(timeout=10)
        with pytest.raises(ServerFailed, match="exited with code 7 while mapd was using it.*worker crashed"):
            server.check()
    with served(ENGINE, "m", name="n", log_path=tmp_path / "s.log", ready_timeout_s=30) as server:
        os.killpg(server.process.pid, signal.SIGKILL)  # as the OOM killer would
        server.process.wait(timeout=10)
        with pytest.raises(ServerFailed, match="was killed by SIGKILL while mapd was using it"):
            server.check()


MAPD_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mapd.serve import served
    engine, log_path, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    context = served(engine, "m", name="n", log_path=log_path, stop_grace_s=2)  # kept: its GC would stop the server
    server = context.__enter__()
    print(server.process.pid, flush=True)
    if how == "exit":
        sys.exit(0)  # the with-block never closed: atexit stops it
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_server_outlives_mapd(tmp_path, how):
    child_file = tmp_path / "child.pid"
    mapd = subprocess.Popen([sys.executable, "-c", MAPD_PROCESS, f"{ENGINE} --child-pid-file {child_file}",
                             str(tmp_path / "s.log"), how], stdout=subprocess.PIPE, text=True)
    leader = int(mapd.stdout.readline())
    child = int(child_file.read_text())
    if how == "exit":
        assert mapd.wait(timeout=30) == 0
        assert not alive(leader) and wait_gone(child, 5)  # gone before the interpreter exited
    else:
        assert alive(leader)
        mapd.kill()  # no finally, no atexit: the watchdog sees the pipe close
        mapd.wait(timeout=10)
        assert wait_gone(leader, 10) and wait_gone(child, 5)


# --------------------------------------------------------------------------------------------------- servable


def test_servable_passes_hub_ids_and_folders_through(tmp_path):
    assert servable("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert servable(str(tmp_path)) == str(tmp_path)


@pytest.fixture(scope="module")
def smollm_servable(tmp_path_factory):
    """embedded:smollm2-135m-instruct converted in a fresh cache folder: (folder, seconds it took)."""
    cache = tmp_path_factory.mktemp("mapd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAPD_CACHE_DIR", str(cache))
        started = time.monotonic()
        folder = servable("embedded:smollm2-135m-instruct")
        seconds = time.monotonic() - started
        again = servable("embedded:smollm2-135m-instruct")
    assert again == folder
    return Path(folder), seconds, cache


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_servable_converts_an_embedded_model_once(smollm_servable, monkeypatch):
    folder, seconds, cache = smollm_servable
    assert folder.parent == cache / "servable" and folder.name.startswith("smollm2-135m-instruct-")
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [folder.name]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setenv("MAPD_CACHE_DIR", str(cache))
    assert servable("embedded:smollm2-135m-instruct") == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # reused, not converted again

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    print(f"\nconversion took {seconds:.1f} s")


def test_an_embedded_model_in_parts_is_assembled_once_by_processes_asking_at_once(tmp_path, monkeypatch):
    """Two runs started together: one assembles the parts (under a lock), the others wait and get the same
    verified file; no partial file is left, and a file whose bytes are not the pinned ones is refused."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import mapd
    from mapd import models
    from mapd.errors import MapdError

    configs = Path(mapd.__file__).parent / "configs"
    parts = (("mapd", "configs/default.yaml"), ("mapd", "configs/paper-committee.yaml"))
    whole = b"".join((configs.parent / relative).read_bytes() for _, relative in parts)
    monkeypatch.setenv("MAPD_CACHE_DIR", str(tmp_path))
    (tmp_path / ".parts.gguf.partial-1").write_bytes(b"left by a run killed while it assembled")
    monkeypatch.setitem(models.EMBEDDED_MODELS, "parts", models.EmbeddedModel(
        "parts.gguf", parts, hashlib.sha256(whole).hexdigest(), "pip install mapd"))
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: models.embedded_model_file("parts"), range(4)))
    assert set(paths) == {tmp_path / "parts.gguf"} and paths[0].read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts.gguf", "parts.gguf.lock", "parts.ok"]
    monkeypatch.setitem(models.EMBEDDED_MODELS, "bad", models.EmbeddedModel("bad.gguf", parts, "0" * 64, "-"))
    with pytest.raises(MapdError, match="bad.gguf has sha256 .*, expected 0000"):
        models.embedded_model_file("bad")


MESSAGES = [
    [{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name the capital of France."}],
    [{"role": "user", "content": "Tom has 5 apples and eats 2. How many are left?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],  # 31 tokens, then the end-of-turn token
]
MAX_TOKENS = [16, 16, 16, 32]  # the last one: the end-of-turn token is exactly the 32nd


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_transformers_serve_answers_greedy_like_in_process_generation(smollm_servable, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
    import openai

    from mapd.generation import generate, load_model

    folder, _, _ = smollm_servable
    model, tokenizer = load_model("embedded:smollm2-135m-instruct")  # the in-process student, from the GGUF
    expected = [generate(model, tokenizer, [messages], max_new_tokens=n, temperature=0.0)[0]
                for messages, n in zip(MESSAGES, MAX_TOKENS)]
    del model

    env_threads = os.environ.get("OMP_NUM_THREADS")
    started = time.monotonic()
    with served("transformers serve {model} --host {host} --port {port} --device cpu", str(folder), name="student",
                log_path=tmp_path / "server.log", ready_timeout_s=300) as server:
        ready_s = time.monotonic() - started
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
        answers, answer_s = [], []
        for messages, max_tokens in zip(MESSAGES, MAX_TOKENS):
            t = time.monotonic()
            reply = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                                   max_tokens=max_tokens)
            answer_s.append(time.monotonic() - t)
            answers.append(reply)
    print(f"\ntransformers serve (OMP_NUM_THREADS={env_threads}): ready in {ready_s:.1f} s; answers in "
          + ", ".join(f"{s:.2f} s" for s in answer_s))
    for reply, want, max_tokens in zip(answers, expected, MAX_TOKENS):
        choice = reply.choices[0]
        assert choice.message.content.strip() == want.text  # the same greedy text, token for token
        assert reply.usage.prompt_tokens == want.input_tokens
        # The differences, both about the end-of-turn token: the server counts it in completion_tokens, mapd's
        # in-process count leaves it out (it counts the tokens that are not the pad token, here the same id);
        # and when it is exactly the max_tokens-th token the server says "length" (it compares the count with
        # max_tokens), in-process says "stop" (the model ended its answer).
        assert reply.usage.completion_tokens == want.output_tokens + (want.finish_reason == "stop")
        if reply.usage.completion_tokens == max_tokens and want.finish_reason == "stop":
            assert choice.finish_reason == "length"
        else:
            assert choice.finish_reason == want.finish_reason
    assert (expected[-1].output_tokens, expected[-1].finish_reason) == (31, "stop")  # the edge case was met


def _served_committee(tmp_path: Path, **fields) -> tuple[list[str], Path]:
    """`mapd teach` arguments for two mistakes and a committee of two teachers on the fake engine (started by
    mapd, bound to {host}), and the output folder."""
    import yaml

    from tests.reliability_kit import make_mistakes, teach_argv

    from mapd.io import write_jsonl

    command = f"{ENGINE} --host {{host}} --served-model-name {{name}}"
    teachers = [{"name": name, "model": str(tmp_path / name), "serve": command, **fields} for name in ("a", "b")]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()  # the model folders the engine would load
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "svamp"}, "teachers": teachers}))
    write_jsonl(tmp_path / "mistakes.jsonl", make_mistakes(2))
    out = tmp_path / "out"
    return teach_argv(tmp_path / "config.yaml", tmp_path / "mistakes.jsonl", out), out


def test_a_served_teacher_starts_only_for_calls_not_cached(tmp_path):
    """`mapd teach` with served teachers: each server starts (on loopback) for the calls it answers and stops;
    a rerun whose calls are all cached starts none."""
    from tests.reliability_kit import teach_records

    from mapd.cli import main

    argv, out = _served_committee(tmp_path)
    assert main(argv) == 0
    feedback, rationales = teach_records(out)
    assert len(feedback) == len(rationales) == 4 and all(r["text"] for r in feedback + rationales)
    assert feedback[0]["text"].startswith(("a read:", "b read:"))  # the request named the served model {name}
    logs = {name: (out / f"server-{name}.log").read_text() for name in ("a", "b")}
    assert all(text.count("starting server") == 1 and "listening on http://127.0.0.1:" in text
               for text in logs.values())
    assert main(argv) == 0  # every call cached: no server is started
    assert {name: (out / f"server-{name}.log").read_text() for name in ("a", "b")} == logs
    assert teach_records(out) == (feedback, rationales)


def test_a_served_teacher_has_its_own_ready_timeout(tmp_path, capsys):
    from mapd.cli import main

    argv, out = _served_committee(tmp_path, ready_timeout_s=1.5)
    argv[argv.index("--config") + 1] = str(tmp_path / "slow.yaml")
    (tmp_path / "slow.yaml").write_text((tmp_path / "config.yaml").read_text().replace(
        "--served-model-name {name}", "--served-model-name {name} --start-delay 60"))
    assert main(argv) == 2
    assert "not ready after 1.5 s" in capsys.readouterr().err
    # the teacher's other calls, waiting for that start, fail with it: no second start
    assert all((out / f"server-{name}.log").read_text().count("starting server") <= 1 for name in ("a", "b"))


def test_commands_are_found_beside_mapds_interpreter(tmp_path, monkeypatch, capsys):
    """`mapd`, `accelerate`, `transformers` installed beside mapd's Python run with that environment not on PATH."""
    beside = Path(sys.executable).parent
    assert (beside / "mapd").exists()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    serve.run_watched("mapd --help", tmp_path / "help.log", what="a command")
    assert "usage: mapd" in (tmp_path / "help.log").read_text() and "usage: mapd" in capsys.readouterr().out
    with pytest.raises(serve.CommandFailed, match=r"a command: `no-such-command-xyz` exited with code 127"):
        serve.run_watched("no-such-command-xyz", tmp_path / "missing.log", what="a command")
