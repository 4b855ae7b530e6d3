"""Real CLI runs with and without BN, read back through a real TensorBoard server's HTTP data API."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO, frequent_logging_callbacks

pytestmark = pytest.mark.slow  # a TensorBoard server and two CLI fits

RUNS = {"lenet_bn_scratch/version_0": "lenet_bn_scratch", "lenet_no_bn/version_0": "lenet_no_bn"}
BN_RUN, NO_BN_RUN = RUNS
BLOCKS = ("conv1", "conv2", "fc1", "fc2")
HPARAMS = {"norm", "activation", "pool", "optimizer", "lr", "batch_size", "shuffle_seed"}


def quick_logging(tmp: Path) -> Path:
    """The configs' own callbacks, logging every 2 steps (histograms every 4) instead of every 50."""
    path = tmp / "quick_logging.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": frequent_logging_callbacks(), "log_every_n_steps": 2}}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def logdir(tiny_data, tmp_path_factory) -> Path:
    """Two 2-epoch fits (5 steps an epoch) of the real configs, run side by side, each tested after fit."""
    cwd = tmp_path_factory.mktemp("runs")
    overrides = quick_logging(cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fits = [
        subprocess.Popen(
            [sys.executable, "-m", "bn_lightning", "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
             "--config", str(overrides), f"--data.data_dir={tiny_data}", "--data.batch_size=32", "--data.val_size=40",
             "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for config in RUNS.values()
    ]
    for fit in fits:
        _, err = fit.communicate(timeout=600)
        assert fit.returncode == 0, err[-3000:]
    return cwd / "lightning_logs"


@pytest.fixture(scope="module")
def tensorboard(logdir):
    """A TensorBoard server on a free loopback port, once it serves both runs' final test accuracy."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                tags = get(url, "/data/plugin/scalars/tags")
                if all("test/acc" in tags.get(run, {}) for run in RUNS):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not serve both runs within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the data server it started
        server.wait(timeout=30)


def get(url: str, path: str, **query):
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.load(response)


def post(url: str, path: str, body: dict):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_both_runs_are_served(tensorboard):
    assert sorted(get(tensorboard, "/data/runs")) == sorted(RUNS)


def test_scalar_and_histogram_tags_are_served_for_runs_with_and_without_bn(tensorboard):
    scalars, histograms = get(tensorboard, "/data/plugin/scalars/tags"), get(tensorboard, "/data/plugin/histograms/tags")
    common = {"train/acc_epoch", "val/acc", "test/acc", "lr-SGD", "perf/examples_per_sec"} | {
        f"act/{b}/{t}" for b in BLOCKS for t in ("unit/p15", "unit/p50", "unit/p85", "layer/p15", "layer/p50", "layer/p85", "mean", "std")
    }
    first_channel = {"conv1": "ch0", "conv2": "ch00", "fc1": "ch000", "fc2": "ch00"}  # zero-padded to the layer's width
    bn = {f"bn/{b}/{t}" for b in BLOCKS
          for t in ("mean_gap", "mean_gap_std", "var_ratio", f"running_mean/{first_channel[b]}", f"running_var/{first_channel[b]}")}
    for run in RUNS:
        assert common <= set(scalars[run]), run
        assert {f"act/{b}" for b in BLOCKS} <= set(histograms[run]), run
    assert bn <= set(scalars[BN_RUN])
    assert {f"bn/{b}/{h}" for b in BLOCKS for h in ("running_mean", "running_var", "gamma", "beta")} <= set(histograms[BN_RUN])
    assert not any(tag.startswith("bn/") for tag in [*scalars[NO_BN_RUN], *histograms[NO_BN_RUN]])


def frontend_regex(chart: dict) -> str:
    """The tag regex TensorBoard's custom-scalars frontend sends for a chart."""
    if "multiline" in chart:
        tags = chart["multiline"]["tag"]
        return tags[0] if len(tags) == 1 else "|".join(f"({t})" for t in tags)
    series = chart["margin"]["series"][0]
    return "|".join(f"({re.escape(series[k])})" for k in ("value", "lower", "upper"))


def test_custom_scalars_layout_is_served_and_every_chart_finds_its_series(tensorboard):
    assert get(tensorboard, "/data/plugins_listing")["custom_scalars"]["enabled"]
    layout = get(tensorboard, "/data/plugin/custom_scalars/layout")
    charts = {(c["title"], chart["title"]): chart for c in layout["category"] for chart in c["chart"]}
    assert {("BN running mean per channel", b) for b in BLOCKS} <= charts.keys()
    assert {("Activation input, one unit: p15 / p50 / p85", b) for b in BLOCKS} <= charts.keys()
    assert {("Training", "accuracy"), ("Training", "learning rate"), ("Training", "examples per second")} <= charts.keys()

    for (category, title), chart in charts.items():
        served = {run: get(tensorboard, "/data/plugin/custom_scalars/scalars", run=run, tag=frontend_regex(chart))
                  for run in RUNS}
        assert all(answer["regex_valid"] for answer in served.values())
        for run, answer in served.items():
            series = answer["tag_to_events"]
            if category.startswith("BN ") and run == NO_BN_RUN:
                assert series == {}, (category, title)
                continue
            assert series, (run, category, title)
            if "margin" in chart:  # the frontend draws a band only where value, lower and upper share their steps
                steps = {tag: [event[1] for event in events] for tag, events in series.items()}
                assert len(steps) == 3 and len({tuple(s) for s in steps.values()}) == 1, steps
    per_channel = get(tensorboard, "/data/plugin/custom_scalars/scalars", run=BN_RUN,
                      tag=frontend_regex(charts["BN running mean per channel", "fc1"]))["tag_to_events"]
    assert sorted(per_channel) == [f"bn/fc1/running_mean/ch{c:03d}" for c in (0, 17, 34, 51, 68, 85, 102, 119)]


def test_hparams_dashboard_compares_runs_by_final_val_and_test_accuracy(tensorboard, logdir):
    experiment = post(tensorboard, "/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {h["name"] for h in experiment["hparamInfos"]} == HPARAMS
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["val/acc", "test/acc"]

    groups = post(tensorboard, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "startIndex": 0, "sliceSize": 10,
    })["sessionGroups"]
    by_run = {group["name"]: group for group in groups}
    assert by_run.keys() == set(RUNS)
    expected = {BN_RUN: {"norm": "scratch", "lr": 1.0}, NO_BN_RUN: {"norm": "none", "lr": 0.9}}
    for run, group in by_run.items():
        assert group["hparams"] == {**expected[run], "activation": "sigmoid", "pool": "avg", "optimizer": "SGD",
                                    "batch_size": 32.0, "shuffle_seed": 42.0}
        events = EventAccumulator(str(logdir / run), size_guidance={"scalars": 0})
        events.Reload()
        served = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert served == pytest.approx({tag: events.Scalars(tag)[-1].value for tag in ("val/acc", "test/acc")})
