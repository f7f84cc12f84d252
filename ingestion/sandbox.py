"""Run partition_file in a child process with a memory cap and a deadline, so a worker survives any file."""

from __future__ import annotations

import multiprocessing as mp
import resource
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ingestion.elements import Element
from ingestion.partition import PartitionError, partition_file

DEFAULT_TIMEOUT_S = 600
DEFAULT_MEMORY_MB = 4096


def _child(conn: Any, path: str, kwargs: dict[str, Any], memory_mb: int) -> None:
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        elements, info = partition_file(Path(path), **kwargs)
        conn.send(("ok", [asdict(e) for e in elements], info))
    except PartitionError as exc:
        conn.send(("error", exc.reason, None))
    except MemoryError:
        conn.send(("error", f"reading this file needs more than {memory_mb} MB of memory: refused", None))
    except Exception as exc:  # noqa: BLE001 - any library failure becomes a readable refusal
        conn.send(("error", f"unexpected failure reading the file ({type(exc).__name__}: {str(exc)[:200]})", None))
    finally:
        conn.close()


def partition_file_isolated(
    path: Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    **kwargs: Any,
) -> tuple[list[Element], dict[str, Any]]:
    """Same contract as partition_file (same keyword arguments); the work happens in a spawned child.

    The child gets an address-space cap of `memory_mb` and is killed after `timeout_s`; both, and a
    crash of a native library, come back as PartitionError instead of taking the worker down.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, str(path), kwargs, memory_mb), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise PartitionError(f"reading the file took longer than {timeout_s:g} s: refused")
        try:
            status, payload, info = parent.recv()
        except EOFError:
            proc.join(5)
            raise PartitionError(
                f"the reader crashed on this file (exit code {proc.exitcode}): it is probably damaged; re-save it and upload again"
            ) from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()
    if status != "ok":
        raise PartitionError(payload)
    return [Element(**row) for row in payload], info
