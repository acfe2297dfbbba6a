"""All checkpoint I/O in one place: HF files, Megatron dist checkpoints (torch_dist), conversion
between them, the trainer's checkpoints, and the guard every dist-checkpoint load goes through.

    hf_reader     HFCheckpointReader: safetensors / .bin tensors one by one, row and column slices
    hf_writer     ShardedSafetensorsWriter: planned, size-capped safetensors shards
    hf_weights    load_hf_weights / export_hf_weights: HF tensors into / out of a TP/PP model chunk
    byte_copy     file-to-file kernel copies (copy_file_range, sendfile) and the splice placeholder
    dist_save     torch_dist checkpoints written chunk by chunk (lazy DCP save planner)
    dist_read     torch_dist checkpoints read slice by slice, `.metadata` through an allow-list
    dist_load     load_model_weights: a dist checkpoint into live model chunks (model.load, KL reference)
    guard         verify_checkpoint_is_data: no pickle outside the allow-lists, before every load
    convert       hf_to_megatron / megatron_to_hf (convert_tensors: the tensor plans; convert_cli: the CLIs)
    trainer_state the trainer's checkpoints: save, `latest`, keep-last-k, resume
    errors        CheckpointError (one line naming the file / tensor)

Floors: imports `models` and `parallel`; `trainer` and `rollout` may import it; `models` must not.
Importing this package imports nothing heavy (each module is imported where it is used).
"""
