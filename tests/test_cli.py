"""`python -m maspo_megatron {train,plan,convert,...}`: the help text lists every command with one line,
each command's --help shows its own options, `convert to-megatron|to-hf` and the older names
`convert-to-megatron|convert-to-hf` run the same converters, `python -m maspo_megatron.train` still
works, an unknown command is one line and exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maspo_megatron.__main__ import main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "plan", "convert", "convert-to-megatron", "convert-to-hf")


def _run(*args: str, module: str = "maspo_megatron") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert "{train,plan,convert,convert-to-megatron,convert-to-hf}" in proc.stdout.splitlines()[0]
    described = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert all(len(line.split(maxsplit=1)) == 2 for line in described)  # a name and its one line each


def test_convert_group_lists_both_directions(capsys):
    assert main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "usage: python -m maspo_megatron convert {to-megatron,to-hf} [args ...]"
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ")] == ["to-megatron", "to-hf"]
    assert main(["convert", "to-json"]) == 2
    assert capsys.readouterr().err.strip() == ("python -m maspo_megatron convert: unknown command 'to-json' "
                                               "(choose from to-megatron, to-hf; --help)")


def test_train_module_still_runs_on_its_own():
    proc = _run("--help", module="maspo_megatron.train")
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "overrides" in proc.stdout


@pytest.mark.parametrize("command, options", [
    ("train", ["--config", "overrides"]),
    ("plan", ["--config", "--nodes", "--gpus-per-node", "--gpu-mem-gib", "--hf-config"]),
    ("convert-to-megatron", ["--hf-dir", "--out-dir", "--tp", "--pp", "--dtype", "--vocab-divisible-by"]),
    ("convert-to-hf", ["--megatron-dir", "--out-dir", "--hf-config-dir", "--max-shard-size"]),
    ("convert to-megatron", ["--hf-dir", "--out-dir", "--tp", "--pp", "--dtype", "--vocab-divisible-by"]),
    ("convert to-hf", ["--megatron-dir", "--out-dir", "--hf-config-dir", "--max-shard-size"]),
])
def test_each_command_help_shows_its_options(command, options, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m maspo_megatron {command} "), out.splitlines()[0]
    for option in options:
        assert option in out, (command, option)


def test_unknown_command_is_one_line_exit_2():
    proc = _run("trian", "--config", "x.yaml")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "python -m maspo_megatron: unknown command 'trian' (choose from train, plan, convert, convert-to-megatron, "
        "convert-to-hf; --help)"]


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "convert-to-hf" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["convert-to-hf"], ["convert", "to-hf"]])
def test_convert_error_through_the_command_is_one_line(tmp_path, command):
    proc = _run(*command, "--megatron-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "missing" in proc.stderr
    assert not (tmp_path / "out").exists()
