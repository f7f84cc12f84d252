"""Session or token authentication for JSON endpoints.

A request with ``Authorization: Bearer kd_...`` is authenticated by its hashed token and its
cookies are ignored: a cross-site page cannot set that header, so CSRF does not apply. Every other
request must carry a session, and unsafe methods then pass Django's own CSRF check, run here
explicitly because the decorated view is excluded from the middleware's automatic check.
"""
from __future__ import annotations

import functools

from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.models import AnonymousUser
from django.http import JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from knowledge.portal.services import token_authenticate


def _csrf_failure(request) -> JsonResponse | None:
    checker = CsrfViewMiddleware(lambda r: None)
    checker.process_request(request)
    rejected = checker.process_view(request, None, (), {})  # callback None: never treated as exempt
    if rejected is not None:
        return JsonResponse({"error": "CSRF check failed: send the csrftoken cookie's value in X-CSRFToken."}, status=403)
    return None


def _bearer_sign_in(request) -> bool | JsonResponse:
    """Sign the request in by its `Authorization: Bearer` token: True when it did, False when there is no such
    header, a 401 JSON response when the token is unknown or revoked."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if not header.startswith("Bearer "):
        return False
    user = token_authenticate(key=header[7:].strip())
    if user is None:
        return JsonResponse({"error": "Invalid or revoked API token."}, status=401)
    request.user = user
    request.auth_via = "token"
    return True


def api_view(view):
    """Authenticate by bearer token or by session (+CSRF); answer 401 JSON otherwise."""

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        by_token = _bearer_sign_in(request)
        if isinstance(by_token, JsonResponse):
            return by_token
        if not by_token:
            if not request.user.is_authenticated:
                request.user = AnonymousUser()
                return JsonResponse({"error": "Authentication required (session or Bearer token)."}, status=401)
            if request.method not in ("GET", "HEAD", "OPTIONS", "TRACE"):
                failure = _csrf_failure(request)
                if failure is not None:
                    return failure
            request.auth_via = "session"
        return view(request, *args, **kwargs)

    return login_not_required(csrf_exempt(wrapper))


def token_or_session(view):
    """For GET file views (download, page image): a Bearer token, or else the usual session sign-in.

    Without the header the request is handled as any page: anonymous users are sent to sign in.
    """

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        by_token = _bearer_sign_in(request)
        if isinstance(by_token, JsonResponse):
            return by_token
        if not by_token and not request.user.is_authenticated:
            from django.contrib.auth.views import redirect_to_login

            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    return login_not_required(wrapper)
