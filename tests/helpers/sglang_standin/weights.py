"""Weight endpoints of the stand-in: the 0.5.23 weight-update session, `/update_weights_from_tensor`
(pickled `[(name, tensor)]` per TP rank, or `flattened_bucket`), `/update_weights_from_disk`,
`/init_weights_update_group` + `/update_weights_from_distributed` (gloo, joined exactly as SGLang's
`init_custom_process_group` joins), `/destroy_weights_update_group` and `/get_weights_by_name`."""
from __future__ import annotations

import asyncio
import base64
import datetime
import io
import pickle
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

from tests.helpers import sglang_source
from tests.helpers.sglang_standin.schema import BadRequest

GROUP_TIMEOUT_S = 60.0  # SGLang uses torch's default (30 min); bounded here so a broken test fails, not hangs


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": "BadRequest", "code": status}, status=status)


class WeightsMixin:
    """Needs from the server: model, tp_size, weight_session, session_open, groups, weight_version,
    _abort_all, _json."""

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await self._json(request, {"selector"}, "BeginWeightUpdateReqInput")
        if self.session_open:
            raise BadRequest("begin_weight_update: a weight update session is already open")
        self.session_open = True
        return web.json_response({"success": True, "message": "Weight update session opened."})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await self._json(request, set(), "EndWeightUpdateReqInput")
        if not self.session_open:
            raise BadRequest("end_weight_update: no weight update session is open")
        self.session_open = False
        return web.json_response({"success": True, "message": "Weight update session closed."})

    def _require_session(self, what: str) -> None:
        if self.weight_session and not self.session_open:
            raise BadRequest(f"{what}: weight updates must be wrapped in /begin_weight_update ... /end_weight_update")

    def _load(self, named: list, body: dict) -> web.Response:
        import torch

        self.record_memory_event("load_weights")
        if "weights" in self.released:  # the weights' memory is not mapped: nowhere to copy into
            raise BadRequest("update weights: the weights' memory is released; resume tag 'weights' first")

        params = dict(self.model.state_dict(keep_vars=True))
        for name, tensor in named:
            if name not in params:
                return web.json_response({"success": False, "message": f"unknown parameter {name}"}, status=400)
            if tuple(tensor.shape) != tuple(params[name].shape):
                return web.json_response({"success": False, "message": f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}"}, status=400)
        if body.get("abort_all_requests"):
            self._abort_all("Abort for weight update")
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor.to(params[name].dtype))
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return web.json_response({"success": True, "message": f"Updated {len(named)} tensors."})

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        fields = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
                  "torch_empty_cache"}
        body = await self._json(request, fields, "UpdateWeightsFromTensorReqInput")
        self._require_session("update_weights_from_tensor")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != self.tp_size:
            raise BadRequest(f"serialized_named_tensors: expected one payload per TP rank ({self.tp_size})")
        decoded = [_decode_payload(p, body.get("load_format")) for p in payloads]
        _require_same_tensors(decoded)
        from maspo_megatron.rollout.sglang.protocol import MIXED_DTYPE_BUCKETS_SINCE, version_at_least

        mixed = [p for p in decoded if len({t.dtype for _, t in p}) > 1]
        if mixed and body.get("load_format") == "flattened_bucket" and not version_at_least(self.version, MIXED_DTYPE_BUCKETS_SINCE):
            raise BadRequest(f"flattened_bucket: this server ({self.version}) takes one dtype per bucket")
        return self._load(decoded[0], body)

    async def update_from_disk(self, request: web.Request) -> web.Response:
        fields = {"model_path", "load_format", "abort_all_requests", "weight_version", "torch_empty_cache", "flush_cache"}
        body = await self._json(request, fields, "UpdateWeightFromDiskReqInput")
        from safetensors.torch import load_file

        files = sorted(Path(str(body.get("model_path", ""))).glob("*.safetensors"))
        if not files:
            return web.json_response({"success": False, "message": f"no *.safetensors in {body.get('model_path')}", "num_paused_requests": 0}, status=400)
        named = [item for f in files for item in load_file(str(f)).items()]
        response = self._load(named, body)
        return response

    async def init_group(self, request: web.Request) -> web.Response:
        fields = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
        body = await self._json(request, fields, "InitWeightsUpdateGroupReqInput")
        if body.get("backend", "nccl") != "gloo":
            raise BadRequest("init_weights_update_group: the CPU stand-in supports backend='gloo' only")
        if self.tp_size != 1:  # real SGLang joins once per TP worker process; the stand-in is one process
            raise BadRequest("init_weights_update_group: the stand-in joins as one TP rank; start it with tp_size=1")
        group_name = body.get("group_name", "weight_update_group")
        if not group_name:
            raise BadRequest("init_weights_update_group: group_name cannot be empty")

        def join():
            return init_custom_process_group(
                backend=body.get("backend", "nccl"), master_address=body["master_address"],
                master_port=int(body["master_port"]), world_size=int(body["world_size"]),
                rank=int(body["rank_offset"]) + 0,  # + tp_rank, which is 0 here
                group_name=group_name, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))

        try:
            if group_name in self.groups:
                raise ValueError(f"Process group with name {group_name} already exists.")
            group = await asyncio.get_running_loop().run_in_executor(None, join)
        except Exception as exc:  # rendezvous failure is reported, as SGLang does (success false, HTTP 400)
            message = f"Failed to initialize custom process group: {exc}."
            return web.json_response({"success": False, "message": message}, status=400)
        self.groups[group_name] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_group(self, request: web.Request) -> web.Response:
        import torch.distributed as dist

        body = await self._json(request, {"group_name"}, "DestroyWeightsUpdateGroupReqInput")
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return web.json_response({"success": False, "message": "The group to be destroyed does not exist."},
                                     status=400)
        dist.destroy_process_group(group)  # frees the group name: the same name can be joined again
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        fields = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
                  "load_format", "torch_empty_cache"}
        body = await self._json(request, fields, "UpdateWeightsFromDistributedReqInput")
        self._require_session("update_weights_from_distributed")
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise BadRequest("update_weights_from_distributed: call /init_weights_update_group first")
        import torch

        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest("names, dtypes, shapes must have the same length")

        def receive():
            out = []
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                tensor = torch.empty(shape, dtype=getattr(torch, str(dtype).replace("torch.", "")))
                group.broadcast(tensor, 0).wait()
                out.append((name, tensor))
            return out

        named = await asyncio.get_running_loop().run_in_executor(None, receive)
        return self._load(named, body)

    async def get_weights(self, request: web.Request) -> web.Response:
        body = await self._json(request, {"name", "truncate_size"}, "GetWeightsByNameReqInput")
        architectures = set(getattr(self.model.config, "architectures", None) or [])
        if not self.readback_any_model and not architectures & readback_architectures():
            # sglang 0.5.23: the model runner logs the model's AttributeError, the server answers 400
            return error_response(400, "Get parameter by name failed")
        tensor = self.model.state_dict().get(body.get("name"))
        if tensor is None:
            return error_response(400, "Get parameter by name failed")
        return web.json_response(tensor.float()[: int(body.get("truncate_size", 100))].tolist())



