"""[trust] SIGTERM (``kill``, a scheduler's stop) is handled like Ctrl-C: logged, the manifest never left saying
``running``, exit 143 (issue 21)."""

from __future__ import annotations

import json
import signal
import subprocess

from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import CountingReply, mapd_argv, wait_for, write_pipeline_setup

from mapd.cli import main


def test_sigterm_during_mapd_run_is_an_interrupt_and_the_rerun_goes_on(tmp_path, tiny_model_dir):
    with FakeOpenAIServer(CountingReply(), latency_s=2.0) as server:  # teaching lasts a while
        config, _ = write_pipeline_setup(tmp_path, server.base_url, tiny_model_dir)
        out = tmp_path / "run"
        process = subprocess.Popen(mapd_argv("run", str(config), "--out", str(out)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: server.requests > 0 or process.poll() is not None, timeout=240)
            assert process.poll() is None, process.stderr.read()  # teaching: its first call is in flight
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 143, err
        assert "interrupted; rerun the same command" in err.strip().splitlines()[-1]
        assert "interrupted" in (out / "mapd.log").read_text()
        stages = json.loads((out / "manifest.json").read_text())["rounds"][0]["stages"]
        statuses = [stage["status"] for stage in stages.values()]  # (teach, unless the machine is very slow)
        assert statuses.count("interrupted") == 1 and "running" not in statuses
        assert main(["run", str(config), "--out", str(out)]) == 0  # the rerun takes the interrupted stage up again
        stages = json.loads((out / "manifest.json").read_text())["rounds"][0]["stages"]
        assert all(stage["status"] == "done" for stage in stages.values())
