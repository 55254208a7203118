"""The training Monitor: real TensorBoard event files read back, resume purges, console lines, inactive ranks."""
from __future__ import annotations

import io
import json
import time

import pytest

from pipeline.train.monitor import (
    Monitor,
    eta_seconds,
    format_duration,
    format_eval_line,
    format_train_line,
    memory_gib,
    read_metrics,
    read_scalars,
)

TAGS = ("train/loss", "train/kd_loss", "train/lr", "perf/tokens_per_s", "data/consumed_tokens")


def make(run_dir, *, active=True, total_steps=10, start_step=0, console_every=1, tensorboard=True, stream=None):
    return Monitor(run_dir, active=active, total_steps=total_steps, start_step=start_step,
                   console_every=console_every, tensorboard=tensorboard, console=True,
                   config_text="model: tiny\nlr: 3.0e-4", stream=stream if stream is not None else io.StringIO())


def scalars_at(step, base):
    return {tag: base + step + i / 8 for i, tag in enumerate(TAGS)}


def next_second():
    """Event file names carry whole seconds first: a resumed run's file must sort after the killed run's."""
    time.sleep(1.02 - time.time() % 1)


def test_scalars_read_back(tmp_path):
    with make(tmp_path) as monitor:
        for step in range(1, 6):
            monitor.train_step(step, scalars_at(step, 100.0))
        monitor.eval_step(5, {"eval/perplexity": 31.25, "eval/divergence": 0.5})
    got = read_scalars(tmp_path / "tensorboard")
    assert set(got) == {*TAGS, "eval/perplexity", "eval/divergence"}
    for tag in TAGS:
        assert got[tag] == [(s, scalars_at(s, 100.0)[tag]) for s in range(1, 6)]
    assert got["eval/perplexity"] == [(5, 31.25)]
    records = read_metrics(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [(s, "train") for s in range(1, 6)] + [(5, "eval")]
    assert records[2] == {"step": 3, "kind": "train", **scalars_at(3, 100.0)}


def test_resume_purges_orphaned_steps(tmp_path):
    first = make(tmp_path)
    for step in range(1, 9):  # killed after step 8; its last checkpoint was step 5
        first.train_step(step, scalars_at(step, 100.0))
    first.eval_step(8, {"eval/loss": 9.0})
    first.close()
    next_second()
    with make(tmp_path, start_step=5) as second:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
        for step in range(6, 11):
            second.train_step(step, scalars_at(step, 200.0))
        second.eval_step(10, {"eval/loss": 2.0})
    got = read_scalars(tmp_path / "tensorboard")
    for tag in TAGS:
        want = [(s, scalars_at(s, 100.0 if s <= 5 else 200.0)[tag]) for s in range(1, 11)]
        assert got[tag] == want, tag
    assert got["eval/loss"] == [(10, 2.0)]
    records = read_metrics(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [(s, "train") for s in range(1, 11)] + [(10, "eval")]
    assert [r["train/loss"] for r in records[:10]] == [scalars_at(s, 100.0 if s <= 5 else 200.0)["train/loss"]
                                                       for s in range(1, 11)]


def test_config_text_written(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    make(tmp_path).close()
    acc = ea.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert acc.Tags()["tensors"] == ["config/text_summary"]
    (event,) = acc.Tensors("config/text_summary")
    assert event.step == 0
    assert event.tensor_proto.string_val[0].decode() == "```\nmodel: tiny\nlr: 3.0e-4\n```"


def test_inactive_monitor_creates_nothing(tmp_path):
    stream = io.StringIO()
    with make(tmp_path / "run", active=False, start_step=3, stream=stream) as monitor:
        monitor.train_step(4, scalars_at(4, 1.0))
        monitor.eval_step(4, {"eval/loss": 1.0})
        monitor.message("saved checkpoint step_00000004")
    assert not (tmp_path / "run").exists()
    assert stream.getvalue() == ""


def test_train_line_format():
    scalars = {"train/loss": 3.4121, "train/kd_loss": 3.2009, "train/ce_loss": 0.0, "train/top1_agreement": 0.4124,
               "train/lr": 2.9e-4, "perf/tokens_per_s": 12345.4, "perf/data_wait_fraction": 0.031,
               "train/skipped_steps": 0.0}
    assert format_train_line(120, 1000, scalars, 842.0) == (
        "step  120/1000 | loss 3.412 (kd 3.201 ce 0.000) | top1 0.412 | lr 2.9e-04 | 12,345 tok/s | wait 3% "
        "| ETA 0:14:02")
    assert format_train_line(7, 10, {"train/skipped_steps": 2.0}, None) == "step  7/10 | skipped 2 | ETA ?"
    hidden = {"train/loss": 2.5, "train/kd_loss": 1.0, "train/ce_loss": 0.0, "train/hidden_loss": 3.0}
    assert format_train_line(1, 10, hidden, None) == "step  1/10 | loss 2.500 (kd 1.000 ce 0.000 hidden 3.000) | ETA ?"


def test_durations_and_eta():
    assert format_duration(0) == "0:00:00"
    assert format_duration(90061.4) == "25:01:01"
    assert format_duration(float("nan")) == "?"
    assert eta_seconds([1.0, 3.0], 10) == 20.0
    assert eta_seconds([], 10) is None


def test_eval_line_format():
    line = format_eval_line(500, {"eval/perplexity": 31.24, "eval/divergence": 0.4121, "eval/top1_agreement": 0.45})
    assert line == "eval @ step 500 | ppl 31.2 | div 0.412 | top1 0.450"
    assert format_eval_line(7, {"eval/loss": 2.0, "eval/r_llh": 3.21, "eval/r_cvg": 4.5678}) == \
        "eval @ step 7 | loss 2.000 | R_llh 3.210 | R_cvg 4.568"


def test_console_every_and_final_step(tmp_path):
    stream = io.StringIO()
    with make(tmp_path, console_every=4, tensorboard=False, stream=stream) as monitor:
        for step in range(1, 11):  # a slow first step must not dominate the ETA
            monitor.train_step(step, {"train/loss": 1.0, "perf/step_time_s": 30.0 if step == 1 else 2.0})
        monitor.message("saved checkpoint step_00000010")
    lines = stream.getvalue().splitlines()
    assert lines == ["step  4/10 | loss 1.000 | ETA 0:00:12", "step  8/10 | loss 1.000 | ETA 0:00:04",
                     "step 10/10 | loss 1.000 | ETA 0:00:00", "saved checkpoint step_00000010"]
    assert not (tmp_path / "tensorboard").exists()
    assert len(read_metrics(tmp_path)) == 10


def test_close_is_idempotent_and_metrics_tolerate_torn_line(tmp_path):
    monitor = make(tmp_path)
    monitor.train_step(1, {"train/loss": 1.0})
    monitor.close()
    monitor.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "kind": "tr')  # killed mid-line
    assert read_metrics(tmp_path) == [{"step": 1, "kind": "train", "train/loss": 1.0}]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_memory_gib_cpu():
    assert 0.0 < memory_gib("cpu") < 1024.0


@pytest.mark.gpu
def test_memory_gib_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    assert memory_gib("cuda") >= 0.25
    del x
