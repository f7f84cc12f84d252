"""The embedded default end to end: no REDIS_URL, no DATABASE_URL; a real worker on the SQLite broker ingests a filing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILING = ROOT.parent / "shared" / "corpus" / "financial" / "COSTCO_2023Q3_EARNINGS.pdf"


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL",
                                                             "CELERY_RESULT_BACKEND", "DJANGO_SETTINGS_MODULE"}}
    env.update(KD_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="knowledge.settings", PYTHONPATH=str(ROOT))
    return env


def manage(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_worker_on_the_sqlite_broker_ingests_a_filing(tmp_path):
    env = embedded_env(tmp_path / "var")
    assert manage("migrate", "--noinput", env=env).returncode == 0
    assert "one-time password" in manage("kd_first_admin", env=env).stdout
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "knowledge", "worker", "-Q", "ingest,embed,index,generate",
             "--concurrency", "1", "-n", "embedded-test@%h", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "ready." not in log_path.read_text():
            assert worker.poll() is None, f"worker died on the embedded broker:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "worker not ready after 120 s"
            time.sleep(0.5)
        time.sleep(6)  # one heartbeat, so `ingest` sees the worker and sends the work through the broker
        out = manage("ingest", str(FILING), env=env)
        assert out.returncode == 0, out.stderr
        assert "1 indexed, 0 duplicate, 0 failed" in out.stdout, out.stdout + out.stderr
        worker_log = log_path.read_text()
        assert "sqla+sqlite" in worker_log  # the server-less broker, not Redis
        for task in ("documents.partition", "documents.embed", "documents.index"):
            assert f"Task {task}[" in worker_log and "succeeded" in worker_log, f"{task} did not run in the worker"
        found = manage("search", "Costco net sales", "--k", "3", env=env)
        assert found.returncode == 0 and "COSTCO_2023Q3_EARNINGS.pdf" in found.stdout
    finally:
        worker.terminate()  # SIGTERM to the main process only: a warm shutdown that stops its own pool
        try:
            worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
        assert worker.returncode == 0, f"worker did not shut down cleanly:\n{log_path.read_text()[-2000:]}"
