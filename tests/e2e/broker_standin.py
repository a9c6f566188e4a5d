#!/usr/bin/env python3
"""A STAND-IN for a FIWARE Orion NGSI v2 broker, for the Envoy end-to-end tests and demos.

It is not Orion: no NGSI broker can be installed on the machines this project runs on, so this
small HTTP/1.1 server answers a few endpoints the way Orion does, and, above all, RECORDS every
request that reaches it (method, path, headers with repeats, body), so that tests can check
exactly what the filters in Envoy let through.

Broker port (what Envoy's `broker` cluster points at), answers shaped like Orion 3.x:

    GET  /version                    {"orion": {"version": ..., ...}}
    GET  /v2/entities[?type=T]       the entities stored so far (optionally of one type)
    POST /v2/entities                JSON entity with id and type: 201 + Location,
                                     422 if it exists, 400 on bad JSON
    GET  /v2/entities/<id>           the entity, or 404 NotFound
    anything else                    400 BadRequest (Orion's answer to unknown v2 paths)
    a body over 1 MiB                413 RequestEntityTooLarge, nothing stored (Orion's
                                     default -inReqPayloadMaxSize); the request is recorded

Control port (for tests; never put behind Envoy):

    GET  /health                     200 "ok"
    GET  /requests                   JSON list of the recorded requests, oldest first:
                                     {"method", "path", "headers": [[name, value], ...],
                                      "body": text (UTF-8, invalid bytes replaced), "body_b64",
                                      "complete": false while the body is still arriving
                                      (body null), true once it has been read}
    POST /reset                      forget recorded requests and stored entities

Usage: broker_standin.py [--host 127.0.0.1] [--port 0] [--control-port 0]
Port 0 picks a free port. When both listen, one JSON line is printed on stdout:
    {"ready": true, "port": P, "control_port": C}
Request bodies may be sent with Content-Length or chunked transfer encoding.
"""

import argparse
import base64
import json
import uuid
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 8 * 1024 * 1024
# Orion's -inReqPayloadMaxSize default: a larger request is recorded (it reached the broker)
# but refused with 413 and not stored, as Orion does.
ORION_MAX_PAYLOAD = 1024 * 1024


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.entities = {}

    def record(self, entry):
        with self.lock:
            self.requests.append(entry)

    def snapshot(self):
        with self.lock:
            return [dict(r) for r in self.requests]

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.entities.clear()


