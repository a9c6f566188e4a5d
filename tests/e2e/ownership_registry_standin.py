"""A stand-in for an ownership registry (the contract of filters/device-ownership/README.md,
"Registry contract"): POST /ownership/lookup {"entity_id", "service"} answers 200 {"owner"} for
a known entity and 404 for any other; POST /ownership/claim records the caller as the owner
(409 when someone else owns it).

It can insist on how the filter authenticates, as a real registry would:
* `tls`: {"cert", "key", "client_ca"}: it only speaks TLS and only to a client whose
  certificate `client_ca` signed (mTLS); it records each caller's certificate CN;
* `check_token(token) -> bool`: every call must carry `Authorization: Bearer <token>` that it
  accepts (else 401 with `WWW-Authenticate: Bearer`).
It records every call (path, the entity asked, the client certificate's CN, the token)."""

import json
import threading

from standin_server import QuietHandler, StandinServer


class OwnershipRegistry(StandinServer):
    def __init__(self, owners=None, tls=None, check_token=None):
        self.owners = dict(owners or {})  # (service, entity_id) -> owner
        self.tls = tls
        self.check_token = check_token
        self.calls = []
        self._lock = threading.Lock()

    def start(self):
        standin = self

        class Handler(QuietHandler):
            def answer(self, status, body=None, headers=()):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                try:
                    request = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self.answer(400, {"error": "not JSON"})
                cn, token = self.peer_cn(), self.bearer_token()
                key = (request.get("service", ""), request.get("entity_id"))
                with standin._lock:
                    standin.calls.append({"path": self.path, "entity": key[1], "cn": cn,
                                          "token": token})
                if standin.check_token and not (token and standin.check_token(token)):
                    return self.answer(401, {"error": "invalid_token"},
                                       [("www-authenticate", 'Bearer error="invalid_token"')])
                with standin._lock:
                    if self.path == "/ownership/lookup":
                        owner = standin.owners.get(key)
                        return self.answer(200, {"owner": owner}) if owner else self.answer(404)
                    if self.path == "/ownership/claim":
                        owner = standin.owners.setdefault(key, request.get("owner"))
                        return self.answer(201 if owner == request.get("owner") else 409, {})
                return self.answer(404)

        return self.serve(Handler)

    def calls_for(self, entity):
        with self._lock:
            return [c for c in self.calls if c["entity"] == entity]
