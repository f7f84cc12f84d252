"""Are workers up? Each worker writes a heartbeat row every few seconds while it runs.

Each worker process also warms up once at start (``pipeline.worker_warm_up``: the embedder and the
partitioners' first-use imports), in a background thread so the pool's start-up timeout is not at risk;
``KD_WORKER_WARM_UP=0`` turns it off.

Connected to Celery's worker_ready / worker_shutdown signals (this module is imported by
tasks.py, which every worker loads). ``workers_up`` is what ``manage.py ingest`` asks before
choosing between the workers and an in-process run. Works with any broker, since it uses the DB.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown
from django.db import close_old_connections, connection
from django.utils import timezone

from knowledge.queues import QUEUE_EMBED, QUEUE_INDEX, QUEUE_INGEST

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5
STALE_AFTER_SECONDS = 20
PIPELINE_QUEUES = (QUEUE_INGEST, QUEUE_EMBED, QUEUE_INDEX)


def heartbeat_write(*, hostname: str, queues: list[str]) -> None:
    from knowledge.documents.models import WorkerHeartbeat

    WorkerHeartbeat.objects.update_or_create(
        hostname=hostname, defaults={"queues": queues, "pid": os.getpid(), "last_seen": timezone.now()}
    )


def heartbeat_remove(*, hostname: str) -> None:
    from knowledge.documents.models import WorkerHeartbeat

    WorkerHeartbeat.objects.filter(hostname=hostname).delete()


def workers_up(*, queues: tuple[str, ...] = PIPELINE_QUEUES) -> bool:
    """True when live workers (fresh heartbeats) together consume every one of ``queues``."""
    from knowledge.documents.models import WorkerHeartbeat

    since = timezone.now() - dt.timedelta(seconds=STALE_AFTER_SECONDS)
    covered: set[str] = set()
    for names in WorkerHeartbeat.objects.filter(last_seen__gte=since).values_list("queues", flat=True):
        covered.update(names or [])
    return set(queues) <= covered


class _Heartbeat:
    """The thread writing one worker's heartbeat."""

    def __init__(self, *, hostname: str, queues: list[str]):
        self.hostname, self.queues = hostname, queues
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kd-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                close_old_connections()
                heartbeat_write(hostname=self.hostname, queues=self.queues)
            except Exception:  # noqa: BLE001 - a missed beat must not kill the worker
                log.warning("heartbeat write failed", exc_info=True)
            finally:
                connection.close()
            self.stop.wait(HEARTBEAT_SECONDS)


_beats: dict[str, _Heartbeat] = {}


@worker_ready.connect
def _on_worker_ready(sender=None, **_kwargs) -> None:
    hostname = getattr(sender, "hostname", None) or f"worker@{os.getpid()}"
    try:
        queues = sorted(q.name for q in sender.task_consumer.queues)
    except AttributeError:
        queues = list(PIPELINE_QUEUES)
    beat = _Heartbeat(hostname=hostname, queues=queues)
    _beats[hostname] = beat
    beat.thread.start()


@worker_shutdown.connect
def _on_worker_shutdown(sender=None, **_kwargs) -> None:
    for hostname, beat in list(_beats.items()):
        beat.stop.set()
        try:
            heartbeat_remove(hostname=hostname)
        except Exception:  # noqa: BLE001
            log.warning("could not remove heartbeat of %s", hostname, exc_info=True)
        _beats.pop(hostname, None)


WARM_UP_WAIT_S = 300.0
_warming: dict[str, threading.Event] = {}  # "done" is set once this process's warm-up has ended


def _warm_up(done: threading.Event) -> None:
    from knowledge.documents.pipeline import worker_warm_up

    try:
        seconds = worker_warm_up()
        log.info("worker process %s warmed up: %s", os.getpid(), {k: round(v, 2) for k, v in seconds.items()})
    except Exception:  # noqa: BLE001 - a failed warm-up only means the first document pays for it
        log.warning("worker warm-up failed", exc_info=True)
    finally:
        connection.close()
        done.set()


def warm_up_wait() -> None:
    """Called by every task first: wait for this process's start-up warm-up, so a first task never imports the
    same modules concurrently with it (it would have paid for them anyway). No-op outside warmed workers."""
    done = _warming.get("done")
    if done is not None and not done.is_set():
        done.wait(WARM_UP_WAIT_S)


@worker_process_init.connect
def _on_worker_process_init(**_kwargs) -> None:
    from django.conf import settings

    if getattr(settings, "KD_WORKER_WARM_UP", True):
        done = _warming["done"] = threading.Event()
        threading.Thread(target=_warm_up, args=(done,), name="kd-warm-up", daemon=True).start()
