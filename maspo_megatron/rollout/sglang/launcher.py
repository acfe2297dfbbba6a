"""Starting `sglang.launch_server` processes (and optionally `sglang_router`) and waiting for them.

Each server gets free ports, binds to `cfg.host` (loopback unless the config names the cluster
interface; never 0.0.0.0 by default), writes its output to `<log_dir>/server_<i>.log`, and is ready
when `GET /health_generate` answers 200. A server that exits during startup, or is not ready by
the deadline, fails the launch with its log tail in the error; all started processes are stopped.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

import requests

from maspo_megatron.rollout.types import RolloutError
from maspo_megatron.utils.ports import free_port

LOG_TAIL_LINES = 40


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError as exc:
        return f"(no log: {exc})"


@dataclasses.dataclass(frozen=True)
class ServerSlot:
    """Where one server runs: `node` (index in the job's node list), its index among that node's servers,
    and its node-local GPU ids (`--base-gpu-id` = gpu_ids[0]; SGLang TP rank r runs on gpu_ids[r])."""

    node: int
    index_on_node: int
    gpu_ids: tuple[int, ...]


def plan_servers(cfg, num_nodes: int, gpus_per_node: int) -> list[ServerSlot]:
    """The colocated fleet: on EVERY node, `rollout.sglang.num_servers` servers of tp_size x dp_size GPUs
    each, from `base_gpu_id` on, with node-local GPU ids (each node's launcher starts its own set). Refuses
    a plan that runs past a node's GPUs."""
    gpus_per_server = cfg.tp_size * cfg.dp_size
    needed = cfg.base_gpu_id + cfg.num_servers * gpus_per_server
    if needed > gpus_per_node:
        raise ValueError(f"rollout.sglang: base_gpu_id {cfg.base_gpu_id} + num_servers {cfg.num_servers} x tp_size "
                         f"{cfg.tp_size} x dp_size {cfg.dp_size} = GPU {needed - 1} runs past a node's {gpus_per_node} GPUs "
                         "(num_servers counts the servers of ONE node)")
    return [ServerSlot(node, index, tuple(range(cfg.base_gpu_id + index * gpus_per_server,
                                                cfg.base_gpu_id + (index + 1) * gpus_per_server)))
            for node in range(num_nodes) for index in range(cfg.num_servers)]


def ipc_routes(slots: Sequence[ServerSlot], urls: Sequence[str], rank_of_gpu: dict) -> dict[str, list[int]]:
    """CUDA IPC works only within a node and each SGLang TP rank should open a handle on its own GPU (slime's
    colocated design): url -> the trainer global rank whose bucket copy each TP rank of that server gets.
    `rank_of_gpu[(node, gpu)]` = the trainer rank on that node-local GPU (from an all-gather of
    (node, device) over the trainer ranks)."""
    routes = {}
    for slot, url in zip(slots, urls, strict=True):
        missing = [gpu for gpu in slot.gpu_ids if (slot.node, gpu) not in rank_of_gpu]
        if missing:
            raise ValueError(f"weight_sync.transport 'tensor': server {url} (node {slot.node}) runs on GPUs {missing} where "
                             "no trainer rank runs, so no rank can hand it a CUDA IPC handle on its own GPU")
        routes[url] = [rank_of_gpu[(slot.node, gpu)] for gpu in slot.gpu_ids]
    return routes


def server_flags(cfg) -> list[str]:
    """The `sglang.launch_server` flags a config decides for every server (`cfg`: an `SGLangConfig`), the
    same for servers this process launches and for those slurm/sglang_node.sh starts
    (`python -m maspo_megatron.launch.sglang_server_args`)."""
    flags = ["--tp-size", str(cfg.tp_size), "--dp-size", str(cfg.dp_size),
             "--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.enable_memory_saver:
        flags.append("--enable-memory-saver")
    if cfg.quantization:
        flags += ["--quantization", cfg.quantization]
    if cfg.deterministic_inference:
        flags.append("--enable-deterministic-inference")
    if cfg.api_key:
        flags += ["--api-key", cfg.api_key]
    return flags + list(cfg.extra_args)


def server_command(cfg, model_path: str, port: int, server_index: int, nccl_port: int) -> list[str]:
    """The argv of server `server_index`; `cfg` is an `SGLangConfig`."""
    prefix = list(cfg.launch_command) or [sys.executable, "-m", "sglang.launch_server"]
    gpus_per_server = cfg.tp_size * cfg.dp_size
    return prefix + [
        "--model-path", str(model_path),
        "--host", cfg.host,
        "--port", str(port),
        "--nccl-port", str(nccl_port),
        "--base-gpu-id", str(cfg.base_gpu_id + server_index * gpus_per_server),
    ] + server_flags(cfg)


def router_command(cfg, worker_urls: Sequence[str], port: int) -> list[str]:
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--host", cfg.host, "--port", str(port)]
    if cfg.api_key:
        argv += ["--api-key", cfg.api_key]
    return argv + list(cfg.router_extra_args)


def _visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ServerLauncher:
    """Owns the server (and router) processes of one engine. Use `launch()` then `shutdown()`."""

    def __init__(self, cfg, model_path: Optional[str], *, log_dir: Optional[str] = None) -> None:
        if model_path is None:
            raise ValueError("rollout.sglang: launching servers needs a model path (model.hf_config) or set rollout.sglang.urls")
        self.cfg = cfg
        self.model_path = model_path
        gpus = _visible_gpu_count()
        if gpus:
            plan_servers(cfg, 1, gpus)  # this node's servers must fit its GPUs (--base-gpu-id past the node)
        self.log_dir = Path(log_dir or cfg.log_dir or tempfile.mkdtemp(prefix="maspo_sglang_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.worker_urls: list[str] = []
        self.router_url: Optional[str] = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Own session: shutdown() can stop the server's whole process tree (schedulers, detokenizer).
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log_file.close()
        self.processes.append((name, process, log_path))
        return process

    def launch(self) -> tuple[list[str], Optional[str]]:
        """Starts every server (and the router), waits until all are ready -> (worker_urls, router_url)."""
        try:
            for index in range(self.cfg.num_servers):
                port = free_port(self.cfg.host)
                argv = server_command(self.cfg, self.model_path, port, index, free_port(self.cfg.host))
                self._spawn(f"server_{index}", argv)
                self.worker_urls.append(f"http://{self.cfg.host}:{port}")
            deadline = time.monotonic() + self.cfg.startup_timeout_s
            for (name, process, log_path), url in zip(list(self.processes), self.worker_urls, strict=True):
                self._wait_ready(name, process, log_path, url, "/health_generate", deadline)
            if self.cfg.router:
                port = free_port(self.cfg.host)
                name = "router"
                process = self._spawn(name, router_command(self.cfg, self.worker_urls, port))
                self.router_url = f"http://{self.cfg.host}:{port}"
                self._wait_ready(name, process, self.log_dir / f"{name}.log", self.router_url, "/health", deadline)
        except BaseException:
            self.shutdown()
            raise
        return list(self.worker_urls), self.router_url

    def _wait_ready(self, name: str, process: subprocess.Popen, log_path: Path, url: str, endpoint: str, deadline: float) -> None:
        while True:
            code = process.poll()
            if code is not None:
                raise RolloutError(
                    f"sglang {name} ({url}) exited with code {code} during startup; last lines of {log_path}:\n{log_tail(log_path)}"
                )
            try:
                if requests.get(url + endpoint, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"sglang {name} ({url}) not ready after rollout.sglang.startup_timeout_s="
                    f"{self.cfg.startup_timeout_s}; last lines of {log_path}:\n{log_tail(log_path)}"
                )
            time.sleep(0.25)

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after `timeout_s`."""
        for _, process, _ in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for _, process, _ in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        self.processes = []
