"""A stand-in for the web app that answers Mosquitto's auth plugin (the LAMPI Django app): the
HTTP backend protocol of mosquitto-go-auth and mosquitto-auth-plug. POST /auth (username,
password, clientid), /superuser (username), /acl (username, clientid, topic, acc); JSON or
form bodies; 200 allows, 403 denies. It records every request it was asked, so a test can
see what the filter sent and how often (the cache); told a delay, it answers that late (a slow
web app, while other CONNECTs arrive); told an `acl_failure` (a status such as 503, or "reset"),
it answers /acl with that status, or resets the connection without an answer (a web app that
fails on topic checks only)."""

import json
import socket
import struct
import threading
import time
import urllib.parse

from standin_server import QuietHandler, StandinServer


class WebappAuth(StandinServer):
    """`sessions`: session token (the MQTT user name) → the user it belongs to; `devices`:
    device ids that may connect with a blank password (their certificate authenticated them);
    `grants`: user or device → topic prefixes it may use (publish and subscribe)."""

    def __init__(self, sessions, devices, grants):
        self.sessions = dict(sessions)
        self.devices = set(devices)
        self.grants = {k: list(v) for k, v in grants.items()}
        self.asked = []
        self.delay_s = 0.0
        self.acl_failure = None
        self._lock = threading.Lock()

    def start(self):
        standin = self

        class Handler(QuietHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length).decode()
                if self.headers.get("content-type", "").startswith("application/json"):
                    params = json.loads(raw)
                else:
                    params = {k: v[0] for k, v in urllib.parse.parse_qs(
                        raw, keep_blank_values=True).items()}
                with standin._lock:
                    standin.asked.append((self.path, params))
                    delay = standin.delay_s
                    failure = standin.acl_failure if self.path == "/acl" else None
                if delay:
                    time.sleep(delay)
                if failure == "reset":
                    # RST at once, no answer: SO_LINGER 0 makes the close a reset.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if failure is not None:
                    self.send_response(failure)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                allowed = standin.decide(self.path, params)
                self.send_response(200 if allowed else 403)
                self.send_header("content-length", "0")
                self.end_headers()

        return self.serve(Handler)

    def who(self, username):
        return self.sessions.get(username) or (username if username in self.devices else None)

    def decide(self, path, params):
        user = self.who(params.get("username", ""))
        if path == "/auth":
            if params.get("username") in self.devices:
                return params.get("password") == ""
            return user is not None and params.get("password") == ""
        if path == "/acl":
            topic = params.get("topic", "")
            return user is not None and any(topic.startswith(p) for p in self.grants.get(user, ()))
        return False

    def requests(self, path=None):
        with self._lock:
            return [(p, dict(q)) for p, q in self.asked if path is None or p == path]
