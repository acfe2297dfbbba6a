"""Sweep file checks, the train/held-out split, job planning, and the job runner on tiny real processes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _experiments_plan import Job, SweepError, check_overrides, load_sweep, plan_jobs, write_task_files
from run_experiments import Runner
from run_experiments import main as run_main

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "examples" / "experiments" / "base.yaml"

SWEEP = f"""
base: {BASE}
seeds: [1, 2]
seed_overrides: ["trainer.seed={{seed}}", "data.seed={{seed}}"]
warmup_overrides: [trainer.sft_warmup_steps=7]
heldout: {{num_prompts: 10, seed: 5}}
threshold: {{reward: 0.5, window: 3}}
methods:
  maspo: {{label: MASPO, overrides: [algorithm.loss=maspo]}}
  grpo: {{label: GRPO, overrides: [algorithm.loss=grpo]}}
"""


def _sweep(tmp_path, text=SWEEP, task="data.synthetic.max_operand=5"):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    sweep = load_sweep(path)
    return sweep, [task]


def test_the_shipped_sweep_loads_and_every_run_config_validates():
    sweep = load_sweep(REPO / "examples" / "experiments" / "sweep.yaml")
    assert len(sweep.seeds) >= 3
    assert {"maspo", "grpo", "clip_higher", "sapo", "dac", "maspo_hard_clip", "maspo_alpha0", "maspo_beta0"} <= set(sweep.methods)
    check_overrides(sweep, [])


@pytest.mark.parametrize("text, fragment", [
    (SWEEP.replace("seeds: [1, 2]", "seeds: []"), "seeds: expected a non-empty list"),
    (SWEEP.replace("seeds: [1, 2]", "seeds: [1, 1]"), "seeds: duplicates"),
    (SWEEP.replace("heldout: {num_prompts: 10, seed: 5}\n", ""), "heldout: missing"),
    (SWEEP.replace("label: GRPO,", "lable: GRPO,"), "methods.grpo.lable: unknown key"),
    (SWEEP.replace("[algorithm.loss=grpo]", "[algorithm.loss]"), "methods.grpo.overrides: expected a list"),
    (SWEEP.replace(f"base: {BASE}", "base: nowhere.yaml"), "base:"),
])
def test_bad_sweep_files_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_override_fails_before_any_run_naming_the_method(tmp_path):
    sweep, _ = _sweep(tmp_path, SWEEP.replace("[algorithm.loss=grpo]", "[algorithm.loss=ppo2]"))
    with pytest.raises(SweepError, match=r"methods\.grpo \(seed 1\): algorithm\.loss: 'ppo2' is not one of"):
        check_overrides(sweep, [])


def test_cli_bad_option_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    assert run_main(["--sweep", str(path), "--methods", "ppo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--methods: 'ppo' is not in" in err and "\n" not in err


def test_task_split_is_disjoint_and_covers_every_distinct_problem(tmp_path):
    sweep, extra = _sweep(tmp_path)
    train, heldout = write_task_files(sweep, tmp_path / "out", extra, draws=2000)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    held_rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    assert len(held_rows) == 10
    # operands 0..5 with '+': 36 distinct problems, by hand
    assert len(train_rows) + len(held_rows) == 36
    questions = [r["question"] for r in train_rows + held_rows]
    assert len(set(questions)) == 36
    for row in train_rows + held_rows:
        a, b = row["question"].rstrip("=").split("+")
        assert row["answer"] == str(int(a) + int(b))
        assert row["reference"] == "\\boxed{" + row["answer"] + "}"
    # the same sweep gives the same split
    again = write_task_files(sweep, tmp_path / "again", extra, draws=2000)
    assert again[1].read_text() == heldout.read_text()


def test_reference_noise_reaches_the_warm_up_rows_and_never_the_held_out_ones(tmp_path):
    sweep, _ = _sweep(tmp_path)
    extra = ["data.synthetic.max_operand=49", "data.synthetic.answer_format=plain", r"reward.answer_pattern=^(\d+)$",
             "data.synthetic.reference_noise=0.5"]
    train, heldout = write_task_files(sweep, tmp_path / "out", extra, draws=20000)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    wrong = [r for r in train_rows if r["reference"] != r["answer"]]
    assert 0.45 < len(wrong) / len(train_rows) < 0.55  # 2490 rows, binomial sd 0.01
    for r in wrong:  # one digit off, same length; the rewarded answer is untouched
        a, b = r["question"].rstrip("=").split("+")
        assert r["answer"] == str(int(a) + int(b))
        assert len(r["reference"]) == len(r["answer"]) and sum(x != y for x, y in zip(r["reference"], r["answer"], strict=True)) == 1
    held_rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    assert all(r["reference"] == r["answer"] for r in held_rows)


def test_task_too_small_for_the_split_is_refused(tmp_path):
    sweep, _ = _sweep(tmp_path)
    with pytest.raises(SweepError, match="heldout.num_prompts: the task has only 9 distinct problems"):
        write_task_files(sweep, tmp_path / "out", ["data.synthetic.max_operand=2"], draws=2000)


def test_plan_orders_warmups_first_then_seed_major_and_pins_the_start_point(tmp_path):
    sweep, extra = _sweep(tmp_path)
    root = tmp_path / "out"
    files = (root / "train.jsonl", root / "heldout.jsonl")
    jobs = plan_jobs(sweep, root, files, extra + ["trainer.sft_warmup_steps=2", "trainer.output_dir=/elsewhere"])
    assert [job.name for job in jobs] == ["warmup/seed1", "warmup/seed2", "maspo/seed1", "grpo/seed1",
                                          "maspo/seed2", "grpo/seed2"]
    rl = jobs[3]
    assert rl.out_dir == root / "runs" / "grpo" / "seed1"
    # whatever --set says, an RL run starts from its seed's warm-up, without a warm-up of its own, in its dir
    assert rl.argv[-3:] == [f"model.init_from_hf={root / 'warmup' / 'seed1' / 'hf'}", "trainer.sft_warmup_steps=0",
                            f"trainer.output_dir={rl.out_dir}"]
    assert "algorithm.loss=grpo" in rl.argv and "trainer.seed=1" in rl.argv
    assert f"data.train_files=[{files[0]}]" in rl.argv
    # the warm-up takes the sweep's warm-up steps, then --set (last wins)
    warm = jobs[0].argv
    assert warm.index("trainer.sft_warmup_steps=7") < warm.index("trainer.sft_warmup_steps=2")


def _job(tmp_path, kind, seed, name, code):
    out = tmp_path / name
    marker = "warmup_eval.json" if kind == "warmup" else "final_eval.json"
    return Job(kind, seed, None if kind == "warmup" else name, out,
               [sys.executable, "-c", code.replace("MARKER", str(out / marker)).replace("OUT", str(out))])


def test_runner_skips_finished_jobs_wipes_unfinished_ones_and_skips_seeds_whose_warmup_failed(tmp_path):
    ok = "import pathlib; pathlib.Path('MARKER').write_text('{}')"
    warm1 = _job(tmp_path, "warmup", 1, "w1", ok)
    warm2 = _job(tmp_path, "warmup", 2, "w2", "import sys; print('boom'); sys.exit(3)")
    # the RL job must see its warm-up finished when it starts
    rl1 = _job(tmp_path, "rl", 1, "rl1",
               f"import pathlib, sys\nif not pathlib.Path({str(warm1.done_marker)!r}).exists(): sys.exit(4)\n" + ok)
    rl2 = _job(tmp_path, "rl", 2, "rl2", ok)
    done = _job(tmp_path, "rl", 1, "done", "import sys; sys.exit(5)")
    done.out_dir.mkdir()
    done.done_marker.write_text("{}")
    done.spec_file.write_text(json.dumps(done.spec()))
    # finished, but with other arguments than now: rerun
    changed = _job(tmp_path, "rl", 1, "changed", ok)
    changed.out_dir.mkdir()
    changed.done_marker.write_text("{}")
    changed.spec_file.write_text(json.dumps({**changed.spec(), "args": ["trainer.lr=1"]}))
    stale = rl1.out_dir / "stale.txt"
    rl1.out_dir.mkdir()
    stale.write_text("from an interrupted attempt")
    lines = []
    failed = Runner([warm1, warm2, rl1, rl2, done, changed], tmp_path, parallel=2, timeout_s=120,
                    log=lines.append).run()
    assert failed == ["warmup/seed2", "rl2/seed2"]
    assert warm1.is_done() and rl1.is_done() and not rl2.out_dir.exists()
    assert not stale.exists()
    assert any("1 job(s) already finished" in line for line in lines)
    assert any("FAILED warmup/seed2 (exit 3): boom" in line for line in lines)
    status = json.loads((tmp_path / "status.json").read_text())
    assert set(status) == {"warmup/seed1", "rl1/seed1", "changed/seed1"}
    assert json.loads(changed.spec_file.read_text()) == changed.spec()
