"""Live weight sync Megatron -> rollout engines: HF-named tensor stream, buckets, transports, FP8, verification."""
