"""SGLang rollout engine: server launcher, asyncio client, 0.5.23 protocol."""
from maspo_megatron.rollout.sglang.client import EndpointMissing, SGLangClient
from maspo_megatron.rollout.sglang.engine import SGLangEngine
from maspo_megatron.rollout.sglang.launcher import ServerLauncher

__all__ = ["EndpointMissing", "SGLangClient", "SGLangEngine", "ServerLauncher"]
