"""The trainer as a user runs it (`python -m maspo_megatron.train`) against a stand-in SGLang server that
shares its "GPUs" (rollout.sglang.colocated) with the memory saver on, over the distributed transport:
the stand-in records which memory was released at each request and refuses generation or weight loads
into released memory, so the step must hand memory over in the right order; at exit the syncer destroys
its update group before the engine shuts down (exit code 0)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maspo_megatron.utils.ports import free_port
from tests.helpers.loop_cases import EXAMPLE, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
ALL = ("cuda_graph", "kv_cache", "weights")


def _tiny_policy_dir(path: Path, output_dir: str) -> str:
    """The cpu_tiny policy (config and tokenizer as the trainer builds them) saved as an HF directory."""
    import transformers

    from maspo_megatron.config import load_config
    from maspo_megatron.trainer.setup import build_tokenizer, resolve_hf_config

    cfg = load_config(EXAMPLE, tiny_overrides(output_dir))
    tokenizer = build_tokenizer(cfg)
    model = transformers.AutoModelForCausalLM.from_config(resolve_hf_config(cfg, tokenizer))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _train_two_steps(output_dir: str, model_dir: str, *rollout_overrides: str) -> subprocess.CompletedProcess:
    """`python -m maspo_megatron.train` for two small steps of the tiny policy against SGLang stand-ins
    (colocated, memory saver on, distributed transport); asserts exit 0."""
    args = tiny_overrides(output_dir, "trainer.total_steps=2", "trainer.sft_warmup_steps=0", "trainer.eval_at_end=false",
                          "trainer.prompts_per_step=2", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=4",
                          f"model.hf_config={model_dir}", "rollout.engine=sglang", "rollout.sglang.enable_memory_saver=true",
                          "rollout.weight_sync.transport=distributed", *rollout_overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO),
               MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "maspo_megatron.train", "--config", EXAMPLE, *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("kl_reference", [False, True], ids=["no-kl", "kl-reference"])
def test_colocated_step_hands_memory_over_in_order_and_exits_cleanly(tmp_path, kl_reference):
    """kl-reference: algorithm.kl_coef > 0 builds the frozen KL reference, which must leave the GPUs with the
    rest of the trainer (it would otherwise sit there through every rollout)."""
    from tests.helpers.sglang_standin import StandinServer

    output_dir = str(tmp_path / "run")
    model_dir = _tiny_policy_dir(tmp_path / "policy", output_dir)
    server = StandinServer(model_dir, enable_memory_saver=True).start()
    try:
        _train_two_steps(output_dir, model_dir, f"rollout.sglang.urls=[{server.url}]", "rollout.sglang.colocated=true",
                         "rollout.colocated_offload=true", *(["algorithm.kl_coef=0.05"] if kl_reference else []))
        events = server.call(lambda: list(server.memory_events))
        times = server.call(lambda: list(server.memory_event_times))
        paths = server.call(lambda: [path for _, path, _ in server.requests_seen])
        groups = server.call(lambda: dict(server.groups))
    finally:
        server.stop()
    # start-up sync with everything resident, then per step: rollout, release all, (train), resume weights,
    # load them, resume the rest, ... and the next step's rollout on a whole server
    loads = [i for i, (event, _) in enumerate(events) if event == "load_weights"]
    assert events[loads[0]] == ("load_weights", ())
    step = events[loads[0] + 1:]
    for _ in range(2):
        generates = [e for e in step[:step.index(("release", ALL))] if e[0] == "/generate"]
        assert generates and all(released == () for _, released in generates)  # rollout on resident memory
        step = step[step.index(("release", ALL)) + 1:]
        assert step[0] == ("resume", ("cuda_graph", "kv_cache"))  # weights mapped again before any load
        assert {e for e in step[1:step.index(("resume", ()))]} == {("load_weights", ("cuda_graph", "kv_cache"))}
        step = step[step.index(("resume", ())) + 1:]
    assert paths.count("/destroy_weights_update_group") == 1 and groups == {}  # the syncer closed first
    _check_trainer_offload_against_server(Path(output_dir) / "memory_handover.jsonl", events, times, kl_reference)


def _check_trainer_offload_against_server(timeline_path: Path, events: list, times: list, kl_reference: bool) -> None:
    """rollout.colocated_offload: the trainer's own timeline (its offload/reload, wall clock) merged with the
    server's memory events: the server generates only while the trainer holds nothing on the GPU, maps its
    weights again only once the optimizer state and gradients are gone (the sync needs the parameters),
    maps its KV cache only once the parameters are gone too, and the trainer reloads only while the
    server has released everything."""
    import bisect
    import json

    trainer = [json.loads(line) for line in timeline_path.read_text().splitlines()]
    # start-up offload of everything, then per step: reload, offload optimizer+grads(+reference), offload params
    reference = "+reference" if kl_reference else ""
    assert [e["event"] for e in trainer] == [f"offload optimizer+grads+params{reference}"] + [
        "reload", f"offload optimizer+grads{reference}", "offload params"] * 2
    assert all(e["host_bytes"] > 0 for e in trainer if e["event"] != "reload")
    trainer_times = [e["time"] for e in trainer]

    def trainer_away(at: float) -> set:
        index = bisect.bisect_right(trainer_times, at) - 1
        return set(trainer[index]["offloaded"]) if index >= 0 else set()

    everything = {"optimizer", "grads", "params"} | ({"reference"} if kl_reference else set())
    checked = {"/generate": 0, "weights": 0, "kv_cache": 0}
    for (event, released), at in zip(events, times, strict=True):
        if event == "/generate" and at > trainer_times[0]:
            assert trainer_away(at) == everything, (event, at)
            checked["/generate"] += 1
        if event == "resume" and released == ("cuda_graph", "kv_cache"):  # the weights mapped again
            assert {"optimizer", "grads"} <= trainer_away(at), (event, released)
            checked["weights"] += 1
        if event == "resume" and released == ():  # the KV cache mapped again
            assert trainer_away(at) == everything, (event, released)
            checked["kv_cache"] += 1
    assert checked["/generate"] >= 2 and checked["weights"] == 2 and checked["kv_cache"] == 2, checked
    server_times = list(times)
    for entry in trainer:
        if entry["event"] == "reload":  # the server's last memory event before it: everything released
            index = bisect.bisect_right(server_times, entry["time"]) - 1
            assert events[index] == ("release", ALL), events[index]


def test_the_trainer_launches_its_colocated_servers_before_the_policy_and_stops_them(tmp_path):
    """No rollout.sglang.urls: the trainer's own fleet (rollout/sglang/fleet.py, started before the
    policy allocates) launches the node's server, the driver's engine trains against it, and close()
    stops it (exit 0, the server's log written by the launcher, nothing left listening)."""
    import json
    import re

    import requests

    from tests.helpers.sglang_standin.process import PACKAGE_DIR

    output_dir = str(tmp_path / "run")
    model_dir = _tiny_policy_dir(tmp_path / "policy", output_dir)
    log_dir = tmp_path / "sglang_logs"
    _train_two_steps(output_dir, model_dir, f"rollout.sglang.launch_command=[{sys.executable}, {PACKAGE_DIR}]",
                     f"rollout.sglang.log_dir={log_dir}")
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["rollout/num_samples"] == 4 for r in records)
    # the launcher's log of the server it started names the port; nothing answers there any more
    launched = (log_dir / "server_0.log").read_text()
    port = re.search(r"'port': (\d+)", launched).group(1)
    try:
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except requests.RequestException:
        return
    raise AssertionError(f"the server on port {port} still answers after the trainer exited")
