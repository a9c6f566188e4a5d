#!/usr/bin/env python3
"""The main job, with the real parts: ngsi_gateway.wasm, the default sidecar (token-auth ->
device-ownership -> entity-acl as stages of one module, one filter, one pass), in Envoy 1.40 in
front of an NGSI broker. --separate runs the same policies as the three separate filters
(token_auth.wasm -> device_ownership.wasm -> entity_acl.wasm) instead: the same steps, the same
outcomes.

Run by `scripts/demo` (after `scripts/setup`). It starts, on loopback and on ports the kernel
chooses, the Orion stand-in (tests/e2e/broker_standin.py, which records what reaches it), the
OIDC provider (tests/e2e/idp, npm oidc-provider) and Envoy from .venv configured by
envoy/render.py from envoy/sidecar.yaml -- all through envoy/processes.py, the same code
the end-to-end tests use -- then sends allowed and denied requests and prints, for each, what
was sent, the answer, the decision line of each stage that decided (filter=<stage>, in either
form) and what reached the broker:

  1. a JWT from the IdP (client_credentials)       200, identity headers at the broker, no token
  2. no token                                      401 + WWW-Authenticate, nothing at the broker
  3. a forged JWT (payload changed)                401, nothing at the broker
  4. a valid JWT + a spoofed x-auth-subject        200, the broker sees the real subject
  5. POST /v2/entities with a body                 201, the body arrives with the owner attribute
                                                   device-ownership added (the creator owns it)
  6. an opaque token (RFC 7662 introspection)      200, introspected once by the IdP
  7. a valid JWT, an entity type the ACL does not grant   403 from entity-acl, nothing at the broker
  8. a batch with one forbidden entity             403, the whole batch refused
  9. another caller reads the gateway's streetlight   403 from device-ownership
 10. that caller lists streetlights                200, the answer holds none of the gateway's

The entity ACL (DEMO_ACL below) lets the gateway (role entities-writer) read, create and change
Streetlights, and citizens read them; device-ownership (DEMO_OWNERSHIP) reads each entity's
owner from the broker itself, so only a streetlight's creator reads or changes it.

Each outcome is checked: the exit status is 1 if any is not what it says (a smoke test), 0
otherwise. Then it prints curl lines for the running sidecar (real ports, a fresh token) and
stops everything, or with --keep, keeps it running until Ctrl-C.

Logs and configurations: tests/e2e/work/demo-<time>-<pid>/ (the last 3 are kept).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
import time
import uuid

import processes  # envoy/processes.py: the parts, started as the e2e tests start them
import render  # envoy/render.py

ROOT = processes.ROOT

ORION = "urn:orion"
# A list query the demo ACL grants (a list without a type could reach any type).
LIST = "/v2/entities?type=Streetlight"
OPAQUE = "urn:orion:opaque"
IDENTITY_HEADERS = ["x-auth-subject", "x-auth-kind", "x-nick-name", "x-display-name", "x-roles",
                    "x-organizations", "x-auth-tenant"]
CREDENTIAL_HEADERS = ["authorization", "x-auth-token"]
KEEP_DEMO_RUNS = 3
ENTITY_ACL_WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "entity_acl.wasm")
OWNERSHIP_WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "device_ownership.wasm")
DEMO_ACL = {"open_endpoints": ["/version"], "acl": {"rules": [
    {"name": "gateway-streetlights", "effect": "allow", "subjects": ["role:entities-writer"],
     "actions": ["read", "create", "write"],
     "ngsi": {"service": "", "service_path": "/#", "entity_type": "Streetlight"}},
    {"name": "citizens-read-streetlights", "effect": "allow", "subjects": ["role:citizen"],
     "actions": ["read"],
     "ngsi": {"service": "", "service_path": "/#", "entity_type": "Streetlight"}},
]}}


def demo_ownership(broker_port):
    """device-ownership: the owner is the entity's `owner` attribute, read from the broker."""
    return {"sources": [{"kind": "broker", "cluster": "broker",
                         "authority": f"127.0.0.1:{broker_port}"}],
            "cache": {"ttl_secs": 5, "negative_ttl_secs": 1}}
INDENT = "    "


# ------------------------------------------------------------------------------------------------
# Small helpers


def rel(path):
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def short(token):
    """A token, shortened for the transcript."""
    if len(token) <= 24:
        return token
    return f"{token[:12]}…{token[-6:]} ({len(token)} chars)"


