"""Google OAuth 2.0 access tokens: the sandbox's token endpoint and the registry the cluster APIs check.

On GCP a client holds a long-lived credential (a service-account key file, or an ``authorized_user``
refresh token) and trades it at the key's ``token_uri`` (``https://oauth2.googleapis.com/token``) for an
access token valid ``expires_in`` seconds (3,600 by default): for a key, google-auth posts a JWT
assertion signed with the key (RS256, ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``).
GKE's control plane accepts the access token as ``Authorization: Bearer ...`` until it expires, then
answers 401.

The sandbox does the same: :class:`OAuth` serves ``POST /token`` for the keys it made (checking the
assertion's signature, ``aud`` and expiry) and records each access token it issues, with its expiry,
in :class:`GoogleTokens`; every cluster's Kubernetes API asks the registry who a token belongs to. The
env file points ``GOOGLE_APPLICATION_CREDENTIALS`` at a service-account key whose ``token_uri`` is this
endpoint, so ``google.auth.default()`` (and so the product) refreshes tokens here exactly as on GCP.
(An ``authorized_user`` file would not do: google-auth ignores its ``token_uri``.) Lifetimes are
cloud seconds, scaled by the sandbox clock like every other delay (``Sandbox(token_lifetime_s=...)``).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, route

DEFAULT_LIFETIME_S = 3600.0  # Google's default access-token lifetime
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # google-auth's assertion audience, whatever token_uri


@dataclass
class Token:
    email: str
    expires_at: float  # time.time()
    endpoint: bool = True  # issued by the token endpoint (a client can fetch another)


class GoogleTokens:
    """Access tokens issued by the sandbox's Google identity, and who holds each one."""

    def __init__(self, *, clock: Clock | None = None, lifetime_s: float = DEFAULT_LIFETIME_S) -> None:
        self.clock = clock or Clock()
        self.lifetime_s = lifetime_s
        self._tokens: dict[str, Token] = {}
        self._lock = threading.Lock()
        self.issued = 0

    def issue(self, email: str, *, lifetime_s: float | None = None, scaled: bool = True,
              endpoint: bool = True) -> tuple[str, float]:
        """A new access token for ``email`` -> ``(token, expires_in real seconds)``. ``scaled=False``:
        ``lifetime_s`` is real seconds (the env file's gcloud token)."""
        life = self.lifetime_s if lifetime_s is None else lifetime_s
        real = self.clock.scaled(life) if scaled else life
        token = "ya29.sandbox-" + secrets.token_urlsafe(24)
        with self._lock:
            now = time.time()
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now - 60}
            self._tokens[token] = Token(email, now + real, endpoint)
            self.issued += 1
        return token, real

    def check(self, token: str) -> tuple[str | None, bool]:
        """``(email, expired)``; ``(None, False)`` for a token this identity never issued."""
        with self._lock:
            got = self._tokens.get(token)
        if got is None:
            return None, False
        return got.email, time.time() >= got.expires_at

    def revoke_all(self, *, endpoint_only: bool = False) -> None:
        """Every token issued so far stops working (as after a credential rotation); ``endpoint_only``:
        only those the token endpoint issued (a client can refresh), not the env file's gcloud token."""
        with self._lock:
            self._tokens = {k: v for k, v in self._tokens.items() if endpoint_only and not v.endpoint}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            return {"lifetime_s": self.lifetime_s, "issued": self.issued,
                    "live": sum(1 for t in self._tokens.values() if t.expires_at > now)}


class OAuth(Emulator):
    """``oauth2.googleapis.com``: trades signed assertions of the service-account keys it made for
    access tokens (fault service ``oauth``)."""

    def __init__(self, *, tokens: GoogleTokens, faults: Faults | None = None) -> None:
        self.tokens = tokens
        self.faults = faults  # type: ignore[assignment]
        self._handler = OAuthHandler
        self.keys: dict[str, tuple[str, Any]] = {}  # private_key_id -> (service account email, public key)

    def service_account_key(self, email: str, *, project: str) -> dict[str, Any]:
        """A new key for ``email``, as ``gcloud iam service-accounts keys create`` writes it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        self.keys[key_id] = (email, key.public_key())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": project, "private_key_id": key_id, "private_key": pem,
                "client_email": email, "client_id": str(secrets.randbelow(10**20)),
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": f"{self.url}/token"}

    def write_adc(self, path: Path, *, email: str, project: str) -> Path:
        """An Application Default Credentials file (a service-account key) for ``email``."""
        path.write_text(json.dumps(self.service_account_key(email, project=project), indent=2))
        path.chmod(0o600)
        return path

    def check_assertion(self, assertion: str) -> str:
        """The email a signed JWT assertion proves, or HttpError 400 ``invalid_grant`` as Google answers."""
        def bad(desc: str) -> HttpError:
            return HttpError(400, desc, body={"error": "invalid_grant", "error_description": desc})

        try:
            head_b64, body_b64, sig_b64 = assertion.split(".")
            head = json.loads(_unb64(head_b64))
            claims = json.loads(_unb64(body_b64))
            sig = _unb64(sig_b64)
        except ValueError:
            raise bad("Invalid JWT Signature.") from None
        email, public = self.keys.get(head.get("kid") or "", ("", None))
        if public is None or head.get("alg") != "RS256":
            raise bad("Invalid JWT Signature.")
        try:
            public.verify(sig, f"{head_b64}.{body_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise bad("Invalid JWT Signature.") from None
        if claims.get("iss") != email or claims.get("aud") not in (GOOGLE_TOKEN_URI, f"{self.url}/token"):
            raise bad("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                      "Check your iat and exp values in the JWT claim.")
        if not (float(claims.get("iat", 0)) - 300 <= time.time() <= float(claims.get("exp", 0)) + 300):
            raise bad("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                      "Check your iat and exp values in the JWT claim.")
        return email


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_ROUTES: list = []


class OAuthHandler(JsonHandler):
    service = "oauth"
    routes = _ROUTES

    def error_body(self, err: HttpError) -> Any:
        if isinstance(err.body, dict):
            return err.body
        return {"error": err.reason, "error_description": err.message}


@route(_ROUTES, "POST", r"/token")
def _token(h: OAuthHandler) -> Any:
    oauth: OAuth = h.server.state
    raw = h.body_bytes().decode()
    form = {k: v[-1] for k, v in parse_qs(raw).items()}
    if not form and raw.strip().startswith("{"):
        form = json.loads(raw)
    if form.get("grant_type") != JWT_BEARER:
        raise HttpError(400, "Invalid grant_type.", body={"error": "unsupported_grant_type",
                                                          "error_description": "Invalid grant_type."})
    email = oauth.check_assertion(form.get("assertion") or "")
    token, expires_in = oauth.tokens.issue(email)
    return {"access_token": token, "expires_in": max(1, round(expires_in)), "scope": SCOPE,
            "token_type": "Bearer"}
