"""Launching servers: argv, readiness, startup death with the log tail, clean shutdown."""
import os
import signal
import sys
import threading
import time

import pytest

from maspo_megatron.config import RolloutConfig, SGLangConfig
from maspo_megatron.rollout import RolloutError, SamplingParams, build_engine
from maspo_megatron.rollout.sglang.launcher import ServerLauncher, router_command, server_command
from tests.helpers.sglang_standin.process import PACKAGE_DIR as STANDIN_SCRIPT


def test_server_argv_passes_user_settings():
    cfg = SGLangConfig(tp_size=2, dp_size=2, mem_fraction_static=0.6, enable_memory_saver=True, quantization="fp8",
                       api_key="k", extra_args=["--chunked-prefill-size", "4096"], base_gpu_id=0)
    argv = server_command(cfg, "/models/m", 31000, 1, 31001)
    joined = " ".join(argv)
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    for expected in ("--model-path /models/m", "--host 127.0.0.1", "--port 31000", "--tp-size 2", "--dp-size 2",
                     "--mem-fraction-static 0.6", "--enable-memory-saver", "--quantization fp8", "--api-key k",
                     "--nccl-port 31001", "--base-gpu-id 4"):
        assert expected in joined
    assert argv[-2:] == ["--chunked-prefill-size", "4096"]
    assert "0.0.0.0" not in joined
    assert "--enable-deterministic-inference" not in argv  # off by default: SGLang then ignores sampling_seed
    cfg.deterministic_inference = True
    assert "--enable-deterministic-inference" in server_command(cfg, "/models/m", 31000, 0, 31001)
    router = " ".join(router_command(cfg, ["http://a:1", "http://b:2"], 32000))
    assert "sglang_router.launch_router --worker-urls http://a:1 http://b:2" in router and "--api-key k" in router


def test_launch_generate_and_survive_a_server_killed_mid_batch(tiny_model_dir, tmp_path):
    """Two launched servers (API key on; zero-latency stand-ins answering after 0.5 s, so startup is
    quick). One is SIGKILLed mid-batch: its samples are retried on the other. Then the last one dies
    too: generate fails with a clear error instead of hanging."""
    cfg = RolloutConfig(engine="sglang")
    cfg.sglang = SGLangConfig(num_servers=2, api_key="secret", launch_command=[sys.executable, STANDIN_SCRIPT, "--zero-latency", "--response-delay-s", "0.5"],
                              startup_timeout_s=120, log_dir=str(tmp_path), request_timeout_s=60, max_retries=3)
    engine = build_engine(cfg, model_path=tiny_model_dir)
    processes = [p for _, p, _ in engine.launcher.processes]
    try:
        assert len(engine.worker_urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in engine.worker_urls)
        groups = engine.generate([[1, 2], [3]], 2, SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert [[s.finish_reason for s in g] for g in groups] == [["length"] * 2] * 2

        result = {}
        sampling = SamplingParams(max_new_tokens=40, ignore_eos=True)
        worker = threading.Thread(target=lambda: result.update(out=engine.generate([[5, 6], [7, 8, 9], [10]], 4, sampling)))
        worker.start()
        time.sleep(0.2)  # every request is in flight, none answered yet
        os.killpg(processes[0].pid, signal.SIGKILL)
        worker.join(60)
        assert not worker.is_alive(), "generate() hung after a server died"
        samples = [s for g in result["out"] for s in g]
        assert len(samples) == 12 and all(s.finish_reason == "length" and len(s.token_ids) == 8 for s in samples)

        os.killpg(processes[1].pid, signal.SIGKILL)
        processes[1].wait(10)
        started = time.monotonic()
        with pytest.raises(RolloutError, match="failed 4 times.*127.0.0.1"):
            engine.generate([[1, 2]], 2, sampling)
        assert time.monotonic() - started < 30
    finally:
        engine.shutdown()
    assert all(p.poll() is not None for p in processes)
    assert "'api_key': 'secret'" in (tmp_path / "server_0.log").read_text()  # and the servers enforce it


def test_server_dying_during_startup_shows_log_tail(tmp_path):
    fake = "import sys; print('loading model', sys.argv[1:]); print('CUDA out of memory (simulated)'); sys.exit(1)"
    cfg = SGLangConfig(launch_command=[sys.executable, "-c", fake],
                       startup_timeout_s=60, log_dir=str(tmp_path))
    launcher = ServerLauncher(cfg, "/no/model")
    with pytest.raises(RolloutError, match=r"(?s)server_0.*exited with code 1 during startup.*CUDA out of memory \(simulated\)"):
        launcher.launch()
    assert launcher.processes == []


def test_not_ready_by_deadline(tiny_model_dir, tmp_path):
    slow = "import time; print('still loading', flush=True); time.sleep(600)"
    cfg = SGLangConfig(launch_command=[sys.executable, "-c", slow], startup_timeout_s=1.5, log_dir=str(tmp_path))
    with pytest.raises(RolloutError, match="not ready after rollout.sglang.startup_timeout_s"):
        ServerLauncher(cfg, tiny_model_dir).launch()
    # (the launcher stopped the sleeping process: launch() shuts down what it started on failure)


def test_launch_needs_a_model_path():
    with pytest.raises(ValueError, match="rollout.sglang"):
        ServerLauncher(SGLangConfig(), None)
