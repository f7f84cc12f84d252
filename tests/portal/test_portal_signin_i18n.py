"""Sign-in, deny-by-default, CSRF on forms, language switching, first admin."""
from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.test import Client


@pytest.mark.django_db
def test_pages_require_sign_in():
    c = Client()
    for url in ("/", "/upload/", "/documents/", "/reports/", "/conversations/"):
        resp = c.get(url)
        assert resp.status_code == 302 and resp["Location"].startswith("/accounts/login/"), url


def test_sign_in_with_csrf(users):
    c = Client(enforce_csrf_checks=True)
    page = c.get("/accounts/login/")
    assert page.status_code == 200 and b"csrfmiddlewaretoken" in page.content
    forged = c.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"})
    assert forged.status_code == 403  # no token
    token = c.cookies["csrftoken"].value
    ok = c.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123", "csrfmiddlewaretoken": token})
    assert ok.status_code == 302 and ok["Location"] == "/"
    home = c.get("/")
    assert home.status_code == 200 and b"alice" in home.content
    bad = Client().post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert b"didn&#x27;t match" in bad.content or b"didn't match" in bad.content


def test_language_switch_to_simplified_chinese(users, client):
    client.force_login(users["alice"])
    assert "提问" not in client.get("/").content.decode()
    resp = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/upload/"})
    assert resp.status_code == 302 and resp["Location"] == "/upload/"
    page = client.get("/upload/").content.decode()
    assert "上传文档" in page and "提问" in page and 'lang="zh-hans"' in page
    client.post("/i18n/setlang/", {"language": "en", "next": "/"})
    assert "Upload documents" in client.get("/upload/").content.decode()


@pytest.mark.django_db
def test_first_admin_is_created_once():
    out = io.StringIO()
    call_command("kd_first_admin", stdout=out)
    password = out.getvalue().split("one-time password: ")[1].split()[0]
    c = Client()
    assert c.login(username="admin", password=password)
    again = io.StringIO()
    call_command("kd_first_admin", stdout=again)
    assert "existing admin" in again.getvalue()