def readback_architectures() -> frozenset:
    """Model classes whose sglang 0.5.23 implementation has get_weights_by_name (from its source when here)."""
    if sglang_source.sglang_root() is not None:
        return sglang_source.weights_by_name_architectures()
    from maspo_megatron.rollout.sglang.protocol import WEIGHTS_BY_NAME_ARCHITECTURES

    return WEIGHTS_BY_NAME_ARCHITECTURES


def init_custom_process_group(*, backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                              group_name: str, timeout: datetime.timedelta):
    """A process group outside the default world, built the way sglang 0.5.23's
    `sglang.srt.utils.init_custom_process_group` builds it (called by the model runner's
    `init_weights_update_group` with init_method tcp://master_address:master_port): rendezvous,
    PrefixStore(group_name), `_new_process_group_helper` (no global ranks: its own world), and the
    identity rank map registered in `_world.pg_group_ranks`."""
    import inspect

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(dist.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    # torch 2.6 renamed pg_options to backend_options
    options = "backend_options" if "backend_options" in inspect.signature(c10d._new_process_group_helper).parameters \
        else "pg_options"
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout, **{options: None})
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class _AnyObject:
    """Stands in for sglang classes inside pickles when sglang's source is not here."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _Unpickler(pickle.Unpickler):
    """sglang names resolve to sglang's own classes (FlattenedTensorMetadata from its source) when it is here."""

    def find_class(self, module: str, name: str):
        if module.startswith("sglang"):
            if sglang_source.sglang_root() is None:
                return _AnyObject
            bucket_module = sglang_source.tensor_bucket()
            if module != bucket_module.__name__ or name != "FlattenedTensorMetadata":
                raise pickle.UnpicklingError(f"{module}.{name}: not a class a weight payload may name")
            return bucket_module.FlattenedTensorMetadata
        return super().find_class(module, name)


