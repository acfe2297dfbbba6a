"""The converters' kernel-copy paths: row runs, the copier's fallbacks, the row blocks against the
tensor transforms they stand for, the placeholder guard, and that the fast paths are really taken
(and agree with the in-memory paths, also across file systems)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maspo_megatron.checkpoint import byte_copy
from maspo_megatron.checkpoint.byte_copy import Segment, SegmentCopier, SpliceTarget, merge_segments, slice_rows
from maspo_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
from maspo_megatron.checkpoint.dist_read import DistCheckpointReader
from maspo_megatron.models import layouts
from tests.helpers.hf_models import save_hf_model


def test_slice_rows_names_runs_and_zero_gaps():
    rows = [(0, 2, "a", 100), (4, 3, "b", 0)]  # rows 2-3 unnamed (padding), row bytes 10
    assert slice_rows(rows, 0, 7, 10) == [Segment("a", 100, 20), Segment(None, 0, 20), Segment("b", 0, 30)]
    assert slice_rows(rows, 1, 5, 10) == [Segment("a", 110, 10), Segment(None, 0, 20), Segment("b", 0, 10)]
    assert slice_rows(rows, 5, 9, 10) == [Segment("b", 10, 20), Segment(None, 0, 20)]
    assert merge_segments([Segment("a", 0, 4), Segment("a", 4, 4), Segment("a", 9, 1), Segment(None, 0, 2),
                           Segment(None, 0, 3), Segment("b", 0, 0)]) == \
        [Segment("a", 0, 8), Segment("a", 9, 1), Segment(None, 0, 5)]


@pytest.mark.parametrize("mode", ["copy_file_range", "sendfile", "pread"])
def test_copier_every_fallback_copies_the_same_bytes(tmp_path, monkeypatch, mode):
    (tmp_path / "a").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "b").write_bytes(b"xyz" * 1000)
    refused = []

    def refuse(*args):
        refused.append(mode)
        raise OSError(errno.EXDEV, "cross-device (simulated)")

    if mode != "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", refuse)
    if mode == "pread":
        monkeypatch.setattr(os, "sendfile", refuse)
    monkeypatch.setattr(byte_copy, "COPY_CALL_BYTES", 1000)  # several calls per segment
    segments = [Segment(str(tmp_path / "a"), 7, 5000), Segment(None, 0, 3), Segment(str(tmp_path / "b"), 1, 2500)]
    copier = SegmentCopier()
    with open(tmp_path / "out", "wb") as out:
        out.write(b"head")
        out.flush()
        assert copier.copy(out.fileno(), segments) == 7503
    copier.close()
    expected = b"head" + (bytes(range(256)) * 40)[7:5007] + b"\0\0\0" + (b"xyz" * 1000)[1:2501]
    assert (tmp_path / "out").read_bytes() == expected
    assert bool(refused) == (mode != "copy_file_range")


def test_copier_names_a_short_source(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    copier = SegmentCopier()
    with open(tmp_path / "out", "wb") as out, pytest.raises(OSError, match="a: ends before byte 20"):
        copier.copy(out.fileno(), [Segment(str(tmp_path / "a"), 5, 15)])
    copier.close()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_row_blocks_rebuild_the_fused_tensors(groups):
    heads, dim, hidden = 4, 3, 5
    q = torch.arange(heads * dim * hidden, dtype=torch.float32).reshape(heads * dim, hidden)
    k = -torch.arange(groups * dim * hidden, dtype=torch.float32).reshape(groups * dim, hidden) - 1
    v = k - 1000
    fused = layouts.merge_qkv(q, k, v, heads, groups)

    def rebuild(blocks, parts, rows):
        out = torch.zeros(rows, hidden)
        for part, part_blocks in zip(parts, blocks, strict=True):
            at = 0
            for start, count in part_blocks:
                out[start: start + count] = part[at: at + count]
                at += count
            assert at == part.shape[0]
        return out

    blocks = layouts.hf_row_blocks("qkv", fused.shape[0], heads, groups, dim, vocab_size=0)
    assert torch.equal(rebuild(blocks, (q, k, v), fused.shape[0]), fused)
    gate, up = q[:6], q[6:]
    blocks = layouts.hf_row_blocks("gate_up", 12, heads, groups, dim, vocab_size=0)
    assert torch.equal(rebuild(blocks, (gate, up), 12), layouts.merge_gate_up(gate, up))
    blocks = layouts.hf_row_blocks("vocab", 16, heads, groups, dim, vocab_size=11)
    assert torch.equal(rebuild(blocks, (q[:11],), 16), layouts.pad_rows(q[:11], 16))
    with pytest.raises(ValueError, match="no row blocks"):
        layouts.hf_row_blocks("rotated", 4, heads, groups, dim, vocab_size=0)


def _same_hf_dirs(a: Path, b: Path) -> None:
    load = lambda d: {k: v for p in sorted(d.glob("*.safetensors")) for k, v in load_file(p).items()}  # noqa: E731
    left, right = load(a), load(b)
    assert sorted(left) == sorted(right)
    for key in left:
        assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key


def test_fast_paths_are_taken_and_exact(tmp_path, monkeypatch):
    save_hf_model("qwen2", tmp_path / "hf")  # vocab 300: padded rows are zero runs
    copies = {"n": 0}
    original = SegmentCopier.copy

    def counting(self, *args):
        copies["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(SegmentCopier, "copy", counting)
    hf_to_megatron(tmp_path / "hf", tmp_path / "meg", tp=1, pp=1, progress=False)
    reader = DistCheckpointReader(tmp_path / "meg")
    chunks = sum(len(md.chunks) for md in reader.tensors.values())
    assert copies["n"] == chunks  # every chunk went file to file

    def no_load(*args, **kwargs):
        raise AssertionError("Megatron -> HF read a tensor into memory")

    monkeypatch.setattr(DistCheckpointReader, "load", no_load)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", progress=False)
    _same_hf_dirs(tmp_path / "hf", tmp_path / "back")


def test_unserved_placeholder_fails_loudly(tmp_path, monkeypatch):
    save_hf_model("llama", tmp_path / "hf")
    monkeypatch.setattr(SpliceTarget, "take", lambda self, data: None)  # as if torch.save copied the storage
    with pytest.raises(RuntimeError, match="did not write the chunk's bytes from its storage"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "meg", progress=False)
    assert not (tmp_path / "meg").exists() and not list(tmp_path.glob(".meg*"))


def test_across_file_systems(tmp_path, monkeypatch):
    """/dev/shm (tmpfs) <-> the test dir: copy_file_range refuses (EXDEV), sendfile serves."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test dir")
    save_hf_model("qwen3", tmp_path / "hf")
    sent = {"n": 0}
    original = os.sendfile

    def counting(*args):
        sent["n"] += 1
        return original(*args)

    monkeypatch.setattr(os, "sendfile", counting)
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        hf_to_megatron(tmp_path / "hf", shm / "meg", tp=2, pp=1, progress=False)
        megatron_to_hf(shm / "meg", tmp_path / "back", progress=False)
    finally:
        shutil.rmtree(shm)
    assert sent["n"] > 0
    _same_hf_dirs(tmp_path / "hf", tmp_path / "back")


def test_conversion_where_dcp_sees_cuda(tmp_path, monkeypatch):
    """Where CUDA is available, DCP's writer picks a loader that resolves ~10 MB of items ahead of
    writing them; the placeholder splice needs each chunk written before the next is made. The
    converter asks for the serial loader (the conversion tests failed on a GPU node without it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # all that DCP's choice looks at
    save_hf_model("qwen2", tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "meg", tp=2, pp=1, progress=False)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", progress=False)
    _same_hf_dirs(tmp_path / "hf", tmp_path / "back")
