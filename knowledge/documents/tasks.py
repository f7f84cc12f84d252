"""Celery tasks: one thin task per stage, linked by a chain, over the services in pipeline.py.

Tasks take a document id and re-read the row; ``pipeline.stage_enter`` makes a second delivery
a no-op. Transient errors (database or broker briefly away) retry with backoff and jitter, at most
``MAX_RETRIES`` times; anything else marks the document failed with a reason and stops the chain.
acks_late and reject_on_worker_lost are set in settings: a killed worker's task runs again.
"""
from __future__ import annotations

import datetime as dt
import os
import random

from celery import chain, shared_task
from celery.exceptions import Ignore
from celery.canvas import Signature
from django.conf import settings
from django.utils import timezone

from knowledge import queues
from knowledge.documents import pipeline, workers  # workers also registers the heartbeat and the warm-up
from knowledge.documents.models import IN_PROGRESS, Document, Status
from knowledge.documents.runner import TRANSIENT_ERRORS, stage_fail

MAX_RETRIES = 3
# A stage hands the document on by publishing the next step; ride out a broker restart (~2 min) doing so.
HANDOFF_RETRY = {"max_retries": 40, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 3.0}
STALLED_AFTER_S = 2 * 3600  # beyond the broker's visibility timeout, so redelivery had its chance first


def _backoff(retries: int) -> float:
    return min(60.0, 2.0 ** (retries + 1)) * random.uniform(0.5, 1.5)


def embed_budget_s() -> float:
    """Embed for at most half the soft time limit per task (KD_EMBED_TASK_BUDGET_S overrides), then hand on."""
    override = os.environ.get("KD_EMBED_TASK_BUDGET_S")
    if override not in (None, ""):
        return float(override)
    return max(30.0, float(settings.CELERY_TASK_SOFT_TIME_LIMIT) / 2)


def _run(task, *, stage: str, document_id: int) -> bool:
    workers.warm_up_wait()
    run = dict(pipeline.STAGES)[stage]
    try:
        if stage == "embed":
            return run(document_id=document_id, budget_s=embed_budget_s())
        return run(document_id=document_id)
    except pipeline.StageContinues:
        pipeline_signature(document_id=document_id, status=Status.EMBEDDING).apply_async()
        raise Ignore() from None  # this chain stops; the new one goes on from the saved vectors
    except TRANSIENT_ERRORS as exc:
        if task.request.retries < MAX_RETRIES:
            raise task.retry(exc=exc, countdown=_backoff(task.request.retries), max_retries=MAX_RETRIES)
        stage_fail(document_id=document_id, stage=stage, exc=exc)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status with a reason
        stage_fail(document_id=document_id, stage=stage, exc=exc)
    raise Ignore()  # failed: stop the chain here


@shared_task(bind=True, name=queues.TASK_PARTITION)
def partition(self, document_id: int) -> bool:
    return _run(self, stage="partition", document_id=document_id)


@shared_task(bind=True, name=queues.TASK_CLEAN)
def clean(self, document_id: int) -> bool:
    return _run(self, stage="clean", document_id=document_id)


@shared_task(bind=True, name=queues.TASK_CHUNK)
def chunk(self, document_id: int) -> bool:
    return _run(self, stage="chunk", document_id=document_id)


@shared_task(bind=True, name=queues.TASK_EMBED)
def embed(self, document_id: int) -> bool:
    return _run(self, stage="embed", document_id=document_id)


@shared_task(bind=True, name=queues.TASK_INDEX)
def index(self, document_id: int) -> bool:
    return _run(self, stage="index", document_id=document_id)


@shared_task(bind=True, name=queues.TASK_INDEX_DELETE)
def index_delete(self) -> int:
    """Drain retired vectors from the index (after a delete or reprocess)."""
    try:
        return pipeline.index_deletions_run()
    except TRANSIENT_ERRORS as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries), max_retries=MAX_RETRIES)


STEPS = (partition, clean, chunk, embed, index)
STAGE_OF_STATUS = {
    Status.QUEUED: 0, Status.PARTITIONING: 0, Status.CLEANING: 1, Status.CHUNKING: 2, Status.EMBEDDING: 3, Status.INDEXING: 4,
}


def pipeline_signature(*, document_id: int, status: str = Status.QUEUED) -> Signature:
    """The stage chain for one document from the stage its status names, each step on its queue."""
    steps = STEPS[STAGE_OF_STATUS[status]:]
    return chain(
        *(t.si(document_id).set(queue=queues.TASK_QUEUES[t.name], retry=True, retry_policy=HANDOFF_RETRY) for t in steps)
    )


def documents_resume_stalled(*, older_than_s: float) -> list[int]:
    """Queue again the rest of the chain of documents stuck mid-pipeline (e.g. a broker outage lost a hand-off).

    Safe to over-send: every stage is a no-op when it is not its turn.
    """
    since = timezone.now() - dt.timedelta(seconds=older_than_s)
    stalled = list(Document.objects.filter(status__in=IN_PROGRESS, updated_at__lt=since).values_list("pk", "status"))
    for document_id, status in stalled:
        pipeline_signature(document_id=document_id, status=status).apply_async()
    return [pk for pk, _ in stalled]


@shared_task(name=queues.TASK_RESUME_STALLED)
def resume_stalled(older_than_s: float = STALLED_AFTER_S) -> list[int]:
    """Periodic housekeeping (beat): resume documents whose pipeline stopped moving."""
    return documents_resume_stalled(older_than_s=older_than_s)