def read_body(handler):
    """The request body, from Content-Length or chunked encoding (None if malformed)."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        total = 0
        while True:
            line = handler.rfile.readline(1024)
            if not line:
                return None
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                # Trailers, up to the empty line.
                while line not in (b"\r\n", b"\n", b""):
                    line = handler.rfile.readline(8192)
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                return None
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline(8)  # CRLF after the chunk
    length = int(handler.headers.get("Content-Length") or 0)
    if length > MAX_BODY:
        return None
    return handler.rfile.read(length) if length else b""


def shaped(entity, query):
    """An entity as Orion answers it: only `attrs` if given, and in keyValues form with
    options=keyValues (the stored form is normalized, or whatever the client sent)."""
    attrs = query.get("attrs", [None])[0]
    wanted = set(attrs.split(",")) if attrs else None
    key_values = "keyValues" in query.get("options", [""])[0].split(",")
    out = {}
    for name, value in entity.items():
        if name in ("id", "type"):
            out[name] = value
        elif wanted is None or name in wanted:
            if key_values and isinstance(value, dict) and "value" in value:
                value = value["value"]
            out[name] = value
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "orion-standin/0.1"
    state = None  # set per server
    control = False

    def log_message(self, fmt, *args):
        sys.stderr.write("broker-standin: %s\n" % (fmt % args))

    def send_json(self, status, value, extra=()):
        body = b"" if value is None else json.dumps(value).encode()
        self.send_response(status)
        if value is not None:
            self.send_header("Content-Type", "application/json")
        for name, val in extra:
            self.send_header(name, val)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self):
        entry = None
        if not self.control:
            # Recorded as soon as the headers are in, so a test can see a request whose body
            # is still on its way ("complete": false until the body has been read).
            entry = {
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body": None,
                "body_b64": None,
                "complete": False,
            }
            self.state.record(entry)
        body = read_body(self)
        if body is None:
            self.close_connection = True
            self.send_json(400, {"error": "BadRequest", "description": "malformed body"})
            return
        if self.control:
            self.control_request()
            return
        with self.state.lock:
            entry["body"] = body.decode("utf-8", errors="replace")
            entry["body_b64"] = base64.b64encode(body).decode()
            entry["complete"] = True
        if len(body) > ORION_MAX_PAYLOAD:
            self.send_json(413, {"error": "RequestEntityTooLarge",
                                 "description": f"payload size: {len(body)}, max size "
                                                f"supported: {ORION_MAX_PAYLOAD}"})
            return
        self.orion(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

    def control_request(self):
        path = urlsplit(self.path).path
        if self.command == "GET" and path == "/health":
            self.send_json(200, "ok")
        elif self.command == "GET" and path == "/requests":
            self.send_json(200, self.state.snapshot())
        elif self.command == "POST" and path == "/reset":
            self.state.reset()
            self.send_json(204, None)
        else:
            self.send_json(404, {"error": "NotFound", "description": "control: " + path})

    def orion(self, body):
        url = urlsplit(self.path)
        path = url.path
        query = parse_qs(url.query)
        entities = self.state.entities
        if path == "/version" and self.command == "GET":
            self.send_json(
                200,
                {
                    "orion": {
                        "version": "3.10.1-standin",
                        "uptime": "0 d, 0 h, 0 m, 1 s",
                        "git_hash": "standin",
                        "compile_time": "n/a",
                        "compiled_by": "tests/e2e/broker_standin.py",
                        "compiled_in": "n/a",
                        "release_date": "n/a",
                        "doc": "https://fiware-orion.rtfd.io/",
                    }
                },
            )
        elif path == "/v2/entities" and self.command == "GET":
            wanted = query.get("type", [None])[0]
            with self.state.lock:
                found = [shaped(e, query) for e in entities.values()
                         if wanted in (None, e.get("type"))]
            extra = [("Fiware-Total-Count", str(len(found)))] \
                if "count" in query.get("options", [""])[0].split(",") else []
            self.send_json(200, found, extra)
        elif path == "/v2/entities" and self.command == "POST":
            try:
                entity = json.loads(body)
                ok = isinstance(entity, dict) and isinstance(entity.get("id"), str)
            except ValueError:
                ok = False
            if not ok:
                self.send_json(
                    400,
                    {"error": "ParseError", "description": "Errors found in incoming JSON buffer"},
                )
                return
            entity.setdefault("type", "Thing")
            with self.state.lock:
                exists = entity["id"] in entities
                if not exists:
                    entities[entity["id"]] = entity
            if exists:
                self.send_json(422, {"error": "Unprocessable", "description": "Already Exists"})
            else:
                location = "/v2/entities/%s?type=%s" % (entity["id"], entity["type"])
                self.send_json(201, None, [("Location", location)])
        elif path.startswith("/v2/entities/") and path.endswith("/attrs") \
                and self.command in ("PATCH", "POST"):
            # Update (PATCH) or append (POST) attributes of an existing entity.
            entity_id = path[len("/v2/entities/"):-len("/attrs")]
            try:
                attrs = json.loads(body)
                ok = isinstance(attrs, dict)
            except ValueError:
                ok = False
            if not ok:
                self.send_json(400, {"error": "ParseError",
                                     "description": "Errors found in incoming JSON buffer"})
                return
            with self.state.lock:
                entity = entities.get(entity_id)
                if entity is not None:
                    entity.update(attrs)
            if entity is None:
                self.send_json(404, {"error": "NotFound",
                                     "description": "The requested entity has not been found. "
                                                    "Check type and id"})
            else:
                self.send_json(204, None)
        elif path.startswith("/v2/entities/") and self.command == "DELETE":
            with self.state.lock:
                gone = entities.pop(path[len("/v2/entities/"):], None)
            if gone is None:
                self.send_json(404, {"error": "NotFound",
                                     "description": "The requested entity has not been found. "
                                                    "Check type and id"})
            else:
                self.send_json(204, None)
        elif path == "/v2/op/update" and self.command == "POST":
            try:
                batch = json.loads(body)
                items = batch["entities"]
                action = batch["actionType"]
            except (ValueError, KeyError, TypeError):
                self.send_json(400, {"error": "ParseError",
                                     "description": "Errors found in incoming JSON buffer"})
                return
            with self.state.lock:
                for item in items:
                    if action in ("append", "appendStrict", "update", "replace"):
                        entities.setdefault(item["id"], {"id": item["id"],
                                                         "type": item.get("type", "Thing")})
                        entities[item["id"]].update(item)
                    elif action == "delete":
                        entities.pop(item["id"], None)
            self.send_json(204, None)
        elif path == "/v2/subscriptions" and self.command == "POST":
            self.send_json(201, None, [("Location", "/v2/subscriptions/%s" % uuid.uuid4().hex[:24])])
        elif path.startswith("/v2/entities/") and self.command == "GET":
            with self.state.lock:
                entity = entities.get(path[len("/v2/entities/"):])
            if entity is None:
                self.send_json(
                    404,
                    {
                        "error": "NotFound",
                        "description": "The requested entity has not been found. Check type and id",
                    },
                )
            else:
                self.send_json(200, shaped(entity, query))
        else:
            self.send_json(
                400, {"error": "BadRequest", "description": "service not found (stand-in)"}
            )


def serve(host="127.0.0.1", port=0, control_port=0):
    """Starts both servers in daemon threads; returns (broker_server, control_server)."""
    state = State()
    broker_handler = type("BrokerHandler", (Handler,), {"state": state, "control": False})
    control_handler = type("ControlHandler", (Handler,), {"state": state, "control": True})
    servers = []
    for p, h in ((port, broker_handler), (control_port, control_handler)):
        srv = ThreadingHTTPServer((host, p), h)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    return servers[0], servers[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    args = parser.parse_args()
    broker, control = serve(args.host, args.port, args.control_port)
    print(
        json.dumps(
            {
                "ready": True,
                "port": broker.server_address[1],
                "control_port": control.server_address[1],
            }
        ),
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    broker.shutdown()
    control.shutdown()


if __name__ == "__main__":
    main()
