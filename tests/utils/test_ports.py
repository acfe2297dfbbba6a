"""Free ports (`maspo_megatron/utils/ports.py`), checked against real sockets."""
from __future__ import annotations

import socket

import pytest

from maspo_megatron.utils.ports import free_port, free_port_block, port_in_use


def test_a_free_port_can_be_bound_and_is_seen_in_use_while_listened_on():
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert port_in_use(port)
    assert not port_in_use(port)


def test_a_block_has_no_listener_on_any_of_its_ports():
    base = free_port_block(3)
    assert not any(port_in_use(base + offset) for offset in range(3))
    with pytest.raises(ValueError, match="count=0"):
        free_port_block(0)
