"""The RL loop: one `Trainer` per process; `Trainer(cfg).run()` returns the process exit code.

One step, top to bottom (`rl_step`):
    rollout (rank 0: engine -> rewards -> advantages, dynamic sampling)
    -> broadcast the samples, pack micro-batches balanced by tokens across DP
    -> old log-probs (trainer forward; engine drift measured; optional TIS)
    -> ppo_epochs x mini_batches of forward/backward + optimizer step
    -> weight sync into the engine -> metrics
Around it: resume from `latest`, supervised warm-up on a fresh start, checkpoints every
`save_every` steps, evaluation, SIGUSR1/SIGTERM -> checkpoint and exit 75, HF export at the end.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from maspo_megatron.checkpoint import trainer_state
from maspo_megatron.config import Config, to_dict
from maspo_megatron.rollout.registry import check_rollout_names, engine_traits
from maspo_megatron.rollout.types import memory_handover
from maspo_megatron.trainer.evaluation import eval_metrics
from maspo_megatron.trainer.metrics import MetricsLogger, write_json_atomically
from maspo_megatron.trainer.offload import GRADS, OPTIMIZER, PARAMS, REFERENCE, TrainerOffload
from maspo_megatron.trainer.rollout_phase import DriverContext, generate_groups, run_rollout, step_seed
from maspo_megatron.trainer.sample_handoff import broadcast_samples
from maspo_megatron.trainer.signals import EXIT_CODE_REQUEUE, StopRequest
from maspo_megatron.trainer.train_step import (
    compute_old_log_probs,
    pack_mini_batches,
    ppo_update,
)

EXIT_OK = 0
_EVAL_ROUND = 1 << 20  # seeds evaluation sampling apart from the training rounds of the same step


def check_sizes(cfg: Config) -> None:
    """Refuses settings that could only fail later, with the keys to change."""
    check_rollout_names(cfg.rollout)
    needed = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if needed > cfg.trainer.micro_batch_tokens:
        raise ValueError(f"trainer.micro_batch_tokens: {cfg.trainer.micro_batch_tokens} cannot hold a sample of "
                         f"data.max_prompt_tokens + rollout.max_new_tokens = {needed} tokens")
    if cfg.rollout.n_samples_per_prompt < 2:
        raise ValueError("rollout.n_samples_per_prompt: group advantages need at least 2 samples per prompt")


def eval_sampling_overrides(trainer_cfg) -> dict:
    """SamplingParams overrides of evaluation: its own temperature / top_p when set, top_k=1 when greedy."""
    overrides = {"top_k": 1} if trainer_cfg.eval_greedy else {}
    if trainer_cfg.eval_temperature is not None:
        overrides["temperature"] = trainer_cfg.eval_temperature
    if trainer_cfg.eval_top_p is not None:
        overrides["top_p"] = trainer_cfg.eval_top_p
    return overrides


def startup_warnings(cfg: Config, log) -> dict:
    """Logs one line per configuration that silently changes the algorithm; returns them as metrics."""
    from maspo_megatron.config.algorithm import RATIO_IS_ONE_WARNING, ratio_is_one_by_construction

    if not ratio_is_one_by_construction(cfg.algorithm):
        return {}
    log("warning: " + RATIO_IS_ONE_WARNING.format(loss=cfg.algorithm.loss))
    return {"warn/ratio_is_one_by_construction": 1}


class Trainer:
    def __init__(self, cfg: Config) -> None:
        from maspo_megatron.parallel import init_distributed
        from maspo_megatron.trainer.setup import start_rollout_fleet

        check_sizes(cfg)
        self.cfg = cfg
        self.stop = StopRequest()
        self.dims = init_distributed(cfg.parallel, cfg.trainer.seed)
        self.is_driver = self.dims.rank == 0
        # Colocated SGLang servers on every node, before Megatron allocates: SGLang sizes its static
        # memory from what the GPU has free when it starts.
        self.fleet = start_rollout_fleet(cfg, self.dims)
        try:
            self._build(cfg)
        except BaseException:  # launched servers run in their own session: they must not outlive us
            if self.fleet is not None:
                self.fleet.shutdown()
            raise

    def _build(self, cfg: Config) -> None:
        from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer
        from maspo_megatron.trainer.optim import build_optimizer, build_scheduler
        from maspo_megatron.trainer.setup import build_policy, build_tokenizer

        self.output_dir = Path(cfg.trainer.output_dir)
        self.tokenizer = build_tokenizer(cfg)
        self.policy = build_policy(cfg, self.dims, self.tokenizer)
        self.optimizer = build_optimizer(cfg, self.policy.chunks)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.step = 0
        self.counters = {"samples_generated": 0, "prompts_served": 0, "skipped_steps": 0}
        self.ctx: Optional[DriverContext] = None
        self.val_sets: dict = {}
        if self.is_driver:
            self._build_driver()
        engine = self.ctx.engine if self.ctx else None
        try:
            self.syncer = WeightSyncer(cfg.rollout.weight_sync, self.policy.chunks, self.policy.wmap, self.dims,
                                       engine=engine, engine_kind=cfg.rollout.engine)
            resumed = self._maybe_resume()
        except BaseException:  # verify_weights or a refused checkpoint: launched servers must not outlive us
            if engine is not None:
                engine.shutdown()
            raise
        self.metrics = MetricsLogger(self.output_dir, cfg.trainer.total_steps, enabled=self.is_driver,
                                     tensorboard=cfg.trainer.tensorboard, wandb_project=cfg.trainer.wandb_project,
                                     run_config=to_dict(cfg), resume_step=self.step,
                                     console_every=cfg.trainer.log_every)
        self.metrics.message(f"maspo-train: {self.dims.describe()}; "
                             + (f"resumed from step {self.step}" if resumed else "fresh start"))
        self.startup_metrics = startup_warnings(cfg, self.metrics.message)
        if not resumed and cfg.trainer.sft_warmup_steps:
            from maspo_megatron.trainer.warmup import supervised_warmup

            supervised_warmup(self.policy, self.optimizer, cfg, self.dims,
                              dataset=self.ctx.dataset if self.ctx else None, tokenizer=self.tokenizer,
                              log=self.metrics.message)
        self.reference = None  # the frozen KL reference: the policy as RL starts (trainer/reference.py)
        if cfg.algorithm.kl_coef > 0:
            from maspo_megatron.trainer.reference import build_reference

            self.reference = build_reference(cfg, self.dims, self.tokenizer, self.policy, self.output_dir, resumed)
        # colocated: the trainer's memory leaves the GPUs while SGLang generates (trainer/offload.py), the
        # KL reference's too unless algorithm.kl_reference_offload already keeps it in host memory
        reference_chunks = () if self.reference is None or cfg.algorithm.kl_reference_offload else self.reference.chunks
        self.offload = TrainerOffload(self.policy.chunks, self.optimizer, enabled=cfg.rollout.colocated_offload,
                                      rank=self.dims.rank, reference_chunks=reference_chunks)
        self.syncer.sync(weight_version=self.step)  # engine <- trainer weights (fresh, warmed up or resumed)
        self._leave_gpus_to_rollout(OPTIMIZER, GRADS, PARAMS, REFERENCE,  # its memory was never released
                                    engine_resumes=False)

    # ---- construction ---------------------------------------------------------------------------
    def _build_driver(self) -> None:
        from maspo_megatron.data import PromptSampler, build_datasets
        from maspo_megatron.rewards import RewardScorer
        from maspo_megatron.trainer.setup import build_engine_on_driver

        cfg = self.cfg
        train, self.val_sets = build_datasets(cfg.data, self.tokenizer)
        if len(train) == 0:
            raise ValueError("data.train_files: no usable prompts (all filtered by data.max_prompt_tokens?)")
        sampler = PromptSampler(len(train), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        engine = build_engine_on_driver(cfg, self.policy, self.dims, self.tokenizer, fleet=self.fleet)
        self.ctx = DriverContext(cfg=cfg, engine=engine, scorer=RewardScorer(cfg.reward), tokenizer=self.tokenizer,
                                 sampler=sampler, dataset=train)

    def _maybe_resume(self) -> bool:
        if not self.cfg.trainer.resume:
            return False
        latest = trainer_state.find_latest(trainer_state.checkpoint_root(self.output_dir))
        if latest is None:
            return False
        driver = trainer_state.load_checkpoint(latest, self.policy.chunks, self.optimizer, self.scheduler)
        self.step = int(driver["step"])
        self.counters.update(driver.get("counters", {}))
        if self.ctx is not None:
            self.ctx.sampler.load_state_dict(driver["sampler"])
        return True

    def _driver_state(self) -> dict:
        state = {"step": self.step, "counters": dict(self.counters)}
        if self.ctx is not None:
            state["sampler"] = self.ctx.sampler.state_dict()
        return state

    # ---- one RL step ----------------------------------------------------------------------------
    def rl_step(self) -> dict:
        cfg, dims, step = self.cfg, self.dims, self.step
        timings, metrics = {}, {}
        started = time.perf_counter()
        samples = None
        if self.is_driver:
            self.metrics.phase(step, "rollout")
            samples, metrics = run_rollout(self.ctx, step)
            timings.update(self.ctx_timings())
            self.counters["samples_generated"] += int(metrics.get("rollout/num_samples", 0))
            self.counters["prompts_served"] = self.ctx.sampler.served if hasattr(self.ctx.sampler, "served") else 0
            memory_handover(self.ctx.engine, "before_train")  # colocated: SGLang frees the GPUs; samples wait
        samples = broadcast_samples(samples, dims)  # the driver released SGLang's memory before sending them
        self.offload.reload()
        train_started = time.perf_counter()
        if samples:
            self.metrics.phase(step, "train")
            mini_batches = pack_mini_batches(samples, cfg, dims, self.policy.attention_backend)
            drift = compute_old_log_probs(self.policy, mini_batches, cfg, dims)
            if self.reference is not None:
                from maspo_megatron.trainer.reference import fill_reference_log_probs

                fill_reference_log_probs(self.reference, mini_batches, cfg, dims)
            train = ppo_update(self.policy, self.optimizer, self.scheduler, mini_batches, cfg, dims)
            if self.is_driver:
                metrics.update(drift or {})
                metrics.update(train or {})
                self.counters["skipped_steps"] += int(metrics.get("train/skipped_steps", 0))
        elif self.is_driver:
            metrics["train/no_data"] = 1  # every group dropped / aborted: nothing to learn from this step
            self.metrics.message(f"step {step}: no trainable samples (all groups dropped or aborted); no update")
        timings["time/train_s"] = time.perf_counter() - train_started
        sync_started = time.perf_counter()
        self.metrics.phase(step, "sync")
        self.offload.offload(OPTIMIZER, GRADS, REFERENCE)  # the sync needs the parameters only
        self._hand_gpus_back()
        report = self.syncer.sync(weight_version=step) if self._sync_due(step) else None
        self._leave_gpus_to_rollout(PARAMS, engine_resumes=True)
        timings["time/sync_s"] = time.perf_counter() - sync_started
        if report is not None:
            metrics["sync/bytes"] = report.total_bytes
        timings["time/step_s"] = time.perf_counter() - started
        metrics.update(timings)
        return metrics

    def _sync_due(self, step: int) -> bool:
        """Every `weight_sync.every_steps`-th step, and any step whose evaluation, checkpoint or export
        must see the trained weights (the local engine's are what evaluation and export read). A
        resumed run syncs at start: its engine is fresh, whatever its staleness before the stop."""
        trainer = self.cfg.trainer
        return any(every and step % every == 0 for every in (
            self.cfg.rollout.weight_sync.every_steps, trainer.eval_every, trainer.save_every,
            trainer.hf_export_every)) or step >= trainer.total_steps

    def _leave_gpus_to_rollout(self, *kinds: str, engine_resumes: bool) -> None:
        """After a sync: the trainer's `kinds` leave the GPUs on every rank (rollout.colocated_offload), then
        (engine_resumes) the driver has SGLang map its KV cache again; the driver logs the memory timeline."""
        self.offload.offload(*kinds)
        if self.offload.enabled and dist.is_initialized():
            dist.barrier()
        if not self.is_driver:
            self.offload.events.clear()
            return
        if engine_resumes:
            memory_handover(self.ctx.engine, "after_weight_sync")  # colocated: SGLang maps its KV cache again
        self._log_memory_timeline()

    def _log_memory_timeline(self) -> None:
        """Appends the driver's offload transitions (wall time, what, bytes on the host) to
        `<output_dir>/memory_handover.jsonl`: with the servers' logs, where each side's memory was."""
        if not self.offload.events:
            return
        import json

        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "memory_handover.jsonl", "a") as handle:
            for event in self.offload.events:
                handle.write(json.dumps(event) + "\n")
        self.offload.events.clear()

    def _hand_gpus_back(self) -> None:
        """Every rank returns its cached CUDA blocks before the colocated servers map their weights again."""
        if self.dims.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.barrier()
        if self.is_driver:
            memory_handover(self.ctx.engine, "after_train")

    def ctx_timings(self) -> dict:
        timer = getattr(self.ctx, "timings", None) or {}
        self.ctx.timings = {}
        return timer

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Avg@n / Pass@n / mean length per validation set, with the engine's current weights (rank 0)."""
        if not self.is_driver or not self.val_sets:
            return {}
        from maspo_megatron.rollout import SamplingParams

        cfg = self.cfg
        greedy = cfg.trainer.eval_greedy
        n = 1 if greedy else cfg.trainer.eval_n_samples
        sampling = SamplingParams.from_config(cfg.rollout, seed=step_seed(cfg.trainer.seed, self.step, _EVAL_ROUND),
                                              **eval_sampling_overrides(cfg.trainer))
        out = {}
        for name, dataset in self.val_sets.items():
            count = len(dataset) if cfg.trainer.eval_max_prompts is None else min(len(dataset), cfg.trainer.eval_max_prompts)
            items = [dataset[i] for i in range(count)]
            groups = generate_groups(self.ctx, items, n, sampling)
            correct = [[reason == "correct" for reason in g.reasons] for g in groups]
            lengths = [[len(s.token_ids) for s in g.samples] for g in groups]
            out.update(eval_metrics(name, correct, lengths))
        return out

    # ---- the loop -------------------------------------------------------------------------------
    def save(self) -> None:
        with self.offload.resident():  # a checkpoint needs the parameters and the optimizer state
            trainer_state.save_checkpoint(self.output_dir, self.step, self.policy.chunks, self.optimizer,
                                          self.scheduler, self._driver_state(), keep_last=self.cfg.trainer.keep_last)

    def run(self) -> int:
        cfg = self.cfg.trainer
        saved_at = self.step if self.step else None
        try:
            evaluated, evaluated_at = {}, None
            while self.step < cfg.total_steps:
                if self.stop.should_stop():
                    return self._stop(saved_at)
                self.step += 1
                metrics = self.rl_step()
                metrics.update(self.startup_metrics)  # on the first step this process logs
                self.startup_metrics = {}
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    evaluated, evaluated_at = self.evaluate(), self.step
                    metrics.update(evaluated)
                self.metrics.log(self.step, metrics)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
                if cfg.hf_export_every and self.step % cfg.hf_export_every == 0:
                    self.export_hf(self.output_dir / f"hf_step_{self.step}")
            if self.stop.should_stop():
                return self._stop(saved_at)
            if saved_at != self.step:
                self.save()
            if cfg.eval_at_end:
                # a scheduled evaluation of the last step already ran at these weights: report it, not again
                final = evaluated if evaluated_at == self.step else self.evaluate()
                if final:
                    self.metrics.message("final evaluation: " + " ".join(f"{k} {v:.4f}" for k, v in final.items()))
                    self._append_final_eval(final)
            if cfg.hf_export_at_end:
                self.export_hf(self.output_dir / "hf")
            return EXIT_OK
        finally:
            self.close()

    def _stop(self, saved_at: Optional[int]) -> int:
        if saved_at != self.step:
            self.save()
        self.metrics.message(f"stop signal: checkpoint at step {self.step} written; exiting with {EXIT_CODE_REQUEUE}")
        return EXIT_CODE_REQUEUE

    def _append_final_eval(self, final: dict) -> None:
        write_json_atomically(self.output_dir / "final_eval.json", {"step": self.step, **final})

    def export_hf(self, out_dir: Path) -> None:
        """A HF checkpoint (config, safetensors, tokenizer) of the current policy, written atomically.

        The weights come from the engine after the last sync when it holds them as a HF model (trait
        `holds_hf_model`, rollout/registry.py); otherwise from the latest dist checkpoint through the converter.
        """
        if engine_traits(self.cfg.rollout.engine).holds_hf_model:
            if self.is_driver:
                tmp = out_dir.with_name(out_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                self.ctx.engine.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                shutil.rmtree(out_dir, ignore_errors=True)
                tmp.rename(out_dir)
            if dist.is_initialized():
                dist.barrier()
            return
        self._export_via_converter(out_dir)

    def _export_via_converter(self, out_dir: Path) -> None:
        from maspo_megatron.checkpoint.convert import HF_CONFIG_SUBDIR, megatron_to_hf

        latest = trainer_state.find_latest(trainer_state.checkpoint_root(self.output_dir))
        if latest is None or trainer_state.read_trainer_state(latest)["step"] != self.step:
            self.save()
            latest = trainer_state.find_latest(trainer_state.checkpoint_root(self.output_dir))
        if self.is_driver:
            self.policy.hf_config.save_pretrained(latest / HF_CONFIG_SUBDIR)
            megatron_to_hf(latest, out_dir, progress=False)
            self.tokenizer.save_pretrained(out_dir)
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        from maspo_megatron.rollout.weight_sync.syncer import close_rollout

        self.metrics.close()
        self.stop.close()
        if self.ctx is not None:
            self.ctx.scorer.close()
        close_rollout(self.syncer, self.ctx.engine if self.ctx is not None else None)  # syncer before engine
        if self.fleet is not None:
            self.fleet.shutdown()
