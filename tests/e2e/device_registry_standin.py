"""A stand-in for a device registry (Snap4city's IoT Directory, which keeps each device's K1/K2
with its owner): the contract of filters/token-auth/README.md, "Device keys from a registry".
GET <path>?id=<device id> answers 200 {"id", "key_sha256": [SHA-256 hex of each key], "owner"}
for a registered device and 404 for any other; while `down`, 503. It records every id it was
asked, so a test can see the filters' cache at work, and keys can be revoked while it runs; told
a delay, it answers that late (a slow registry, while concurrent CONNECTs wait)."""

import hashlib
import json
import threading
import time
import urllib.parse

from standin_server import QuietHandler, StandinServer


def sha256_hex(key):
    return hashlib.sha256(key.encode()).hexdigest()


class DeviceRegistry(StandinServer):
    """`devices`: device id → (owner, [keys]). Only digests leave the stand-in."""

    def __init__(self, devices, path="/api/device-keys", check_token=None, tls=None):
        """`check_token(token) -> bool`: every lookup must carry `Authorization: Bearer` with a
        token it accepts (else 401), as a registry that authenticates its callers does.
        `tls`: {"cert", "key", "client_ca"}: it speaks only TLS, only to clients with a
        certificate `client_ca` signed (mTLS); `callers` records each lookup's client CN."""
        self.path = path
        self.tls = tls
        self.callers = []
        self.check_token = check_token
        self.tokens = []
        self.devices = {d: (owner, list(keys)) for d, (owner, keys) in devices.items()}
        self.down = False
        self.delay_s = 0.0
        self.asked = []
        self._lock = threading.Lock()

    def start(self):
        standin = self

        class Handler(QuietHandler):
            def do_GET(self):
                path, _, query = self.path.partition("?")
                params = urllib.parse.parse_qs(query, keep_blank_values=True)
                device = (params.get("id") or [None])[0]
                token = self.bearer_token()
                with standin._lock:
                    standin.tokens.append(token)
                    standin.callers.append(self.peer_cn())
                if standin.check_token and not (token and standin.check_token(token)):
                    self.send_response(401)
                    self.send_header("www-authenticate", 'Bearer error="invalid_token"')
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with standin._lock:
                    standin.asked.append(device)
                    entry = standin.devices.get(device)
                    down = standin.down
                    delay = standin.delay_s
                if delay:
                    time.sleep(delay)
                if down:
                    status, body = 503, b""
                elif path != standin.path or entry is None:
                    status, body = 404, b'{"error": "no such device"}'
                else:
                    owner, keys = entry
                    status, body = 200, json.dumps({
                        "id": device, "owner": owner,
                        "key_sha256": [sha256_hex(k) for k in keys]}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return self.serve(Handler)

    def set_keys(self, device, keys):
        """Registers `device`'s keys (an empty list revokes them all)."""
        with self._lock:
            owner = self.devices.get(device, ("alice", []))[0]
            self.devices[device] = (owner, list(keys))

    def set_delay(self, seconds):
        """Every answer comes this many seconds late."""
        with self._lock:
            self.delay_s = seconds

    def set_down(self, down):
        with self._lock:
            self.down = down

    def asks(self, device):
        """How many times `device` was looked up."""
        with self._lock:
            return self.asked.count(device)
