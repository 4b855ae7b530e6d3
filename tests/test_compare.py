"""The comparison runner: the matrix it builds, real runs it resumes, and tables checked against the events."""

import csv
import functools
import math
import os
import statistics
from pathlib import Path

import matplotlib.image
import pytest
import submitit
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_lightning import compare
from bn_lightning.compare import contrasts
from bn_lightning.training.cli import main
from helpers import CONFIGS, SHARED_DATA, needs_real_data


def write_comparison(folder: Path, data: Path, **spec) -> Path:
    """A comparison of real configs on ``data``: 2 epochs of 5 batches, so a run takes seconds."""
    spec = {
        "configs": [str(CONFIGS / "lenet_no_bn.yaml"), str(CONFIGS / "lenet_bn_scratch.yaml")],
        "seeds": [0, 1],
        "args": {"data.data_dir": str(data), "data.batch_size": 32, "data.val_size": 40, "trainer.max_epochs": 2},
        "threshold": 0.3,
        **spec,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def last_values(folder: Path) -> dict[str, float]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in ("val/acc", "test/acc")} | {
        "best": max(e.value for e in events.Scalars("val/acc"))
    }


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("path", sorted((CONFIGS / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_provided_comparison_loads(path):
    comparison = compare.Comparison.load(path, {})
    assert comparison.runs() and all(run.config.is_file() for run in comparison.runs())
    assert len({run.folder(Path("out")) for run in comparison.runs()}) == len(comparison.runs())


def test_d2l_comparison_is_three_norms_by_three_seeds_with_the_books_settings():
    comparison = compare.Comparison.load(CONFIGS / "compare" / "d2l.yaml", {})
    assert [c.stem for c in comparison.configs] == ["lenet_no_bn", "lenet_bn_scratch", "lenet_bn_torch"]
    assert len(comparison.seeds) == 3 and not comparison.grid
    # Nothing of the book's training is changed: the one addition evaluates the final weights afterwards.
    assert comparison.args == {"trainer.callbacks+": [{"class_path": "bn_lightning.callbacks.PreciseBN",
                                                       "init_args": {"num_images": [55000], "every_n_epochs": None}}]}


def test_a_runs_figures_are_read_from_its_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, acc in [(10, 0.5), (20, 0.8), (30, 0.7), (40, 0.75)]:
        writer.add_scalar("val/acc", acc, step)
    writer.add_scalar("precise_bn/val_acc_256", 0.6, 30)  # not after the last epoch: not the final weights'
    writer.add_scalar("precise_bn/val_acc_256", 0.76, 40)
    writer.add_scalar("precise_bn/val_acc_55000", 0.77, 40)
    writer.add_scalar("test/acc", 0.79, 40)
    writer.close()
    comparison = compare.Comparison(name="t", configs=[], seeds=[0], threshold=0.78)
    figures = compare.read_run(tmp_path, comparison)
    assert figures["val_acc_last3"] == pytest.approx((0.8 + 0.7 + 0.75) / 3)
    assert figures["final_val_acc"] == pytest.approx(0.75) and figures["best_val_acc"] == pytest.approx(0.8)
    assert figures["precise_val_acc"] == pytest.approx(0.77)  # the most training images
    assert figures["test_acc"] == pytest.approx(0.79) and figures["step_to_threshold"] == 20
    assert [value for _, value in figures["series"]["val/acc"]] == pytest.approx([0.5, 0.8, 0.7, 0.75])

    other = tmp_path / "early"
    writer = SummaryWriter(str(other))
    writer.add_scalar("val/acc", 0.5, 10)
    writer.add_scalar("val/acc", 0.6, 20)
    writer.add_scalar("precise_bn/val_acc_256", 0.6, 10)  # logged every few epochs, not after the last
    writer.close()
    figures = compare.read_run(other, comparison)
    assert figures["val_acc_last3"] == pytest.approx(0.55) and math.isnan(figures["precise_val_acc"])


def test_matrix_runs_every_config_grid_point_and_seed(tmp_path):
    path = write_comparison(tmp_path, tmp_path, grid={"model.optimizer.init_args.lr": [0.1, 1.0]})
    runs = compare.Comparison.load(path, {}).runs()
    assert [(r.group, r.seed) for r in runs] == [
        (f"{config}-lr={lr}", seed) for config in ("lenet_no_bn", "lenet_bn_scratch") for lr in (0.1, 1.0) for seed in (0, 1)
    ]
    command = compare.fit_command(runs[0], compare.Comparison.load(path, {}), tmp_path / "out")
    assert command[2:6] == ["bn_lightning", "fit", "--config", str(CONFIGS / "lenet_no_bn.yaml")]
    assert {"--model.optimizer.init_args.lr=0.1", "--seed_everything=0", "--trainer.logger.init_args.version=seed_0",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'out'}", "--trainer.logger.init_args.name=lenet_no_bn-lr=0.1",
            "--trainer.max_epochs=2"} <= set(command)


def test_a_joint_grid_axis_changes_its_options_together(tmp_path):
    path = write_comparison(tmp_path, tmp_path, grid={"data.batch_size,model.optimizer.init_args.lr": [[16, 0.0625], [256, 1.0]],
                                                      "model.net.init_args.activation": ["sigmoid", "relu"]})
    comparison = compare.Comparison.load(path, {})
    runs = [run for run in comparison.runs() if run.seed == 0 and run.config.stem == "lenet_no_bn"]
    assert [run.group for run in runs] == [f"lenet_no_bn-batch_size={b}-lr={lr}-activation={a}"
                                           for b, lr in ((16, 0.0625), (256, 1.0)) for a in ("sigmoid", "relu")]
    command = compare.fit_command(runs[0], comparison, tmp_path / "out")
    assert {"--data.batch_size=16", "--model.optimizer.init_args.lr=0.0625"} <= set(command)
    path = write_comparison(tmp_path, tmp_path, grid={"data.batch_size,model.optimizer.init_args.lr": [[16, 0.0625], [256]]})
    with pytest.raises(ValueError, match="sets 2 options together: each of its values must list 2 values"):
        compare.Comparison.load(path, {})


def test_a_null_in_the_grid_reaches_the_run_as_none(tmp_path, capsys):
    path = write_comparison(tmp_path, tmp_path, configs=[str(CONFIGS / "lenet_bn_scratch.yaml")],
                            grid={"model.net.init_args.norm_kwargs": [{"momentum": 0.1}, {"momentum": None}]})
    comparison = compare.Comparison.load(path, {})
    assert [run.group for run in comparison.runs()[::2]] == ["lenet_bn_scratch-momentum=0.1",
                                                             "lenet_bn_scratch-momentum=None"]
    command = compare.fit_command(comparison.runs()[-1], comparison, tmp_path / "out")
    assert '--model.net.init_args.norm_kwargs={"momentum": null}' in command
    with pytest.raises(SystemExit) as done:
        main(command[3:] + ["--print_config"])
    assert done.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["net"]["init_args"]["norm_kwargs"] == {"momentum": None}


@pytest.mark.parametrize("spec, message", [
    ({"epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
    ({"seeds": []}, "'seeds' must list at least one entry"),
    ({"configs": ["no_such_config.yaml"]}, "config\\(s\\) not found: .*no_such_config.yaml"),
    ({"grid": {"data.batch_size": []}}, r"grid axis/axes \['data.batch_size'\] must each list at least one value"),
    ({"slurm": {"queue": "gpu"}}, r"unknown slurm key\(s\) \['queue'\]; slurm takes \['array_parallelism', "),
    ({"slurm": {"timeout_min": "1h"}}, r"slurm.timeout_min must be int, got '1h'"),
    ({"slurm": "gpu"}, r"slurm must map some of \['array_parallelism', "),
])
def test_a_bad_comparison_file_is_refused_with_what_to_fix(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        compare.Comparison.load(write_comparison(tmp_path, tmp_path, **spec), {})


def test_the_command_line_refuses_bad_arguments_before_running_anything(tmp_path, capsys):
    path = write_comparison(tmp_path, tmp_path, seeds=[])
    with pytest.raises(SystemExit):
        compare.main([str(path), "--out", str(tmp_path / "out")])
    assert "'seeds' must list at least one entry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(write_comparison(tmp_path, tmp_path)), "--set", "data.batch_size"])
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_runs_in_parallel_tabulates_from_the_events_and_resumes_only_what_is_unfinished(tiny_data, tmp_path):
    path, out = write_comparison(tmp_path, tiny_data), tmp_path / "out"
    assert compare.main([str(path), "--out", str(out), "--workers", "2"]) == 0

    runs = compare.Comparison.load(path, {}).runs()
    per_run = read_csv(out / "runs.csv")
    assert [(row["group"], int(row["seed"])) for row in per_run] == [(run.group, run.seed) for run in runs]
    for row, run in zip(per_run, runs):
        logged = last_values(run.folder(out))
        assert float(row["final_val_acc"]) == pytest.approx(logged["val/acc"])
        assert float(row["test_acc"]) == pytest.approx(logged["test/acc"])
        assert float(row["best_val_acc"]) == pytest.approx(logged["best"])
        assert float(row["seconds_per_epoch"]) > 0
        if run.config.stem == "lenet_no_bn":
            assert row["bn_mean_gap"] == "nan"
        else:
            events = EventAccumulator(str(run.folder(out)), size_guidance={"scalars": 0})
            events.Reload()
            gaps = [e.value for tag in events.Tags()["scalars"] if tag.endswith("/mean_gap") for e in events.Scalars(tag)]
            assert len(gaps) == 4 and float(row["bn_mean_gap"]) == pytest.approx(statistics.fmean(gaps))
        events = EventAccumulator(str(run.folder(out)), size_guidance={"scalars": 0})
        events.Reload()
        p85 = [events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.endswith("/layer/p85")]
        assert len(p85) == 4 and int(float(row["layers_mostly_off"])) == sum(v <= 0 for v in p85)

    summary = {row["group"]: row for row in read_csv(out / "results.csv")}
    assert list(summary) == ["lenet_no_bn", "lenet_bn_scratch"]
    for group, row in summary.items():
        finals = [float(r["final_val_acc"]) for r in per_run if r["group"] == group]
        assert float(row["final_val_acc_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(row["final_val_acc_std"]) == pytest.approx(statistics.stdev(finals))
        assert int(row["seeds"]) == 2
    table = (out / "results.md").read_text()
    assert "| lenet_bn_scratch | 2 | " in table and "step to val acc ≥ 0.3" in table
    for plot in ("val_acc.png", "percentiles.png"):
        assert matplotlib.image.imread(out / plot).shape[0] > 100

    # Half-finished: one run lost its result (killed before the end), another never started.
    unfinished, untouched = runs[1].folder(out), runs[2].folder(out)
    (unfinished / compare.RESULT_FILE).unlink()
    stale_events = sorted(unfinished.glob("events.out.tfevents.*"))
    finished_before = {run: (run.folder(out) / compare.RESULT_FILE).stat().st_mtime_ns for run in runs if run != runs[1]}
    assert compare.main([str(path), "--out", str(out)]) == 0
    assert {run: (run.folder(out) / compare.RESULT_FILE).stat().st_mtime_ns for run in finished_before} == finished_before
    events = sorted(unfinished.glob("events.out.tfevents.*"))
    assert len(events) == len(stale_events) and not set(events) & set(stale_events)  # rerun afresh, stale files gone
    assert untouched.exists()


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_still_finish(tiny_data, tmp_path, capsys):
    path = write_comparison(tmp_path, tiny_data, seeds=[0], grid={"model.net.init_args.norm": ["none", "bogus"]},
                            configs=[str(CONFIGS / "lenet_no_bn.yaml")])
    assert compare.main([str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "lenet_no_bn-norm=bogus seed 0 failed" in err and "fit.log" in err and "run the same command again" in err
    assert [row["group"] for row in read_csv(tmp_path / "out" / "results.csv")] == ["lenet_no_bn-norm=none"]


@pytest.mark.slow
def test_a_run_that_diverges_is_a_result_with_its_step_and_no_final_accuracy(tiny_data, tmp_path, capsys):
    path = write_comparison(tmp_path, tiny_data, seeds=[0], configs=[str(CONFIGS / "lenet_no_bn.yaml")],
                            grid={"model.optimizer.init_args.lr": [0.1, 1e6]},
                            args={"data.data_dir": str(tiny_data), "data.batch_size": 32, "data.val_size": 40,
                                  "trainer.max_epochs": 2, "model.net.init_args.activation": "relu"})
    assert compare.main([str(path), "--out", str(tmp_path / "out")]) == 0
    rows = {row["group"]: row for row in read_csv(tmp_path / "out" / "runs.csv")}
    trained, diverged = rows["lenet_no_bn-lr=0.1"], rows["lenet_no_bn-lr=1000000.0"]
    assert trained["diverged_at_step"] == "" and float(trained["final_val_acc"]) > 0
    log = (tmp_path / "out" / "lenet_no_bn-lr=1000000.0" / "seed_0" / "fit.log").read_text()
    assert f"training diverged at step {diverged['diverged_at_step']} " in log
    assert diverged["final_val_acc"] == diverged["test_acc"] == "nan"
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| diverged |" in table and table.count("| 1/1 |") == 1 and table.count("| 0/1 |") == 1


def fake_slurm(folder: Path, monkeypatch) -> None:
    """A login node as far as the launcher's check goes: sbatch and srun on PATH (that fail if called)."""
    for command in ("sbatch", "srun"):
        (folder / command).write_text("#!/bin/sh\nexit 1\n")
        (folder / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")


def test_without_slurm_the_slurm_launcher_says_to_use_the_local_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        compare.main([str(write_comparison(tmp_path, tmp_path)), "--out", str(tmp_path / "out"),
                      "--launcher", "slurm"])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert stopped.value.code == 2 and "Slurm was not found" in last_line and "use --launcher local" in last_line
    assert not (tmp_path / "out").exists()


class Submitted(Exception):
    """Raised instead of submitting: the test has what it checks."""


def test_slurm_settings_come_from_the_file_and_the_flags_override_them(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)
    passed = {}
    check = submitit.AutoExecutor.update_parameters

    def update_parameters(executor, **parameters):
        passed.update(parameters)
        check(executor, **parameters)  # submitit's Slurm executor takes every name and value
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters", update_parameters)
    path = write_comparison(tmp_path, tmp_path, slurm={"partition": "cpu", "timeout_min": 30, "mem_gb": 4,
                                                       "extra": {"account": "bn", "qos": "low"}})
    with pytest.raises(Submitted):
        compare.main([str(path), "--out", str(tmp_path / "out"), "--launcher", "slurm",
                      "--partition", "gpu", "--gpus-per-node", "1", "--array-parallelism", "3"])
    assert passed == {"name": "tiny", "timeout_min": 30, "cpus_per_task": 2, "gpus_per_node": 1, "mem_gb": 4.0,
                      "slurm_partition": "gpu", "slurm_array_parallelism": 3,
                      "slurm_account": "bn", "slurm_qos": "low"}


def test_a_slurm_setting_submitit_does_not_know_is_refused_before_submitting(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch)
    path = write_comparison(tmp_path, tmp_path, slurm={"extra": {"acount": "bn"}})
    with pytest.raises(SystemExit):
        compare.main([str(path), "--out", str(tmp_path / "out"), "--launcher", "slurm"])
    assert "slurm settings: Unknown argument 'acount'" in capsys.readouterr().err


@pytest.mark.slow
def test_on_slurm_a_failing_job_is_reported_and_a_rerun_redoes_only_it(tiny_data, tmp_path, monkeypatch, capsys):
    """The Slurm launcher end to end, each job a process here: submitit's local cluster instead of Slurm."""
    fake_slurm(tmp_path, monkeypatch)
    monkeypatch.setattr(compare.cli, "slurm_executor", functools.partial(compare.slurm_executor, cluster="local"))
    path = write_comparison(tmp_path, tiny_data, grid={"model.net.init_args.norm": ["none", "bogus"]},
                            configs=[str(CONFIGS / "lenet_no_bn.yaml")], slurm={"cpus_per_task": 1})
    out = tmp_path / "out"
    command = [str(path), "--out", str(out), "--launcher", "slurm"]
    runs = compare.Comparison.load(path, {}).runs()

    def jobs() -> set[str]:  # one folder a job (submitit's local cluster also leaves an empty "%j")
        return {folder.name for folder in (out / "submitit").iterdir() if folder.name != "%j"}

    def mtimes(name: str, norm: str) -> dict:
        return {run: (run.folder(out) / name).stat().st_mtime_ns for run in runs if run.group.endswith(f"={norm}")}

    assert compare.main(command) == 1
    err = capsys.readouterr().err
    assert "submitted 4 job(s)" in err and "run the same command again" in err
    for seed in (0, 1):
        failed = out / "lenet_no_bn-norm=bogus" / f"seed_{seed}"
        assert f"lenet_no_bn-norm=bogus seed {seed} failed (job " in err and f"{failed / 'fit.log'} ends with:" in err
    assert "_0_log.out" in err and "_0_log.err" in err  # submitit's own logs of the job
    assert "error: unknown norm 'bogus'; choose one of: none, scratch, torch" in err  # the CLI's own error
    assert [(row["group"], row["seeds"]) for row in read_csv(out / "results.csv")] == [("lenet_no_bn-norm=none", "2")]
    first = jobs()
    assert len(first) == 4

    finished, logs = mtimes(compare.RESULT_FILE, "none"), mtimes("fit.log", "bogus")
    assert compare.main(command) == 1
    assert "submitted 2 job(s)" in capsys.readouterr().err
    assert mtimes(compare.RESULT_FILE, "none") == finished
    assert all(mtime != logs[run] for run, mtime in mtimes("fit.log", "bogus").items())  # the failed ones ran again
    assert len(jobs() - first) == 2


@pytest.mark.slow
@needs_real_data
def test_quick_comparison_on_the_real_data_shows_bn_learning_faster(tmp_path):
    out = tmp_path / "quick"
    assert compare.main([str(CONFIGS / "compare" / "quick.yaml"), "--out", str(out), "--workers", "2",
                         "--set", f"data.data_dir={SHARED_DATA}"]) == 0
    summary = {row["group"]: row for row in read_csv(out / "results.csv")}
    assert list(summary) == ["lenet_no_bn", "lenet_bn_scratch", "lenet_bn_torch"]
    # Same seeds, same numbers: our BN and torch's train the same network.
    assert float(summary["lenet_bn_scratch"]["test_acc_mean"]) == pytest.approx(float(summary["lenet_bn_torch"]["test_acc_mean"]), abs=2e-3)
    assert float(summary["lenet_bn_scratch"]["final_val_acc_mean"]) > float(summary["lenet_no_bn"]["final_val_acc_mean"]) + 0.2
    assert int(summary["lenet_bn_torch"]["reached_threshold"]) == 2
    assert not math.isnan(float(summary["lenet_bn_torch"]["step_to_threshold_mean"]))


def _figures(primary, test, diverged=None):
    return {"val_acc_last3": primary, "test_acc": test, "diverged_at_step": diverged}


def test_contrasts_take_each_arm_at_its_best_lr_and_compare_test_accuracy(tmp_path):
    path = write_comparison(tmp_path, tmp_path, grid={"model.optimizer.init_args.lr": [0.1, 1.0, 10.0]}, seeds=[0, 1, 2],
                            tune="model.optimizer.init_args.lr", contrasts=[["lenet_bn_scratch", "lenet_no_bn"]])
    comparison = compare.Comparison.load(path, {})
    primary = {("lenet_no_bn", 0.1): 0.70, ("lenet_no_bn", 1.0): 0.80, ("lenet_no_bn", 10.0): 0.95,
               ("lenet_bn_scratch", 0.1): 0.85, ("lenet_bn_scratch", 1.0): 0.88, ("lenet_bn_scratch", 10.0): 0.87}
    results = {}
    for run in comparison.runs():
        lr = dict(run.grid)["model.optimizer.init_args.lr"]
        arm = run.config.stem
        diverged = 100 if (arm, lr, run.seed) == ("lenet_no_bn", 10.0, 2) else None  # one seed diverged: not eligible
        results[run] = _figures(primary[arm, lr] + 0.001 * run.seed, 0.5 + lr / 100 + 0.01 * run.seed + (arm == "lenet_bn_scratch") * 0.1,
                                diverged)
    found = contrasts.arms(comparison, results)
    assert (found["lenet_no_bn"].value, found["lenet_bn_scratch"].value) == (1.0, 1.0)
    assert not found["lenet_no_bn"].edge
    # Before an extended grid's new values have run, the edge is that of the values that ran.
    extended = {run: figures for run, figures in results.items()
                if dict(run.grid)["model.optimizer.init_args.lr"] != 10.0}
    assert contrasts.arms(comparison, extended)["lenet_bn_scratch"].edge
    assert found["lenet_bn_scratch"].compared == {s: pytest.approx(0.61 + 0.01 * s) for s in range(3)}
    text = contrasts.markdown(comparison, results)
    assert "| lenet_no_bn | 1.0 | 0.8010 ± 0.0010 | 0.5200 ± 0.0100 |" in text
    assert "| lenet_bn_scratch - lenet_no_bn | +10.00 |" in text and "differs" in text
    # An arm that diverged in some seed at every value trained at no value: no best value is named for it.
    every = {run: {**figures, "diverged_at_step": 3 if run.config.stem == "lenet_no_bn" and run.seed == 0 else None}
             for run, figures in results.items()}
    assert not contrasts.arms(comparison, every)["lenet_no_bn"].trained and found["lenet_no_bn"].trained
    text = contrasts.markdown(comparison, every)
    assert "| lenet_no_bn | none: a seed diverged at every value | - | - |" in text
    assert "| lenet_bn_scratch - lenet_no_bn | - |" in text  # not a difference from the seeds that trained
    assert "over the 0 comparison(s) of this file with numbers" in text and "over the 1 comparison(s)" in \
        contrasts.markdown(comparison, results)


def test_contrasts_must_name_arms_of_the_comparison(tmp_path):
    with pytest.raises(ValueError, match=r"contrasts name arms that are not in the comparison: \['lenet_bn'\]"):
        compare.Comparison.load(write_comparison(tmp_path, tmp_path, contrasts=[["lenet_bn", "lenet_no_bn"]]), {})
    with pytest.raises(ValueError, match="tune must be one of the grid's axes"):
        compare.Comparison.load(write_comparison(tmp_path, tmp_path, tune="model.optimizer.init_args.lr"), {})