def token_curl(idp, resource):
    return (f"curl -s -u {processes.IdP.CLIENT[0]}:{processes.IdP.CLIENT[1]} -d grant_type=client_credentials "
            f"-d resource={resource} http://127.0.0.1:{idp.port}/token")


def say(text="", indent=0):
    prefix = INDENT * indent
    for line in text.splitlines() or [""]:
        print(prefix + line if line else "", flush=True)


def headline(text):
    say()
    say(f"==> {text}")


def status_line(response):
    reason = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
              403: "Forbidden", 503: "Service Unavailable"}.get(response.status, "")
    return f"{response.status} {reason}".rstrip()


class Outcome:
    """The checks of one step: what it must show, and what did not hold."""

    def __init__(self):
        self.failures = []

    def expect(self, condition, what):
        if not condition:
            self.failures.append(what)
        return condition

    def denied_by(self, decision, stage):
        """The denial's decision line names `stage` (filter=<stage>, in either form)."""
        return self.expect(decision is not None and f"{stage} decision=deny" in decision,
                           f"{stage} did not refuse it (decision lines: {decision})")


# ------------------------------------------------------------------------------------------------
# The demo


class Demo:
    def __init__(self, work_dir, separate=False):
        self.work_dir = work_dir
        self.separate = separate
        self.broker = self.idp = self.envoy = None
        self.results = []  # (title, failures)

    # -- the parts -------------------------------------------------------------------------------

    def start(self):
        headline(f"Starting the parts on loopback (logs in {rel(self.work_dir)}/)")
        modules = ((processes.WASM, OWNERSHIP_WASM, ENTITY_ACL_WASM) if self.separate
                   else (processes.GATEWAY_WASM,))
        for module in modules:
            if not os.path.isfile(module):
                raise RuntimeError(f"{rel(module)} is missing: run scripts/setup")
        # Copies, so a rebuild while the demo runs (--keep) cannot swap a module under Envoy.
        wasm, *stage_wasm = [processes.copy_module(self.work_dir, m) for m in modules]
        # The gateway runs the stages from its own module; the separate filters each from theirs.
        ownership_wasm, acl_wasm = stage_wasm or (None, None)

        self.broker = processes.Broker(self.work_dir)
        say(f"broker     Orion stand-in (tests/e2e/broker_standin.py)  127.0.0.1:{self.broker.port}"
            f"   what it received: http://127.0.0.1:{self.broker.control_port}/requests", 1)
        self.idp = processes.IdP(self.work_dir)
        say(f"IdP        oidc-provider {self._idp_version()} (tests/e2e/idp)         "
            f"{self.idp.issuer}", 1)
        self.envoy = processes.Envoy(
            work_dir=self.work_dir,
            name="envoy",
            filter_config=processes.token_auth_config(self.idp),
            broker_port=self.broker.port,
            idp_port=self.idp.port,
            wasm=wasm,
            separate=self.separate,
            extra_filters=[
                render.chain_filter("device-ownership", demo_ownership(self.broker.port),
                                    ownership_wasm),
                render.chain_filter("entity-acl", DEMO_ACL, acl_wasm),
            ],
        ).start()
        chain = ("token_auth.wasm -> device_ownership.wasm -> entity_acl.wasm (separate filters)"
                 if self.separate else "ngsi_gateway.wasm (stages token-auth -> device-ownership"
                 " -> entity-acl, one filter)")
        say(f"sidecar    Envoy {self._envoy_version()} + {chain} (envoy/sidecar.yaml)  "
            f"127.0.0.1:{self.envoy.port}   admin 127.0.0.1:{self.envoy.admin_port}", 1)
        for rule in DEMO_ACL["acl"]["rules"]:
            say("entity ACL " + json.dumps(rule), 1)
        say("ownership  " + json.dumps(demo_ownership(self.broker.port)["sources"][0]), 1)
        processes.wait_until(lambda: self.envoy.stats().get("jwks.fetched", 0) >= 1,
                       "the filter to load the IdP's signing keys", timeout=15)
        say(f"the filter found the IdP's keys by OIDC discovery "
            f"({self.idp.issuer}/.well-known/openid-configuration -> /jwks)", 1)

    def stop(self):
        for part in (self.envoy, self.idp, self.broker):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # stopping must go on with the others
                    print(f"demo: stopping {part}: {e}", file=sys.stderr)

    def alive(self):
        return all(p is not None and p.proc.alive() for p in (self.envoy, self.idp, self.broker))

    def _idp_version(self):
        path = os.path.join(processes.E2E_DIR, "idp", "node_modules", "oidc-provider", "package.json")
        try:
            with open(path) as f:
                return json.load(f)["version"]
        except (OSError, ValueError, KeyError):
            return "(version unknown)"

    def _envoy_version(self):
        try:
            version = self.envoy.admin("/server_info").json()["version"]
            m = re.search(r"/(\d+\.\d+\.\d+)/", version)
            return m.group(1) if m else version
        except (OSError, ValueError, KeyError):
            return "(version unknown)"

    # -- one request through the sidecar ---------------------------------------------------------

    def send(self, method, path, headers, body=None):
        """Sends one request to the sidecar; returns (response, the request as it reached the
        broker (a list: empty if it did not), the filters' decision lines). device-ownership's
        own lookups at the broker are kept apart, in self.lookups."""
        before = len(self.broker.requests())
        log_offset = os.path.getsize(self.envoy.proc.log_path)
        response = self.envoy.request(method, path, headers, body)
        # The stand-in records a request as soon as its headers arrive, so anything Envoy let
        # through is recorded by the time the answer is here. Nothing else talks to it.
        records = self.broker.requests()[before:]
        same = lambda r: r["method"] == method and r["path"] == path  # noqa: E731
        self.lookups = [r for r in records if not same(r)]
        return response, [r for r in records if same(r)], self._decision(log_offset)

    def _decision(self, offset, timeout=2.0):
        """The decision log lines written after `offset` (token-auth's, then device-ownership's
        and entity-acl's when token-auth let the request on), if they show up in time. Each
        names the stage that decided as filter=<name>, whether the stages run in ngsi-gateway
        or as separate filters."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.envoy.proc.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", errors="replace")
            auth = re.search(r"filter=token-auth (decision=.*)", text)
            own = re.search(r"filter=device-ownership (decision=.*)", text)
            acl = re.search(r"filter=entity-acl (decision=.*)", text)
            done = auth and ("decision=deny" in auth.group(1)
                             or (own and "decision=deny" in own.group(1)) or acl)
            if done:
                lines = [f"token-auth {auth.group(1).strip()}"]
                lines += [f"{name} {m.group(1).strip()}"
                          for name, m in (("device-ownership", own), ("entity-acl", acl)) if m]
                return "\n          ".join(lines)
            if time.monotonic() > deadline:
                return f"token-auth {auth.group(1).strip()}" if auth else None
            time.sleep(0.05)

    def show_exchange(self, method, path, sent_headers, body, response, records, decision,
                      show_response_headers=()):
        shown = "  ".join(f"{k}: {v}" for k, v in sent_headers) or "(no credential)"
        say(f"sent      {method} {path}   {shown}", 1)
        if body is not None:
            say(f"          body ({len(body)} bytes): {body}", 1)
        answer = response.body.decode("utf-8", errors="replace")
        answer = answer if len(answer) < 120 else answer[:117] + "..."
        say(f"status    {status_line(response)}   {answer}".rstrip(), 1)
        for name in show_response_headers:
            say(f"          {name}: {response.header(name)}", 1)
        if decision:
            say(f"filter    {decision}", 1)
        for lookup in getattr(self, "lookups", []):
            say(f"lookup    {lookup['method']} {lookup['path']}   (device-ownership asks the broker "
                "who owns it)", 1)
        if not records:
            say("broker    nothing reached the broker", 1)
            return
        for record in records:
            say(f"broker    {record['method']} {record['path']}", 1)
            for name in IDENTITY_HEADERS:
                for value in processes.header_values(record, name):
                    say(f"            {name}: {value}", 1)
            for name in CREDENTIAL_HEADERS:
                values = processes.header_values(record, name)
                if name == "authorization" or values:
                    say(f"            {name}: "
                        + (", ".join(values) if values else "(none: the credential is not forwarded)"),
                        1)
            if record.get("body"):
                same = body is not None and record["body"] == body
                say(f"            body ({len(record['body'].encode())} bytes"
                    + (", identical to what was sent): " if same else "): ") + record["body"], 1)

    def step(self, number, title, run):
        headline(f"[{number}] {title}")
        outcome = Outcome()
        try:
            run(outcome)
        except Exception as e:  # a step that breaks is a failed step; the others still run
            outcome.failures.append(f"{type(e).__name__}: {e}")
        if outcome.failures:
            say("FAIL      not as expected:", 1)
            for failure in outcome.failures:
                say(f"  - {failure}", 2)
        else:
            say("PASS", 1)
        self.results.append((title, outcome.failures))

    # -- the six steps ---------------------------------------------------------------------------

    def get_token(self, resource, what):
        say(f"$ {token_curl(self.idp, resource)}", 1)
        token = self.idp.token(resource)
        say(f"  -> access_token {short(token)}: {what(token)}", 1)
        return token

    @staticmethod
    def describe_jwt(token):
        header, payload, _ = processes.jwt_parts(token)
        ttl = payload.get("exp", 0) - payload.get("iat", 0)
        return (f"{header.get('alg')} JWT, kid {header.get('kid')}, sub={payload.get('sub')} "
                f"aud={payload.get('aud')} roles={json.dumps(payload.get('roles'))}, valid {ttl} s")

    def step_jwt_allowed(self, o):
        token = self.get_token(ORION, self.describe_jwt)
        sent = [("Authorization", f"Bearer {short(token)}")]
        r, records, decision = self.send("GET", LIST, {"authorization": f"Bearer {token}"})
        self.show_exchange("GET", LIST, sent, None, r, records, decision)
        o.expect(r.status == 200, f"status {r.status}, expected 200")
        if o.expect(len(records) == 1, f"{len(records)} requests at the broker, expected 1"):
            rec = records[0]
            o.expect(processes.header_values(rec, "x-auth-subject") == ["sensor-gateway"],
                     "x-auth-subject is not sensor-gateway")
            o.expect(processes.header_values(rec, "x-auth-kind") == ["jwt"], "x-auth-kind is not jwt")
            o.expect(processes.header_values(rec, "x-roles") == ["device,entities-writer"],
                     "x-roles is not device,entities-writer")
            o.expect(processes.header_values(rec, "authorization") == [],
                     "Authorization was forwarded to the broker")
            o.expect(token not in json.dumps(rec), "the token reached the broker")

    def step_no_token(self, o):
        r, records, decision = self.send("GET", "/v2/entities", {})
        self.show_exchange("GET", "/v2/entities", [], None, r, records, decision,
                           show_response_headers=["www-authenticate"])
        o.expect(r.status == 401, f"status {r.status}, expected 401")
        o.expect(r.header("www-authenticate") == 'Bearer realm="orion"',
                 f"WWW-Authenticate is {r.header('www-authenticate')!r}")
        try:
            body = r.json()
        except ValueError:
            body = None
        o.expect(body == {"error": "Unauthorized", "description": "missing credential"},
                 f"body is {r.body!r}, expected the NGSI error")
        o.expect(records == [], "the request reached the broker")
        o.denied_by(decision, "token-auth")

    def step_forged(self, o):
        token = self.idp.token(ORION)
        header, payload, signature = processes.jwt_parts(token)
        payload.update(sub="admin", roles=["admin"])
        forged = ".".join([token.split(".")[0], processes.b64url(json.dumps(payload).encode()), signature])
        say("a fresh JWT from the IdP, its payload changed (sub=admin, roles=[admin]), "
            "header and signature kept", 1)
        r, records, decision = self.send("GET", "/v2/entities",
                                         {"authorization": f"Bearer {forged}"})
        self.show_exchange("GET", "/v2/entities", [("Authorization", f"Bearer {short(forged)}")],
                           None, r, records, decision, show_response_headers=["www-authenticate"])
        o.expect(r.status == 401, f"status {r.status}, expected 401")
        o.expect(records == [], "the request reached the broker")
        o.denied_by(decision, "token-auth")

    def step_spoofed(self, o):
        token = self.idp.token(ORION)
        spoofed = [("X-Auth-Subject", "admin"), ("X-Roles", "admin")]
        say("a valid JWT for sensor-gateway, plus identity headers the client made up", 1)
        r, records, decision = self.send("GET", LIST,
                                         [("authorization", f"Bearer {token}")] + spoofed)
        self.show_exchange("GET", LIST,
                           [("Authorization", f"Bearer {short(token)}")] + spoofed,
                           None, r, records, decision)
        o.expect(r.status == 200, f"status {r.status}, expected 200")
        if o.expect(len(records) == 1, f"{len(records)} requests at the broker, expected 1"):
            rec = records[0]
            o.expect(processes.header_values(rec, "x-auth-subject") == ["sensor-gateway"],
                     f"the broker saw x-auth-subject {processes.header_values(rec, 'x-auth-subject')}")
            o.expect(processes.header_values(rec, "x-roles") == ["device,entities-writer"],
                     f"the broker saw x-roles {processes.header_values(rec, 'x-roles')}")
            o.expect(not any(v == "admin" for k, v in rec["headers"]),
                     "a spoofed 'admin' reached the broker")

    def post_json(self, path, value, show_response_headers=()):
        """POSTs `value` as the gateway, shows the exchange; returns (response, records at the
        broker, decisions)."""
        token = self.idp.token(ORION)
        body = json.dumps(value)
        r, records, decision = self.send(
            "POST", path,
            {"authorization": f"Bearer {token}", "content-type": "application/json"}, body)
        self.show_exchange("POST", path,
                           [("Authorization", f"Bearer {short(token)}"),
                            ("Content-Type", "application/json")],
                           body, r, records, decision,
                           show_response_headers=show_response_headers)
        return r, records, decision

    def step_post(self, o):
        entity = {"id": f"urn:ngsi-ld:Streetlight:demo-{uuid.uuid4().hex[:8]}",
                  "type": "Streetlight",
                  "luminosity": {"type": "Number", "value": 87},
                  "status": {"type": "Text", "value": "on"}}
        r, records, _ = self.post_json("/v2/entities", entity, show_response_headers=["location"])
        o.expect(r.status in (200, 201), f"status {r.status}, expected 201")
        if o.expect(len(records) == 1, f"{len(records)} requests at the broker, expected 1"):
            rec = records[0]
            try:
                arrived = json.loads(rec.get("body") or "null")
            except ValueError:
                arrived = None
            o.expect(rec.get("complete") and arrived == dict(
                entity, owner={"type": "Text", "value": "sensor-gateway"}),
                "the body did not arrive whole, with the owner attribute added")
            o.expect(processes.header_values(rec, "x-auth-subject") == ["sensor-gateway"],
                     "x-auth-subject is not sensor-gateway")

    def step_opaque(self, o):
        token = self.get_token(
            OPAQUE, lambda t: "opaque (not a JWT); the filter asks the IdP about it (RFC 7662)")
        before = self.idp.count("/token/introspection")
        r, records, decision = self.send("GET", LIST, {"authorization": f"Bearer {token}"})
        asked = self.idp.count("/token/introspection") - before
        self.show_exchange("GET", LIST, [("Authorization", f"Bearer {short(token)}")],
                           None, r, records, decision)
        say(f"IdP       {asked} introspection request(s) at /token/introspection "
            f"(the filter, as client {processes.IdP.PEP[0]})", 1)
        o.expect(token.count(".") == 0, "the IdP gave a JWT, not an opaque token")
        o.expect(r.status == 200, f"status {r.status}, expected 200")
        o.expect(asked == 1, f"{asked} introspection requests, expected 1")
        if o.expect(len(records) == 1, f"{len(records)} requests at the broker, expected 1"):
            rec = records[0]
            o.expect(processes.header_values(rec, "x-auth-subject") == ["sensor-gateway"],
                     "x-auth-subject is not sensor-gateway")
            o.expect(processes.header_values(rec, "x-auth-kind") == ["opaque_token"],
                     "x-auth-kind is not opaque_token")
            o.expect(processes.header_values(rec, "authorization") == [],
                     "Authorization was forwarded to the broker")

    def step_acl_denied(self, o):
        entity = {"id": "urn:ngsi-ld:Building:townhall", "type": "Building",
                  "floors": {"type": "Number", "value": 4}}
        say("a valid JWT for sensor-gateway; the ACL grants it Streetlights only", 1)
        r, records, decision = self.post_json("/v2/entities", entity)
        o.expect(r.status == 403, f"status {r.status}, expected 403")
        try:
            answer = r.json()
        except ValueError:
            answer = None
        o.expect(answer == {"error": "Forbidden",
                            "description": "the caller is not allowed to perform this request"},
                 f"body is {r.body!r}, expected the NGSI error naming no rule")
        o.expect(records == [], "the request reached the broker")
        o.denied_by(decision, "entity-acl")

    def step_batch_denied(self, o):
        batch = {"actionType": "append", "entities": [
            {"id": "urn:ngsi-ld:Streetlight:7", "type": "Streetlight",
             "luminosity": {"type": "Number", "value": 10}},
            {"id": "urn:ngsi-ld:Building:townhall", "type": "Building",
             "floors": {"type": "Number", "value": 5}},
        ]}
        say("one Streetlight (granted) and one Building (not) in one op/update", 1)
        r, records, decision = self.post_json("/v2/op/update", batch)
        o.expect(r.status == 403, f"status {r.status}, expected 403")
        o.expect(records == [], "part of the batch reached the broker")
        o.denied_by(decision, "entity-acl")

    def step_not_owner(self, o):
        token = self.idp.token(ORION)
        light = f"urn:ngsi-ld:Streetlight:demo-{uuid.uuid4().hex[:8]}"
        created = self.envoy.request(
            "POST", "/v2/entities",
            {"authorization": f"Bearer {token}", "content-type": "application/json"},
            json.dumps({"id": light, "type": "Streetlight"}))
        say(f"sensor-gateway created {light} ({created.status}); parking-app (role citizen, "
            "which the ACL lets read Streetlights) asks for it", 1)
        other = self.idp.token(ORION, client=processes.IdP.OTHER_CLIENT)
        path = f"/v2/entities/{light}?type=Streetlight"
        r, records, decision = self.send("GET", path, {"authorization": f"Bearer {other}"})
        self.show_exchange("GET", path, [("Authorization", f"Bearer {short(other)}")],
                           None, r, records, decision)
        o.expect(created.status == 201, f"the create got {created.status}, expected 201")
        o.expect(r.status == 403, f"status {r.status}, expected 403")
        o.expect(records == [], "the request reached the broker")
        o.denied_by(decision, "device-ownership")

    def step_list_filtered(self, o):
        other = self.idp.token(ORION, client=processes.IdP.OTHER_CLIENT)
        stored = [e for e in self.broker_entities() if e.get("type") == "Streetlight"]
        say(f"the broker holds {len(stored)} Streetlights, all created by sensor-gateway", 1)
        r, records, decision = self.send("GET", LIST, {"authorization": f"Bearer {other}"})
        self.show_exchange("GET", LIST, [("Authorization", f"Bearer {short(other)}")],
                           None, r, records, decision)
        o.expect(r.status == 200, f"status {r.status}, expected 200")
        o.expect(len(records) == 1, "the list query did not reach the broker")
        o.expect(len(stored) >= 1, "no Streetlight at the broker to filter")
        try:
            listed = r.json()
        except ValueError:
            listed = None
        o.expect(listed == [], f"parking-app got {listed!r}, expected an empty list")

    def broker_entities(self):
        """What the stand-in stores, asked directly (through the sidecar it would be filtered)."""
        return processes.request(self.broker.port, "GET", "/v2/entities").json()

    def run_steps(self):
        self.step(1, "A token from the IdP (client_credentials), then GET /v2/entities",
                  self.step_jwt_allowed)
        self.step(2, "No token", self.step_no_token)
        self.step(3, "A forged token", self.step_forged)
        self.step(4, "A valid token plus a spoofed identity", self.step_spoofed)
        self.step(5, "POST /v2/entities with a body", self.step_post)
        self.step(6, "An opaque token, introspected by the IdP", self.step_opaque)
        self.step(7, "entity-acl: an entity type the ACL does not grant", self.step_acl_denied)
        self.step(8, "entity-acl: a batch with one forbidden entity", self.step_batch_denied)
        self.step(9, "device-ownership: another caller reads the gateway's streetlight",
                  self.step_not_owner)
        self.step(10, "device-ownership: a list answer holds only what the caller may read",
                  self.step_list_filtered)

    # -- the end ---------------------------------------------------------------------------------

    def summary(self):
        failed = [(t, f) for t, f in self.results if f]
        headline(f"{len(self.results) - len(failed)}/{len(self.results)} outcomes as expected")
        for title, failures in failed:
            say(f"FAIL {title}: {'; '.join(failures)}", 1)
        return not failed

    def curl_lines(self, keep):
        token = self.idp.token(ORION)
        p, c, a = self.envoy.port, self.broker.control_port, self.envoy.admin_port
        headline("Try it yourself" + ("" if keep else
                                      " (with `scripts/demo --keep` these stay up until Ctrl-C)"))
        lines = f"""\
            TOKEN={token}
            # that token is valid 10 minutes; a new one:
            TOKEN=$({token_curl(self.idp, ORION)} | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')

            curl -i -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:{p}{LIST}'      # 200
            curl -i http://127.0.0.1:{p}/v2/entities                                       # 401
            curl -i -H "Authorization: Bearer $TOKEN" -H 'X-Auth-Subject: admin' 'http://127.0.0.1:{p}{LIST}'   # 200, as sensor-gateway
            curl -i -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
                -d '{{"id": "urn:ngsi-ld:Streetlight:1", "type": "Streetlight"}}' http://127.0.0.1:{p}/v2/entities   # 201
            curl -i -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
                -d '{{"id": "urn:ngsi-ld:Building:1", "type": "Building"}}' http://127.0.0.1:{p}/v2/entities   # 403 (entity-acl)
            curl -i -H "Authorization: Bearer $TOKEN" http://127.0.0.1:{p}/v2/entities      # 403: a list of any type
            curl -i http://127.0.0.1:{p}/version                                           # 200, public route

            curl -s http://127.0.0.1:{c}/requests | python3 -m json.tool    # what reached the broker
            curl -s 'http://127.0.0.1:{a}/stats?filter=wasmcustom'            # the filter's counters
            grep decision= {shlex.quote(rel(self.envoy.proc.log_path))}       # the filter's decisions"""
        say(textwrap.dedent(lines), 1)

    def keep_running(self):
        headline("The sidecar keeps running; Ctrl-C stops it")
        while self.alive():
            time.sleep(0.5)
        for part in (self.envoy, self.idp, self.broker):
            if not part.proc.alive():
                print(f"demo: {part.proc.name} exited; see {rel(part.proc.log_path)}",
                      file=sys.stderr)
        return False

    def failure_report(self):
        header = ["", "What the parts logged (last lines):"]
        wanted = lambda l: any(m in l for m in ("wasm log", "idp:", "[critical]", "[error]"))  # noqa: E731
        for name, path, lines in processes.started_logs(wanted):
            keep = [re.sub(r" \[source/[^\]]*\]", "", l) for l in lines]
            if keep:
                for line in header:
                    say(line)
                header = []
                say(f"--- {name} ({rel(path)})", 1)
                for line in keep[-15:]:
                    say(line, 1)


def new_work_dir():
    base = os.path.join(processes.E2E_DIR, "work")
    os.makedirs(base, exist_ok=True)
    runs = sorted(d for d in os.listdir(base) if d.startswith("demo-"))
    for old in runs[:max(0, len(runs) - (KEEP_DEMO_RUNS - 1))]:
        shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    path = os.path.join(base, time.strftime("demo-%Y%m%d-%H%M%S-") + str(os.getpid()))
    os.makedirs(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="ngsi-gateway (token-auth -> device-ownership -> entity-acl) in Envoy in "
                    "front of an Orion stand-in, with a real OIDC provider: allowed and denied "
                    "requests, checked.")
    parser.add_argument("--keep", action="store_true",
                        help="keep the sidecar running after the transcript, until Ctrl-C")
    parser.add_argument("--separate", action="store_true",
                        help="run token_auth.wasm -> device_ownership.wasm -> entity_acl.wasm as"
                             " separate filters instead of ngsi_gateway.wasm (the default)")
    args = parser.parse_args(argv)

    # SIGTERM stops the demo like Ctrl-C: every part is stopped on the way out.
    def terminate(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    demo = Demo(new_work_dir(), separate=args.separate)
    ok = False
    try:
        demo.start()
        demo.run_steps()
        ok = demo.summary()
        if not ok:
            demo.failure_report()
        demo.curl_lines(args.keep)
        say()
        say(f"({time.monotonic() - started:.1f} s; logs and configurations in "
            f"{rel(demo.work_dir)}/)")
        if args.keep:
            ok = demo.keep_running() and ok
    except KeyboardInterrupt:
        say()
        say("Stopping (Ctrl-C).")
        if not args.keep or not demo.results:
            ok = False
    except Exception as e:
        print(f"\ndemo: {type(e).__name__}: {e}", file=sys.stderr)
        demo.failure_report()
        ok = False
    finally:
        demo.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
