"""Portal fixtures: users in desks (groups) and documents written straight to the real database."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User



@pytest.fixture
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "uploads"
    settings.MEDIA_ROOT.mkdir()
    return settings.MEDIA_ROOT


@pytest.fixture
def users(db):
    desk = Group.objects.create(name="Equities desk")
    alice = User.objects.create_user("alice", "alice@example.com", "pw-alice-123")
    bob = User.objects.create_user("bob", "bob@example.com", "pw-bob-123")
    carol = User.objects.create_user("carol", "carol@example.com", "pw-carol-123")
    alice.groups.add(desk)
    carol.groups.add(desk)
    return {"alice": alice, "bob": bob, "carol": carol, "desk": desk}


@pytest.fixture
def client_for(client):
    def login(user):
        client.force_login(user)
        return client

    return login
