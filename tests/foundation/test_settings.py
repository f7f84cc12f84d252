"""The embedded defaults: SQLite and a server-less broker under the data folder."""
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_defaults_use_sqlite_and_sqlalchemy_broker(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "KD_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='knowledge.settings'; django.setup();"
        "from django.conf import settings as s;"
        "print(s.DATABASES['default']['ENGINE']); print(s.CELERY_BROKER_URL); print(s.MEDIA_ROOT)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    engine, broker, media = out.stdout.split()
    assert engine == "django.db.backends.sqlite3"
    assert broker == f"sqla+sqlite:///{tmp_path}/broker.sqlite3"
    assert media == str(tmp_path / "uploads")


def test_env_switches_to_redis_and_postgres(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "KD_DATA_DIR": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:6379/5",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    }
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='knowledge.settings'; django.setup();"
        "from django.conf import settings as s;"
        "print(s.DATABASES['default']['ENGINE']); print(s.CELERY_BROKER_URL)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    engine, broker = out.stdout.split()
    assert engine == "django.db.backends.postgresql"
    assert broker == "redis://127.0.0.1:6379/5"


@pytest.mark.django_db
def test_system_checks_pass():
    call_command("check", fail_level="WARNING")
    assert settings.ROOT_URLCONF == "knowledge.urls"
