"""A local fake of the few Stripe API endpoints the payments code calls (the stripe package
is pointed at it through STRIPE_API_BASE): customers, checkout sessions, payment intents and
the refunds list. It answers in Stripe's shapes, keeps what it was sent, honours
Idempotency-Key (a repeated key gets the first answer, as Stripe does) and can be told to
decline the next off-session charges. Webhook events are signed here the way Stripe signs
them (`stripe_signature`)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlparse


def stripe_signature(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """The Stripe-Signature header for `payload`: t=<unix>,v1=<hex HMAC-SHA256 of "t.payload">."""
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def form_params(body: str) -> dict[str, str]:
    """Stripe's form encoding flattened: {"metadata[account_id]": "7", ...}."""
    return dict(parse_qsl(body, keep_blank_values=True))


@dataclass
class FakeStripe:
    url: str = ""
    requests: list[tuple[str, str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    idempotent: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    refunds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by charge id
    declines: int = 0  # the next N payment intents are declined
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def calls(self, method: str, path: str) -> list[dict[str, str]]:
        return [params for m, p, params, _ in self.requests if m == method and p == path]

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_fake{self.counter:04d}"

    def answer(self, method: str, path: str, params: dict[str, str],
               headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append((method, path, params, headers))
            key = headers.get("idempotency-key")
            if method == "POST" and key and key in self.idempotent:
                return self.idempotent[key]
            status, body = self._route(method, path, params)
            if method == "POST" and key:
                self.idempotent[key] = (status, body)
            return status, body

    def _route(self, method: str, path: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        metadata = {k[len("metadata["):-1]: v for k, v in params.items()
                    if k.startswith("metadata[")}
        if (method, path) == ("POST", "/v1/customers"):
            return 200, {"id": self._next("cus"), "object": "customer", "metadata": metadata,
                         "email": params.get("email")}
        if (method, path) == ("POST", "/v1/checkout/sessions"):
            session_id = self._next("cs_test")
            amount = int(params["line_items[0][price_data][unit_amount]"]) * int(
                params.get("line_items[0][quantity]", "1"))
            return 200, {"id": session_id, "object": "checkout.session", "mode": params["mode"],
                         "url": f"https://checkout.stripe.test/c/pay/{session_id}",
                         "amount_total": amount, "currency": "usd", "metadata": metadata,
                         "customer": params.get("customer"), "payment_status": "unpaid",
                         "status": "open"}
        if (method, path) == ("POST", "/v1/payment_intents"):
            if self.declines > 0:
                self.declines -= 1
                return 402, {"error": {"type": "card_error", "code": "card_declined",
                                       "decline_code": "insufficient_funds",
                                       "message": "Your card has insufficient funds."}}
            intent_id = self._next("pi")
            intent = {"id": intent_id, "object": "payment_intent",
                      "amount": int(params["amount"]), "amount_received": int(params["amount"]),
                      "currency": params["currency"], "customer": params.get("customer"),
                      "payment_method": params.get("payment_method"), "status": "succeeded",
                      "latest_charge": f"ch_{intent_id}", "metadata": metadata}
            self.intents[intent_id] = intent
            return 200, intent
        if (method, path) == ("GET", "/v1/refunds"):
            data = self.refunds.get(params.get("charge", ""), [])
            return 200, {"object": "list", "data": data, "has_more": False, "url": "/v1/refunds"}
        return 404, {"error": {"type": "invalid_request_error", "message": f"no {method} {path}"}}


@contextmanager
def fake_stripe_server() -> Iterator[FakeStripe]:
    fake = FakeStripe()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self, method: str) -> None:
            parsed = urlparse(self.path)
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode() if length else parsed.query
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer = fake.answer(method, parsed.path, form_params(body), headers)
            raw = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.send_header("request-id", "req_fake")
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self) -> None:
            self._handle("POST")

        def do_GET(self) -> None:
            self._handle("GET")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
