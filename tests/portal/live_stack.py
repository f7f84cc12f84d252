"""A live Knowledge Desk for browser tests: fresh SQLite data folder, gunicorn, one Celery worker on real Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 14  # this suite's own Redis database number, flushed before and after


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveStack:
    """Start with start(), stop with stop(); `url` is the web address, `env` the processes' environment."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "KD_", "DATABASE_URL", "PYTEST"))}
        self.env.update({"KD_DATA_DIR": str(data_dir), "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
                         "DJANGO_SETTINGS_MODULE": "knowledge.settings", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
                         "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                         "KD_EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"})

    def manage(self, *args: str, input: str | None = None) -> str:
        out = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, input=input,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.data_dir / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        import redis

        redis.Redis(db=REDIS_DB).flushdb()
        self.manage("migrate", "--noinput")
        self._spawn("worker", "-m", "celery", "-A", "knowledge", "worker", "-Q", "ingest,embed,index,generate",
                    "--pool", "solo", "-n", f"portal-e2e-{self.port}@%h", "--loglevel", "INFO")
        self._spawn("web", "-m", "gunicorn", "knowledge.wsgi:application", "--bind", f"127.0.0.1:{self.port}",
                    "--worker-class", "gthread", "--workers", "1", "--threads", "8", "--timeout", "300")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/accounts/login/", timeout=5)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("web server did not start:\n" + self.log("web"))

    def log(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        import redis

        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        redis.Redis(db=REDIS_DB).flushdb()
