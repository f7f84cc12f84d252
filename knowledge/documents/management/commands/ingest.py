"""manage.py ingest PATH... : add files (or folders, recursively) and wait until each is indexed or failed."""
from __future__ import annotations

import time
from pathlib import Path

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from knowledge.documents import services
from knowledge.documents.models import IN_PROGRESS, Document, Status, Visibility
from knowledge.documents.runner import pipeline_run_inline
from knowledge.documents.workers import workers_up

POLL_SECONDS = 0.5


def files_under(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Every file named or inside a named folder (sorted, hidden ones skipped) and the paths that are not there."""
    found: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        else:
            missing.append(raw)
    return found, missing


class Command(BaseCommand):
    help = "Ingest files or folders: one line per file (indexed / duplicate / failed) and a summary."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+")
        parser.add_argument("--as", dest="username", help="owner (default: the first superuser)")
        parser.add_argument("--visibility", default=Visibility.FIRM, choices=Visibility.values)
        parser.add_argument("--group", help="group name, for --visibility group")
        parser.add_argument("--inline", action="store_true", help="run the pipeline here even when workers are up")
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the workers per file")

    def _owner(self, username: str | None):
        User = get_user_model()
        if username:
            user = User.objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"No user named {username!r}.")
            return user
        user = User.objects.filter(is_superuser=True).order_by("pk").first()
        if user is None:
            raise CommandError("No user to own the documents: pass --as USER or create an admin (manage.py kd_first_admin).")
        return user

    def handle(self, *args, **opts):
        owner = self._owner(opts["username"])
        group = None
        if opts["group"]:
            group = Group.objects.filter(name=opts["group"]).first()
            if group is None:
                raise CommandError(f"No group named {opts['group']!r}.")
        files, missing = files_under(opts["paths"])
        for raw in missing:
            self.stdout.write(f"{raw}: failed: no such file or folder")
        inline = opts["inline"] or not workers_up()
        self.stderr.write("running the pipeline in this process (no workers up)" if inline else "sending to the workers")
        counts = {"indexed": 0, "duplicate": 0, "failed": len(missing)}
        with tqdm(total=len(files), unit="file", file=self.stderr, disable=None) as bar:
            for path in files:
                outcome, line = self._one(path=path, owner=owner, group=group, visibility=opts["visibility"],
                                          inline=inline, timeout=opts["timeout"], bar=bar)
                counts[outcome] += 1
                with tqdm.external_write_mode(file=self.stderr):
                    self.stdout.write(f"{path}: {line}")
                bar.update(1)
        self.stdout.write(f"{counts['indexed']} indexed, {counts['duplicate']} duplicate, {counts['failed']} failed")

    def _one(self, *, path: Path, owner, group, visibility: str, inline: bool, timeout: float, bar) -> tuple[str, str]:
        bar.set_postfix_str(path.name[:40])
        try:
            result = services.document_accept(
                uploader=owner, path=path, filename=path.name, visibility=visibility, group=group, enqueue=not inline
            )
        except services.DocumentError as exc:
            return "failed", f"failed: {exc}"
        if result.duplicate_of is not None:
            d = result.duplicate_of
            return "duplicate", f'duplicate of document {d.pk} "{d.title}"'
        document = result.document
        if inline:
            document = pipeline_run_inline(document_id=document.pk, on_stage=lambda s: bar.set_postfix_str(f"{path.name[:30]} {s}"))
        else:
            document = self._wait(document_id=document.pk, timeout=timeout, bar=bar, name=path.name)
        if document.status == Status.INDEXED:
            return "indexed", f"indexed as document {document.pk} ({document.chunks.count()} chunks, {document.page_count} pages)"
        if document.status == Status.FAILED:
            return "failed", f"failed: {document.status_reason}"
        return "failed", f"failed: still {document.status} after {timeout:.0f} s; it stays queued and the workers will finish it"

    def _wait(self, *, document_id: int, timeout: float, bar, name: str) -> Document:
        deadline = time.monotonic() + timeout
        while True:
            document = Document.objects.get(pk=document_id)
            bar.set_postfix_str(f"{name[:30]} {document.status} {document.progress}%")
            if document.status not in IN_PROGRESS or time.monotonic() > deadline:
                return document
            time.sleep(POLL_SECONDS)
