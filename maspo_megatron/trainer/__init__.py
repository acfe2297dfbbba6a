"""The RL loop on Megatron-Core (see docs/trainer.md).

    from maspo_megatron.trainer.loop import Trainer
    exit_code = Trainer(cfg).run()          # what `python -m maspo_megatron.train` does

Modules: loop (the step and the loop), rollout_phase (driver: samples, rewards, advantages),
dynamic_sampling (DAPO: keep groups whose rewards differ, refill),
train_step (packing, old log-probs, PPO updates), warmup (supervised warm-up), setup (policy,
tokenizer, engine), optim (optimizer, LR schedule, non-finite guard), metrics (console, jsonl, TensorBoard, W&B), evaluation
(Avg@n, Pass@n), signals (SIGUSR1/SIGTERM -> checkpoint, exit 75); loss and batch (the Megatron
loss function and packed micro-batches). Checkpoints (save, `latest`, resume):
`maspo_megatron.checkpoint.trainer_state`.
"""
