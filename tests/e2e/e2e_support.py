"""Helpers of the Envoy end-to-end tests (see tests/e2e/README.md).

The running parts (Envoy as render.py renders it, the IdP, the broker stand-in, process and
HTTP helpers) are envoy/processes.py, shared with envoy/demo.py; they are re-exported here so
tests write e2e.Envoy, e2e.IdP, e2e.request, ... This module adds what only tests need:
keep-alive and chunked connections, push-config as an operator runs it, Mosquitto and the MQTT
clients.
"""

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "envoy"))

import render  # noqa: E402,F401  (envoy/render.py; tests use e2e.render)
from processes import (  # noqa: E402,F401  (envoy/processes.py, re-exported for the tests)
    ENVOY, GATEWAY_WASM, HTTP_TIMEOUT, MQTT_WASM, START_TIMEOUT, STARTED, WASM, Broker, Envoy,
    EnvoyProcess, IdP, MqttEnvoy, Proc, Response, b64url, copy_module, free_port, header_values, jwt_parts,
    port_open, request, started_logs, token_auth_config, unb64url, wait_until, _die_with_parent)


class Connection:
    """A keep-alive HTTP/1.1 connection: Envoy serves all of its requests on one worker (one
    Wasm VM, one verdict cache). With `ssl_context`, over HTTPS."""

    def __init__(self, port, timeout=HTTP_TIMEOUT, ssl_context=None):
        if ssl_context is not None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                    context=ssl_context)
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.bytes_sent = 0
        send = self.conn.send

        def counting_send(data):
            send(data)
            self.bytes_sent += len(data)

        self.conn.send = counting_send

    def request(self, method, path, headers=(), body=None):
        if isinstance(headers, dict):
            headers = list(headers.items())
        self.conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers:
            self.conn.putheader(k, v)
        if body is not None:
            self.conn.putheader("content-length", str(len(body)))
        self.conn.endheaders(body)
        resp = self.conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())

    def start_chunked(self, method, path, headers=()):
        """Sends the request headers (Transfer-Encoding: chunked) and returns; send the body
        with send_chunk() and finish()."""
        if isinstance(headers, dict):
            headers = list(headers.items())
        self.conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers:
            self.conn.putheader(k, v)
        self.conn.putheader("transfer-encoding", "chunked")
        self.conn.endheaders()

    def send_chunk(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.conn.send(b"%x\r\n%s\r\n" % (len(data), data))

    def end_body(self):
        """Ends the chunked body (read the answer with response())."""
        self.conn.send(b"0\r\n\r\n")

    def response(self):
        resp = self.conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())

    def finish(self):
        """Ends the chunked body and reads the response."""
        self.end_body()
        return self.response()

    def close(self):
        self.conn.close()



PUSH_CONFIG = os.path.join(ROOT, "envoy", "push-config")
PUSH_TIMEOUT = 30


def push_config(proxy, work_dir, filter_config=None, wasm=None, expect=0, resource=None,
                extra_args=()):
    """envoy/push-config, as an operator runs it, on `resource` (default: the proxy's first
    filter's ECDS file, ngsi-gateway's or with `separate` token-auth's); returns its stderr.
    `expect`: its exit status."""
    args = [sys.executable, PUSH_CONFIG, "--resource", resource or proxy.ecds_resource,
            "--admin", f"127.0.0.1:{proxy.admin_port}", "--timeout", str(PUSH_TIMEOUT),
            *extra_args]
    if filter_config is not None:
        path = os.path.join(work_dir, f"push-{uuid.uuid4().hex[:8]}.json")
        with open(path, "w") as f:
            json.dump(filter_config, f)
        args += ["--filter-config", path]
    if wasm is not None:
        args += ["--wasm", wasm]
    done = subprocess.run(args, capture_output=True, text=True, timeout=2 * PUSH_TIMEOUT + 10)
    assert done.returncode == expect, (
        f"push-config exited {done.returncode}, expected {expect}:\n{done.stderr}")
    return done.stderr




