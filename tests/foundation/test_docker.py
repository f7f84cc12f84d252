"""docker/ is checked statically (no Docker engine here): every service's command must exist in the project."""
import re
from pathlib import Path

import pytest
import yaml
from django.core.management import get_commands

from knowledge.queues import ALL_QUEUES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
KD = (ROOT / "kd").read_text()


def kd_subcommands() -> set[str]:
    body = KD.split('case "$cmd" in', 1)[1]
    return {part for group in re.findall(r"^\s{2}([a-z|]+)\)", body, flags=re.M) for part in group.split("|")}


APP_SERVICES = {name: svc for name, svc in COMPOSE["services"].items() if "build" in svc}


def test_compose_has_the_required_services():
    assert {"postgres", "redis", "web", "worker", "indexer", "beat"} <= set(COMPOSE["services"])
    assert {"web", "worker", "indexer", "beat"} <= set(APP_SERVICES)


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_every_app_service_command_exists(name):
    command = APP_SERVICES[name]["command"]
    sub = command[0]
    assert sub in kd_subcommands(), f"{name}: ./kd has no '{sub}' subcommand"
    if sub == "manage":
        assert command[1] in get_commands(), f"{name}: manage.py has no '{command[1]}' command"
    if sub == "worker":
        queues = command[1].split(",")
        assert set(queues) <= set(ALL_QUEUES), f"{name}: unknown queue in {queues}"


def test_indexer_is_the_single_writer():
    command = APP_SERVICES["indexer"]["command"]
    assert command[1] == "index"
    assert command[command.index("--concurrency") + 1] == "1"
    others = [svc["command"] for n, svc in APP_SERVICES.items() if n != "indexer" and svc["command"][0] == "worker"]
    assert all("index" not in c[1].split(",") for c in others)


def test_every_queue_is_consumed_somewhere():
    consumed = {q for svc in APP_SERVICES.values() if svc["command"][0] == "worker" for q in svc["command"][1].split(",")}
    assert consumed == set(ALL_QUEUES)


def test_image_installs_what_kd_installs():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    apt = re.search(r'APT_PACKAGES="([^"]+)"', KD).group(1).split()
    for package in apt:
        if package == "chromium":  # browser tests only, not in the runtime image
            continue
        assert package in dockerfile, f"Dockerfile misses {package}"
    assert "./kd install" in dockerfile
    assert re.search(r'ENTRYPOINT \["\./kd"\]', dockerfile)
