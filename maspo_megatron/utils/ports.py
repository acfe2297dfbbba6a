"""Free TCP ports, picked by the kernel: rendezvous ports, server ports, NCCL group ports.

A port is free only at the moment of asking; callers bind it soon after (a race with another
process is possible and reported by whoever binds second).
"""
from __future__ import annotations

import socket

LOOPBACK_HOST = "127.0.0.1"


def free_port(host: str = LOOPBACK_HOST) -> int:
    """A port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK_HOST) -> bool:
    """True when something accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) == 0


def free_port_block(count: int, host: str = LOOPBACK_HOST, tries: int = 50) -> int:
    """The first of `count` consecutive ports on `host` that nothing listens on (servers on port, port+1, ...)."""
    if count < 1:
        raise ValueError(f"free_port_block: count={count} must be >= 1")
    for _ in range(tries):
        base = free_port(host)
        if base + count < 65000 and not any(port_in_use(base + i, host) for i in range(count)):
            return base
    raise RuntimeError(f"free_port_block: no block of {count} free ports on {host} after {tries} tries")