# ------------------------------------------------------------------------------------------------
# MQTT: Mosquitto (Debian package) behind Envoy with mqtt_acl.wasm (tests/e2e/test_mqtt_acl.py)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"


class Mosquitto:
    """Mosquitto on a free loopback port, open to anyone (allow_anonymous, no ACL): every
    refusal a test sees in front of it is the filter's."""

    def __init__(self, work_dir, name="mosquitto", extra_conf=""):
        """`extra_conf`: more mosquitto.conf lines (a bridge's `connection` section)."""
        if not os.access(MOSQUITTO, os.X_OK):
            raise RuntimeError(f"{MOSQUITTO} is missing: run tests/e2e/setup (apt mosquitto)")
        self.port = free_port()
        conf = os.path.join(work_dir, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                    "persistence false\nlog_dest stderr\nlog_type all\n"
                    "connection_messages true\n" + extra_conf)
        self.proc = Proc(name, [MOSQUITTO, "-c", conf], os.path.join(work_dir, f"{name}.log"))
        try:
            wait_until(lambda: self.proc.alive() and port_open(self.port), f"{name} listening")
        except Exception:
            self.stop()
            raise

    def log_text(self):
        return self.proc.log_text()

    def connections_accepted(self):
        """How many TCP connections the broker has accepted so far (its log, connection_messages)."""
        return self.log_text().count("New connection from")

    def stop(self):
        self.proc.stop()


def access_log_entry(proxy, matches, what):
    """The first JSON access-log line (the sidecars write it on Envoy's stdout, which the
    proxy's log file collects) for which `matches(entry)` holds; waits for it."""

    def find():
        for line in proxy.log_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if matches(entry):
                    return entry
        return None

    return wait_until(find, f"the access log line of {what}")


def hs256_jwt(claims, secret):
    """A compact HS256 JWS (what an IdP with a shared secret issues), signed here with the
    standard library."""
    import hashlib
    import hmac
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


# The IdP issues opaque access tokens (introspected, never a JWT) for this resource.
MQTT_OPAQUE_AUDIENCE = "urn:orion:opaque"


def mqtt_opaque_config(idp, audience=MQTT_OPAQUE_AUDIENCE, timeout_ms=None):
    """mqtt-acl taking an opaque token as the MQTT user name, introspected (RFC 7662) at the e2e
    IdP by the PEP client; every authenticated client may use lamps/#."""
    introspection = {"kind": "rfc7662", "cluster": "idp", "authority": idp.authority,
                     "path": "/token/introspection",
                     "credentials": {"client_id": IdP.PEP[0], "client_secret": IdP.PEP[1]},
                     "audience": audience}
    if timeout_ms is not None:
        introspection["timeout_ms"] = timeout_ms
    return {
        "client_ids": ["*"],
        "acl": {"rules": [{"name": "lamps", "effect": "allow", "subjects": ["authenticated"],
                           "actions": ["*"], "mqtt": {"topic": "lamps/#"}}]},
        "introspection": introspection,
    }


def mqtt_run(tool, port, *args, timeout=15):
    """Runs mosquitto_pub/mosquitto_sub against 127.0.0.1:port; returns CompletedProcess."""
    exe = MOSQUITTO_PUB if tool == "pub" else MOSQUITTO_SUB
    return subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout)


class MqttSubscriber:
    """mosquitto_sub in the background (-v: topic and payload per line), ready once its SUBACK
    arrived (-d prints it)."""

    def __init__(self, port, *args):
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-d", "-v",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_die_with_parent)
        self.lines = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_until(lambda: any("received SUBACK" in l for l in self.lines) or
                   self.proc.poll() is not None, "mosquitto_sub's SUBACK", timeout=15)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def messages(self):
        """`topic payload` lines (not the -d debug lines)."""
        return [l for l in self.lines if not l.startswith(("Client ", "Subscribed ", "Sending"))]

    def wait_for(self, text, timeout=10):
        return wait_until(lambda: any(text in l for l in self.lines), repr(text), timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(5)
        return "\n".join(self.lines)


def mqtt_varint(n):
    """MQTT's variable byte integer (remaining lengths, property lengths)."""
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out