def _field(meta: Any, key: str) -> Any:
    return meta[key] if isinstance(meta, dict) else getattr(meta, key)


def _decode_flattened(obj: Any) -> list:
    """{"flattened_tensor", "metadata"} -> [(name, tensor)], by SGLang's FlattenedTensorBucket when its
    source is here (what the real model runner does), else by the same slicing rule."""
    import torch

    flat = obj["flattened_tensor"]
    if flat.dtype != torch.uint8:
        raise BadRequest("flattened_bucket: flattened_tensor must be uint8")
    if sglang_source.sglang_root() is not None:
        bucket_module = sglang_source.tensor_bucket()
        bad = [m for m in obj["metadata"] if type(m) is not bucket_module.FlattenedTensorMetadata]
        if bad:
            raise BadRequest(f"flattened_bucket: metadata must be sglang FlattenedTensorMetadata, got {type(bad[0]).__name__}")
        try:
            return bucket_module.FlattenedTensorBucket(flattened_tensor=flat, metadata=obj["metadata"]).reconstruct_tensors()
        except RuntimeError as exc:  # e.g. a misaligned view
            raise BadRequest(f"flattened_bucket: {exc}") from None
    named = []
    for meta in obj["metadata"]:
        dtype = _field(meta, "dtype")
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""))
        chunk = flat[int(_field(meta, "start_idx")):int(_field(meta, "end_idx"))]
        named.append((_field(meta, "name"), chunk.view(dtype).reshape(list(_field(meta, "shape")))))
    return named


def _require_same_tensors(decoded: list) -> None:
    """Every TP rank's payload must hold the same full tensors (each real TP worker takes its own shard of
    them); the stand-in, one process, loads TP rank 0's."""
    import torch

    first = decoded[0]
    for rank, other in enumerate(decoded[1:], start=1):
        same = [n for n, _ in other] == [n for n, _ in first] and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for (_, a), (_, b) in zip(other, first, strict=True))
        if not same:
            raise BadRequest(f"serialized_named_tensors: TP rank {rank}'s payload differs from TP rank 0's")


def _decode_payload(payload: str, load_format: Optional[str]) -> list:
    try:
        obj = _Unpickler(io.BytesIO(base64.b64decode(payload))).load()
    except Exception as exc:
        raise BadRequest(f"serialized_named_tensors: cannot decode payload ({type(exc).__name__}: {exc})") from None
    if load_format == "flattened_bucket":
        return _decode_flattened(obj)
    if load_format not in (None, "direct"):
        raise BadRequest(f"load_format: {load_format!r} is not implemented by the stand-in")
    return [(str(name), tensor) for name, tensor in obj]
