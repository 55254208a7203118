"""The cache folder's job record (`pipeline.teacher.identity.bind_output`): created once, so of concurrent
tasks starting on one fresh folder exactly one records its settings and every task with other settings
is refused, naming them; tasks with the same settings all go ahead (a job array's tasks). The races run
real processes released together by a barrier, several rounds, since the window is small.
"""
from __future__ import annotations

import json
import multiprocessing

import pytest

from pipeline.teacher.errors import CacheError
from pipeline.teacher.identity import JOB_FILE, PROGRESS_DIR, bind_output

TASKS = 8
ROUNDS = 6


def record(k: int, seed: int = 0) -> dict:
    return {"teacher": {"weights_sha256": "ab" * 32}, "tokens": "fingerprint", "seed": seed,
            "targets": {"mode": "topk", "k": k, "member": "topk.bin"}}


def _task(folder, job: dict, start, outcomes, index: int) -> None:
    start.wait()
    try:
        bind_output(folder, job)
        outcomes[index] = ""
    except CacheError as err:
        outcomes[index] = str(err)


def race(folder, records: list[dict]) -> list[str]:
    """bind_output for every record at once, one process each (as a job array's tasks); per record, ""
    when it went ahead, else the CacheError's message."""
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        start, outcomes = context.Barrier(len(records)), manager.list([None] * len(records))
        tasks = [context.Process(target=_task, args=(folder, job, start, outcomes, i)) for i, job in enumerate(records)]
        for task in tasks:
            task.start()
        for task in tasks:
            task.join()
        assert [task.exitcode for task in tasks] == [0] * len(tasks)
        return list(outcomes)


def test_concurrent_tasks_with_different_settings_one_wins_the_rest_are_refused(tmp_path):
    for round_index in range(ROUNDS):  # the race window is small: several fresh folders
        folder = tmp_path / f"cache{round_index}"
        outcomes = race(folder, [record(k) for k in range(1, TASKS + 1)])
        winners = [k for k, err in zip(range(1, TASKS + 1), outcomes) if err == ""]
        assert len(winners) == 1, f"round {round_index}: {len(winners)} tasks each recorded their own job"
        refused = [err for err in outcomes if err != ""]
        assert all("(targets.k differ)" in err for err in refused), refused
        kept = json.loads((folder / PROGRESS_DIR / JOB_FILE).read_text())
        assert kept == record(winners[0]), "the record on disk is not the one task that was let through"


def test_concurrent_tasks_with_the_same_settings_all_go_ahead(tmp_path):
    assert race(tmp_path / "cache", [record(4)] * TASKS) == [""] * TASKS
    assert [p.name for p in (tmp_path / "cache" / PROGRESS_DIR).iterdir()] == [JOB_FILE]  # no temporaries left
    bind_output(tmp_path / "cache", record(4))  # a later task, or a rerun


def test_a_later_task_is_refused_naming_every_differing_setting(tmp_path):
    bind_output(tmp_path, record(4))
    with pytest.raises(CacheError, match=r"\(seed, targets\.k differ\); nothing was overwritten"):
        bind_output(tmp_path, record(5, seed=1))
    assert json.loads((tmp_path / PROGRESS_DIR / JOB_FILE).read_text()) == record(4)


def test_a_folder_of_other_files_or_a_broken_record_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a cache")
    with pytest.raises(CacheError, match="is not a cache folder of this pipeline"):
        bind_output(tmp_path / "other", record(4))
    assert not (tmp_path / "other" / PROGRESS_DIR).exists()
    (tmp_path / "broken" / PROGRESS_DIR).mkdir(parents=True)
    (tmp_path / "broken" / PROGRESS_DIR / JOB_FILE).write_text("{")
    with pytest.raises(CacheError, match=f"{JOB_FILE}: not valid JSON"):
        bind_output(tmp_path / "broken", record(4))
