"""Turning stage errors into statuses, and running the whole pipeline in this process.

The same stage services run in Celery tasks (tasks.py) and here, for a fresh install with no
worker running (``manage.py ingest`` falls back to this).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded
from django.db import InterfaceError, OperationalError

from knowledge.documents import pipeline
from knowledge.documents.models import Document, Status

log = logging.getLogger(__name__)

# Errors worth another try: the database or broker was briefly unreachable or locked.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, ConnectionError, TimeoutError)
try:
    from ingestion.index import IndexLockedError

    TRANSIENT_ERRORS += (IndexLockedError,)
except ImportError:  # pragma: no cover - ingestion.index not installed yet
    pass
try:  # redis is only there when the broker is Redis
    import redis.exceptions

    TRANSIENT_ERRORS += (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
except ImportError:  # pragma: no cover
    pass


def failure_reason(*, stage: str, exc: BaseException) -> str:
    """A sentence a person can act on."""
    if isinstance(exc, pipeline.StageError):
        return exc.reason
    if isinstance(exc, SoftTimeLimitExceeded):
        return (
            f"The {stage} stage ran past its time limit. The file may be too large: split it, "
            "or raise KD_TASK_SOFT_TIME_LIMIT, then retry."
        )
    if isinstance(exc, MemoryError):
        return f"The {stage} stage ran out of memory. Split the file or give the worker more memory, then retry."
    if isinstance(exc, TRANSIENT_ERRORS):
        return f"The {stage} stage could not reach the database or broker ({exc}). Retry when the services are back."
    return (
        f"Unexpected error in the {stage} stage ({type(exc).__name__}: {str(exc)[:300]}). "
        "Retry the document; if it fails again, report it with this message."
    )


def stage_fail(*, document_id: int, stage: str, exc: BaseException) -> str:
    reason = failure_reason(stage=stage, exc=exc)
    if not isinstance(exc, pipeline.StageError):
        log.error("document %s failed in %s", document_id, stage, exc_info=exc)
    pipeline.document_fail(document_id=document_id, reason=reason)
    return reason


def pipeline_run_inline(*, document_id: int, on_stage: Callable[[str], None] | None = None) -> Document:
    """Run every stage here, in order; returns the row as it ends (indexed or failed)."""
    for stage, run in pipeline.STAGES:
        if on_stage is not None:
            on_stage(stage)
        try:
            run(document_id=document_id)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status with a reason
            stage_fail(document_id=document_id, stage=stage, exc=exc)
            break
        if Document.objects.filter(pk=document_id, status=Status.FAILED).exists():
            break
    return Document.objects.get(pk=document_id)
