"""Run the quickstart's stages one after another, each as its own process, with live output and a log each.

Design choice: a stage is done when its process exits 0, and only then is its record written
(OUT/stages/<name>.json), so a rerun of the same command skips finished stages and gives the unfinished
one back to its own command, which resumes by itself (tokenization and the cache keep finished shards,
the trainer resumes from its latest checkpoint). Nothing is deleted on failure: the error names the
stage, its log and the command to rerun. The child's output is copied byte by byte to the console and
the log, so progress bars and the trainer's console lines show as they happen; the cost is that a log
keeps the carriage returns of its progress bars.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from pipeline.quickstart.plan import Stage


class StageFailed(RuntimeError):
    """A stage's process exited non-zero; the message says which, where its log is and how to go on."""

    def __init__(self, stage: Stage, status: int, log: Path, tail: str):
        self.status = status
        super().__init__(f"stage {stage.name!r} ({stage.title}) exited with status {status}.\n"
                         f"Its log: {log}\nLast lines:\n{tail}\n"
                         "Everything finished so far is kept: the same command resumes from this stage.")


class StageRunner:
    """Runs stages in order under OUT, skipping those recorded as done."""

    def __init__(self, out: Path, console: TextIO = sys.stdout, child_env: dict | None = None):
        self.out, self.console = out, console
        self.records, self.logs = out / "stages", out / "logs"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(child_env or {})}
        self.started = time.monotonic()

    def run_all(self, stages: list[Stage], after_each: Callable[[Stage], None] | None = None) -> dict[str, float]:
        """Run every stage not yet done; {stage name: seconds} of all of them (from their records when skipped)."""
        self.records.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        seconds = {}
        for number, stage in enumerate(stages, 1):
            header = f"[{number}/{len(stages)}] {stage.name}: {stage.title}"
            record = self.records / f"{stage.name}.json"
            if record.exists():
                seconds[stage.name] = json.loads(record.read_text())["seconds"]
                self._say(f"{header} (done in an earlier run, skipped)")
                continue
            seconds[stage.name] = self._run(stage, header, number, record)
            if after_each is not None:
                after_each(stage)
        return seconds

    def _run(self, stage: Stage, header: str, number: int, record: Path) -> float:
        for path, text in stage.configs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        command = stage.command()
        printable = shlex.join(["distill", *command[3:]])
        self._say(f"\n{header}   [{_clock(time.monotonic() - self.started)} elapsed]\n$ {printable}")
        log = self.logs / f"{number:02d}_{stage.name}.log"
        begun = time.monotonic()
        status, tail = self._stream(command, log)
        if status != 0:
            raise StageFailed(stage, status, log, tail)
        seconds = time.monotonic() - begun
        record.write_text(json.dumps({"command": printable, "seconds": round(seconds, 2)}, indent=1) + "\n")
        with open(self.out / "commands.sh", "a") as commands:
            commands.write(printable + "\n")
        self._say(f"    {stage.name} done in {_clock(seconds)}")
        return seconds

    def _stream(self, command: list[str], log: Path) -> tuple[int, str]:
        """Run `command`, copying its output to the console and `log`; (exit status, last lines)."""
        last = b""
        with open(log, "wb") as sink:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
            try:
                while chunk := os.read(process.stdout.fileno(), 65536):
                    sink.write(chunk)
                    self._echo(chunk)
                    last = (last + chunk)[-4000:]
                status = process.wait()
            except BaseException:
                process.terminate()
                process.wait()
                raise
        lines = last.decode("utf-8", "replace").replace("\r", "\n").splitlines()
        return status, "\n".join(line for line in lines if line.strip())[-1500:]

    def _echo(self, chunk: bytes) -> None:
        stream = getattr(self.console, "buffer", None)
        if stream is not None:
            self.console.flush()
            stream.write(chunk)
            stream.flush()
        else:
            self.console.write(chunk.decode("utf-8", "replace"))

    def _say(self, text: str) -> None:
        print(text, file=self.console, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
