"""Create the first admin on a fresh install and print how to sign in."""
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create a first superuser 'admin' with a one-time password when no superuser exists."

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("kd: sign in with your existing admin account (or: ./kd manage changepassword admin)")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username="admin", email="admin@localhost", password=password)
        self.stdout.write(
            self.style.SUCCESS(
                f"kd: created the first admin. Sign in as 'admin' with the one-time password: {password}\n"
                "kd: change it after signing in (top right, 'Change password')."
            )
        )
