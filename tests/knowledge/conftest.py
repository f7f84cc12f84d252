"""Fixtures for the documents app: a file-backed test DB the workers share, real Celery workers on real Redis.

The worker subprocess must see the rows the test writes, so the SQLite test database is a file
(not pytest-django's in-memory default) and tests that involve workers use ``transactional_db``.
With DATABASE_URL pointing at PostgreSQL the worker simply gets the test database's name.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import kombu.pools
import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("KD_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PIPELINE_QUEUES = "ingest,embed,index"

_db = settings.DATABASES["default"]
if _db["ENGINE"].endswith("sqlite3"):
    # Set at collection time, before pytest-django creates the test DB: a file the workers can open.
    _db_dir = tempfile.mkdtemp(prefix="kd-test-db-")
    atexit.register(shutil.rmtree, _db_dir, ignore_errors=True)
    _db.setdefault("TEST", {})["NAME"] = str(Path(_db_dir) / "test.sqlite3")


def database_url() -> str:
    """The URL of the test database this process uses, for a worker subprocess."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def data_settings(settings_obj, data_dir: Path) -> None:
    settings_obj.DATA_DIR = data_dir
    settings_obj.MEDIA_ROOT = data_dir / "uploads"
    settings_obj.INDEX_DIR = data_dir / "index"


@contextmanager
def celery_broker(url: str) -> Iterator[None]:
    """Point this process's Celery app (the sender) at ``url`` for a while."""
    from knowledge.celery import app

    def reset() -> None:
        kombu.pools.reset()  # close and forget pooled connections and producers, keyed by the old URL
        app._pool = None
        app.amqp._producer_pool = None

    old = (app.conf.broker_url, app.conf.result_backend)
    reset()
    app.conf.broker_url, app.conf.result_backend = url, None
    try:
        yield
    finally:
        reset()
        app.conf.broker_url, app.conf.result_backend = old


class Worker:
    """A real `celery worker` subprocess with its own log, killable with SIGKILL."""

    def __init__(self, *, data_dir: Path, broker_url: str, queues: str = PIPELINE_QUEUES, env: dict | None = None):
        self.data_dir, self.broker_url, self.queues, self.extra_env = data_dir, broker_url, queues, env or {}
        self.name = f"kdtest-{uuid.uuid4().hex[:8]}@localhost"
        self.log = data_dir / f"worker-{self.name.split('@')[0]}.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=database_url(), REDIS_URL=self.broker_url, CELERY_BROKER_URL=self.broker_url,
            KD_DATA_DIR=str(self.data_dir), KD_VISIBILITY_TIMEOUT="8", DJANGO_SETTINGS_MODULE="knowledge.settings",
            DO_NOT_TRACK="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        )
        env.update(self.extra_env)
        return env

    def start(self, *, wait: bool = True) -> "Worker":
        cmd = [sys.executable, "-m", "celery", "-A", "knowledge", "worker", "-Q", self.queues, "-c", "1",
               "-n", self.name, "--without-gossip", "--without-mingle", "-l", "INFO"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        from knowledge.documents.models import WorkerHeartbeat

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if WorkerHeartbeat.objects.filter(hostname=self.name).exists():
                return
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and its pool children, as a crash or OOM kill would."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def redis_flush(url: str) -> None:
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def worker_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kd-data")


@pytest.fixture(scope="module")
def pipeline_worker(django_db_setup, django_db_blocker, worker_data_dir) -> Iterator[Worker]:
    """One real worker consuming ingest, embed and index from Redis, on the test DB; for a test module."""
    redis_flush(REDIS_URL)
    with django_db_blocker.unblock():
        worker = Worker(data_dir=worker_data_dir, broker_url=REDIS_URL).start()
    try:
        yield worker
    finally:
        worker.stop()
        redis_flush(REDIS_URL)


@pytest.fixture
def on_workers(pipeline_worker, worker_data_dir, settings, transactional_db) -> Iterator[Worker]:
    """This test sends tasks to the module's worker and shares its data folder."""
    from knowledge.documents.workers import HEARTBEAT_SECONDS, workers_up

    data_settings(settings, worker_data_dir)
    # The DB is emptied between tests; the worker's next heartbeat writes its row again.
    wait_for(workers_up, timeout=HEARTBEAT_SECONDS * 4, what="the worker's heartbeat", worker=pipeline_worker)
    with celery_broker(REDIS_URL):
        yield pipeline_worker


@pytest.fixture
def data_dir(tmp_path, settings) -> Path:
    """A fresh data folder (originals, work files, index) for an in-process test."""
    data_settings(settings, tmp_path)
    return tmp_path


@pytest.fixture
def make_user(db):
    def make(username: str, *, superuser: bool = False, groups: tuple = ()):
        User = get_user_model()
        user = User.objects.create_user(username=username, password="pw-123456-x", is_superuser=superuser, is_staff=superuser)
        for g in groups:
            user.groups.add(g)
        return user

    return make


def wait_for(predicate, *, timeout: float, interval: float = 0.25, what: str = "condition", worker: Worker | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{worker.tail()}" if worker else ""))


WORDS = ("revenue margin guidance segment cash flow dividend capital expenditure inventory backlog demand pricing "
         "headcount currency hedging litigation tax rate buyback outlook supply chain region subscription churn").split()


def report_text(*, seed: int, paragraphs: int = 6, title: str = "Quarterly report") -> str:
    """A generated markdown report; different seeds give different but similar-looking text."""
    import random

    rnd = random.Random(seed)
    parts = [f"# {title}", ""]
    for p in range(paragraphs):
        if p % 3 == 0:
            parts += [f"## Section {p // 3 + 1}: {rnd.choice(WORDS).title()}", ""]
        sentence = " ".join(rnd.choice(WORDS) for _ in range(40))
        parts += [f"Paragraph {p} of report {seed}: {sentence}.", ""]
    return "\n".join(parts)


@pytest.fixture(name="report_text")
def report_text_fixture():
    return report_text


@pytest.fixture
def write_report(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)

    def write(name: str, text: str | None = None, *, seed: int = 0, paragraphs: int = 6) -> Path:
        path = folder / name
        path.write_text(text if text is not None else report_text(seed=seed, paragraphs=paragraphs), encoding="utf-8")
        return path

    return write
