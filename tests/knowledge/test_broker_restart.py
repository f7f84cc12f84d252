"""Work queued in Redis survives a Redis restart (AOF on): a separate redis-server of our own, never the shared one."""
from __future__ import annotations

import shutil
import socket
import subprocess

import datetime as dt

import pytest
import redis
from django.utils import timezone

from knowledge.documents import services
from knowledge.documents.models import Document, Status
from knowledge.documents.tasks import documents_resume_stalled
from knowledge.documents.workers import workers_up

from conftest import Worker, celery_broker, data_settings, wait_for

pytestmark = pytest.mark.slow
PORT = 6390


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class RedisServer:
    def __init__(self, *, folder, port: int):
        self.folder, self.port, self.proc = folder, port, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port)
        wait_for(lambda: self._ping(client), timeout=20, what=f"redis on {self.port}")

    @staticmethod
    def _ping(client) -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    def restart(self) -> None:
        """A clean restart, as a service manager does it: SIGTERM (AOF flushed), then start on the same folder."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (Debian package redis-server)")
    assert _free(PORT), f"port {PORT} is taken; this test starts its own redis-server there"
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder=folder, port=PORT)
    server.start()
    yield server
    server.stop()


def test_documents_queued_before_a_redis_restart_are_indexed_after_it(
    own_redis, transactional_db, settings, make_user, tmp_path, write_report
):
    url = f"redis://127.0.0.1:{PORT}/0"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_settings(settings, data_dir)
    owner = make_user("ann")
    with celery_broker(url):
        ids = [services.document_accept(uploader=owner, path=write_report(f"q{i}.md", seed=300 + i), filename=f"q{i}.md").document.pk
               for i in range(3)]
    client = redis.Redis(port=PORT)
    assert client.llen("ingest") == 3  # waiting in the broker: no worker consumes yet
    own_redis.restart()
    assert redis.Redis(port=PORT).llen("ingest") == 3

    worker = Worker(data_dir=data_dir, broker_url=url).start()
    try:
        wait_for(lambda: not Document.objects.filter(pk__in=ids).exclude(status=Status.INDEXED).exists(), timeout=240,
                 what="the queued documents", worker=worker)
        assert all(d.chunks.exists() for d in Document.objects.filter(pk__in=ids))

        # Now restart Redis while the worker is in the middle of a document.
        with celery_broker(url):
            more = [services.document_accept(uploader=owner, path=write_report(f"m{i}.md", seed=400 + i, paragraphs=30),
                                             filename=f"m{i}.md").document.pk for i in range(2)]
        wait_for(lambda: Document.objects.filter(pk=more[0], status__in=(Status.CHUNKING, Status.EMBEDDING)).exists(),
                 timeout=120, interval=0.1, what="the worker to be busy", worker=worker)
        own_redis.restart()
        wait_for(lambda: not Document.objects.filter(pk__in=more).exclude(status=Status.INDEXED).exists(), timeout=240,
                 what="the documents in flight during the restart", worker=worker)
        assert worker.alive()

        # A document whose hand-off was lost (queued in the DB, nothing in the broker) is picked up again.
        path = write_report("lost.md", seed=500)
        lost = services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False).document
        Document.objects.filter(pk=lost.pk).update(updated_at=timezone.now() - dt.timedelta(hours=3))
        with celery_broker(url):
            assert lost.pk in documents_resume_stalled(older_than_s=3600)
        wait_for(lambda: Document.objects.get(pk=lost.pk).status == Status.INDEXED, timeout=120,
                 what="the resumed document", worker=worker)
        assert workers_up()
    finally:
        worker.stop()
    assert not workers_up()  # a worker that shut down removes its heartbeat
