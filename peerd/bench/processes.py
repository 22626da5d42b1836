"""What every benchmark needs to run its parties as separate processes: a child on uvloop that
takes commands over a pipe, replies awaited with deadlines, CPU accounting, argument types."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import uvloop

from peerd.allocator import keep_freed_memory
from peerd.data.partition import parse_partition

# Child start-up (imports, generating parameters) bounds the first wait, so a hung child fails
# the run instead of hanging it.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0

Command = tuple[Any, ...]
Role = Callable[..., Coroutine[Any, Any, None]]  # (conn, *args)


class BenchError(Exception):
    """The benchmark could not produce a trustworthy number (wrong bytes, a hung child)."""


class Result(Protocol):
    def to_json(self) -> object: ...

    def describe(self) -> str: ...


def print_result(benchmark: str, run: Callable[[], Result], as_json: bool) -> int:
    """A benchmark command's output: its result as JSON or text, or its error; the exit code."""
    try:
        result = run()
    except BenchError as error:
        print(f"peerd bench {benchmark}: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()) if as_json else result.describe())
    return 0


def spawn_context() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")  # fork would copy torch's and gRPC's threads


def child_result(target: Callable[..., None], args: tuple[Any, ...], timeout_s: float,
                 what: str) -> Any:
    """Run `target(conn, *args)` in a fresh process and return the one object it sends."""
    context = spawn_context()
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(child, *args))
    process.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise BenchError(f"{what}: no result within {timeout_s:.0f} s")
        return parent.recv()
    except EOFError:
        raise BenchError(f"{what}: the child died (exit code {process.exitcode})") from None
    finally:
        process.join(timeout_s)


def _child_main(conn: Connection, role: Role, args: tuple[Any, ...]) -> None:
    """A child's entry point: its role on uvloop (as the daemon runs), failures reported back
    to the conductor rather than lost with the process."""
    keep_freed_memory()  # as `peerd start` does
    try:
        uvloop.run(role(conn, *args))
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        sys.exit(1)


async def next_command(conn: Connection) -> Command:
    """The conductor's next command, awaited without blocking the loop (gRPC keeps serving)."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


class Child:
    """A child process and its command pipe; every reply is awaited with a deadline."""

    def __init__(self, name: str, role: Role, args: tuple[Any, ...]) -> None:
        self.name = name
        context = spawn_context()
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_child_main, args=(child_conn, role, args), name=f"peerd-bench-{name}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()  # so that the child's death reads as EOF here

    def send(self, *command: Any) -> None:
        self.conn.send(command)

    def reply(self, timeout_s: float) -> Command:
        if not self.conn.poll(timeout_s):
            raise BenchError(f"{self.name}: no reply within {timeout_s:.0f} s")
        try:
            status, *values = self.conn.recv()
        except EOFError:
            self.process.join(STOP_TIMEOUT_S)
            raise BenchError(f"{self.name} exited with code {self.process.exitcode}") from None
        if status == "error":
            raise BenchError(f"{self.name} failed:\n{values[0]}")
        return tuple(values)

    def cpu_seconds(self) -> float:
        assert self.process.pid is not None  # started in __init__
        return cpu_seconds(self.process.pid)

    def call(self, *command: Any, timeout_s: float) -> Command:
        self.send(*command)
        return self.reply(timeout_s)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all threads (Linux; NaN elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def seeds_arg(text: str) -> tuple[int, ...]:
    """A --seeds value: distinct non-negative integers, comma-separated."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(
            f"seeds {text!r}: give non-negative integers, comma-separated, e.g. 0,1")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds {text!r}: a seed is repeated")
    return seeds


def partition_arg(text: str) -> str:
    """A --partition value (iid, dirichlet:ALPHA, natural), checked as an argument type."""
    try:
        parse_partition(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
