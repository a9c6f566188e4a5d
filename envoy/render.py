#!/usr/bin/env python3
"""Renders envoy/sidecar.yaml (a template) into a configuration Envoy can load.

    python3 envoy/render.py --filter-config token-auth.json [--out sidecar.yaml]
        [--listen 127.0.0.1:10000] [--admin 127.0.0.1:9901]
        [--broker 127.0.0.1:1026] [--idp 127.0.0.1:3000]
        [--wasm target/wasm32-wasip1/release/ngsi_gateway.wasm]
        [--node-id iot-sidecar] [--allow-on-headers-stop-iteration]
        [--tls-cert server.crt --tls-key server.key [--client-ca ca.crt]]
        [--ecds DIR]
        [--device-ownership-config FILE [--device-ownership-wasm W]] [--owners HOST:PORT]
        [--entity-acl-config FILE [--entity-acl-wasm W]]
        [--http-cluster NAME=HOST:PORT ...]
        [--failure-policy reload|fail-closed] [--no-validate] [--separate]

    python3 envoy/render.py --mqtt --filter-config mqtt-acl.json [--out mqtt-sidecar.yaml]
        [--listen 127.0.0.1:1883] [--admin 127.0.0.1:9902] [--broker 127.0.0.1:11883]
        [--wasm target/wasm32-wasip1/release/mqtt_acl.wasm] [--node-id iot-mqtt-sidecar]
        [--tls-cert ... --tls-key ... [--client-ca ...]] [--ecds DIR]
        [--http-cluster NAME=HOST:PORT ...] [--websocket]
        [--failure-policy reload|fail-closed] [--no-validate]

--filter-config is the token-auth configuration (JSON, see filters/policy/src/token_auth.rs);
it is checked to be a JSON object and embedded as the plugin's configuration string. Port 0 for
--listen or --admin lets the kernel choose (read them back from the admin interface, or with
envoy --admin-address-path). Addresses
may be IP addresses (STATIC clusters) or host names (STRICT_DNS clusters). The .wasm path is
made absolute. Only the standard library is used; `render()` is importable (tests/e2e uses it).

--tls-cert/--tls-key make the listener HTTPS; --client-ca also requires every client to present
a certificate signed by that CA (mTLS; token-auth's "mtls" section then names the caller).

--device-ownership-config and --entity-acl-config add those policies after token-auth, in the
order token-auth -> device-ownership -> entity-acl, each with its JSON configuration (see
filters/device-ownership/README.md and README.md, "entity-acl"); --owners adds the cluster
"owners" for device-ownership's registry source. --http-cluster NAME=HOST:PORT (repeatable, both
sidecars) adds a plain HTTP cluster NAME the filters' configuration names: a device registry,
mqtt-acl's http_backend web app, an introspection endpoint (over TLS: render()/render_mqtt()'s
http_clusters from Python).

By default the chain runs as ngsi-gateway (ngsi_gateway.wasm, or --wasm): one filter, one
module, one pass, its configuration {"token_auth": ..., "device_ownership": ..., "entity_acl":
...} built from the same files; with --ecds its resource is DIR/ngsi-gateway.json. This is the
HTTP sidecar operators deploy. --separate renders the same files as separate filters instead
(token_auth.wasm -- --wasm then names it -- then device_ownership.wasm, entity_acl.wasm), for
operators who chain them differently. --gateway is accepted and changes nothing (it was the
switch before the gateway became the default). Where the gateway cannot express a chain, e.g. a
module given with --wasm that is one of the separate filters, render.py stops with a message
naming --separate; it never switches form by itself.

--ecds DIR: the filter's configuration (and its .wasm path) comes instead from
DIR/ngsi-gateway.json (with --separate: DIR/token-auth.json, and DIR/entity-acl.json,
DIR/device-ownership.json for those filters), an ECDS resource Envoy watches and reloads at run
time. The resources are written here from the configurations and .wasm paths (atomically);
change them later with envoy/push-config (--resource DIR/ngsi-gateway.json, the whole gateway
configuration; --stage entity_acl replaces one stage's).

Before writing anything, each filter's configuration is checked offline: host-harness validate
starts the real .wasm with it as Envoy would, and a refusal stops render.py (exit 2) with the
filter's reason. Without a built harness (target/{release,debug}/host-harness or $HOST_HARNESS)
it says "NOT validated offline" and goes on; --no-validate skips the check.

--mqtt renders envoy/mqtt-sidecar.yaml instead (render_mqtt): mqtt-acl, the network filter, in
front of an MQTT broker (--broker), with --filter-config as mqtt-acl's configuration; with
--ecds DIR it is discovered from DIR/mqtt-acl.json, written here (change it with push-config).
The HTTP-only options (--idp, the chain filters, --owners, --gateway, --separate,
--allow-on-headers-stop-iteration)
are refused with it.

Secrets from the environment: a client-credentials grant may name an environment variable
(`"client_secret_env": "NAME"`) instead of holding `client_secret`. Every such name in a
filter's configuration is put in that filter's vm_config.environment_variables.host_env_keys
(inline and in ECDS resources alike): Envoy then hands the variable of its own environment to
the VM, and the secret appears neither in the rendered file nor in Envoy's config dump. Start
Envoy with the variable set (the filter refuses its configuration if it is unset or empty). The
offline validation runs with a placeholder value for it.

--failure-policy: what Envoy does when a filter's VM fails (a trap, a crash): `reload` (the
default, Envoy's FAIL_RELOAD) refuses the failing request with 503 and starts a fresh VM for the
next ones; `fail-closed` (FAIL_CLOSED) refuses every request until Envoy restarts or the filter
is pushed again. Both are fail-closed for the request that failed; FAIL_OPEN is not offered.
"""

import argparse
import json
import os
import re
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPLATE = os.path.join(HERE, "sidecar.yaml")
# token-auth's filter name, vm_id and ECDS resource name. With ECDS, a filter's name in the
# listener and its resource's name must be the same (Envoy matches them); the file in the
# watched directory is <name>.json.
ECDS_NAME = "token-auth"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
NETWORK_WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
WASM_DIR = os.path.join(ROOT, "target", "wasm32-wasip1", "release")
DEFAULT_WASM = os.path.join(WASM_DIR, "token_auth.wasm")

# The filters that may follow token-auth, in chain order, with their .wasm and what they do.
# Both decide on the request body, so Envoy must run them with allow_on_headers_stop_iteration.
CHAIN_FILTERS = {
    "device-ownership": (
        "device_ownership.wasm",
        "only a device's owner, or whom the owner delegates, reads or writes its entities "
        "(ownership from the configuration, the broker or a registry; list responses filtered)",
    ),
    "entity-acl": (
        "entity_acl.wasm",
        "decides every NGSI request (v2, NGSI-LD, FogFlow) against the entity ACL rules",
    ),
}

# ngsi-gateway, the default HTTP sidecar: token-auth and the chain above as stages of one
# module, one filter entry (its name, vm_id and ECDS resource name); its configuration holds
# each stage's under the stage's key.
GATEWAY_NAME = "ngsi-gateway"
DEFAULT_GATEWAY_WASM = os.path.join(WASM_DIR, "ngsi_gateway.wasm")
# The separate filters' modules: given as the gateway's module, they would refuse its
# configuration; render.py says to use --separate instead.
SEPARATE_MODULES = ("token_auth.wasm",) + tuple(wasm for wasm, _ in CHAIN_FILTERS.values())

_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def split_host_port(value, what, allow_zero=False):
    host, sep, port = value.rpartition(":")
    lowest = 0 if allow_zero else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f"{what}: {value!r} is not HOST:PORT")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
        raise ValueError(f"{what}: {host!r} is not a host name or IPv4 address")
    return host, int(port)


def yaml_string(text):
    """A YAML double-quoted scalar holding `text`: a JSON string literal is one (JSON's escapes
    are a subset of YAML's), and with ensure_ascii it stays on one line."""
    return json.dumps(text, ensure_ascii=True)


def _indent(lines, spaces):
    return "\n".join(" " * spaces + line if line else "" for line in lines)


def transport_socket(tls_cert=None, tls_key=None, client_ca=None):
    """The listener's filter chain `transport_socket` (YAML lines at the filter chain's
    indentation), or "" for plain HTTP."""
    if not tls_cert and not tls_key and not client_ca:
        return ""
    if not tls_cert or not tls_key:
        raise ValueError("--tls-cert and --tls-key go together (--client-ca needs both)")
    cert, key = yaml_string(os.path.abspath(tls_cert)), yaml_string(os.path.abspath(tls_key))
    lines = [
        "transport_socket:",
        "  name: envoy.transport_sockets.tls",
        "  typed_config:",
        '    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext',
    ]
    if client_ca:
        lines += [
            "    # mTLS: a client without a certificate signed by the CA below is refused in the",
            "    # handshake; the filter reads the verified subject (connection.subject_peer_certificate).",
            "    require_client_certificate: true",
        ]
    lines += [
        "    common_tls_context:",
        "      tls_params: { tls_minimum_protocol_version: TLSv1_2 }",
        '      alpn_protocols: ["h2", "http/1.1"]',
        "      tls_certificates:",
        f"      - certificate_chain: {{ filename: {cert} }}",
        f"        private_key: {{ filename: {key} }}",
    ]
    if client_ca:
        lines += [
            "      validation_context:",
            f"        trusted_ca: {{ filename: {yaml_string(os.path.abspath(client_ca))} }}",
        ]
    return _indent(lines, 6)


def json_object(config, what):
    """A filter configuration given as a dict or a JSON string, checked to be an object."""
    if isinstance(config, str):
        config = json.loads(config)
    if not isinstance(config, dict):
        raise ValueError(f"the {what} configuration must be a JSON object")
    return config


def check_node_id(node_id, option):
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", node_id):
        raise ValueError(f"{option}: {node_id!r} must be letters, digits, '.', '_' or '-'")


# Envoy's wasm PluginConfig.failure_policy, by the name --failure-policy takes. FAIL_RELOAD (the
# default): a request that meets a failed VM is refused (503, as FAIL_CLOSED), and a fresh VM
# is started for later requests (at most one reload per ~1-1.5 s: Envoy's backoff, 1 s base). FAIL_CLOSED: the
# VM stays dead and every request is refused until Envoy restarts or the filter is pushed again.
# FAIL_OPEN (requests skip the failed filter) is never acceptable for a security filter: not
# offered.
FAILURE_POLICIES = {"reload": "FAIL_RELOAD", "fail-closed": "FAIL_CLOSED"}
DEFAULT_FAILURE_POLICY = "FAIL_RELOAD"


def failure_policy_value(policy):
    """Envoy's enum value for a --failure-policy name (or an enum value we offer)."""
    if policy in FAILURE_POLICIES.values():
        return policy
    if policy in FAILURE_POLICIES:
        return FAILURE_POLICIES[policy]
    raise ValueError(f"failure policy {policy!r}: choose one of {', '.join(FAILURE_POLICIES)}"
                     " (FAIL_OPEN would let requests skip a failed security filter)")


# The configuration key naming an environment variable that holds a secret.
SECRET_ENV_KEY = "client_secret_env"


def secret_env_names(filter_config):
    """The environment variables a filter configuration (dict, or JSON text) takes secrets
    from: every string value of a `client_secret_env` key, at any depth, sorted and unique."""
    if isinstance(filter_config, str):
        try:
            filter_config = json.loads(filter_config)
        except ValueError:
            return []
    names = set()

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key == SECRET_ENV_KEY and isinstance(item, str):
                    names.add(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(filter_config)
    return sorted(names)


def wasm_plugin(name, wasm, filter_config, failure_policy=DEFAULT_FAILURE_POLICY,
                allow_on_headers_stop_iteration=None):
    """The one builder of a wasm filter's PluginConfig (the `config` of an
    envoy.filters.{http,network}.wasm filter), inline or in an ECDS resource: V8, vm_id = the
    filter's name (workers share its shared data), the module from a local file, the filter's
    JSON as a StringValue, the failure policy, and the environment variables the configuration
    takes secrets from (client_secret_env) passed through from Envoy's environment
    (environment_variables.host_env_keys: the names only, never a value).
    allow_on_headers_stop_iteration: None for network filters (an HTTP-only option)."""
    plugin = {
        "name": name,
        "root_id": "",
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": os.path.abspath(wasm)}},
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": json.dumps(json_object(filter_config, name), separators=(",", ":")),
        },
        "failure_policy": failure_policy_value(failure_policy),
    }
    env_names = secret_env_names(filter_config)
    if env_names:
        plugin["vm_config"]["environment_variables"] = {"host_env_keys": env_names}
    if allow_on_headers_stop_iteration is not None:
        plugin["allow_on_headers_stop_iteration"] = bool(allow_on_headers_stop_iteration)
    return plugin


def wasm_filter(plugin, network=False):
    """An http_filters (or network filters) entry running `plugin` (a wasm_plugin(...))."""
    return {"name": f"envoy.filters.{'network' if network else 'http'}.wasm",
            "typed_config": {"@type": NETWORK_WASM_TYPE if network else WASM_TYPE,
                             "config": plugin}}


def discovered_filter(name, ecds_dir, network=False):
    """The one builder of a filter entry configured by ECDS from ecds_dir/<name>.json (the
    resource ecds_resource(...) builds): Envoy reads the file at start and again whenever a file
    is renamed into ecds_dir (envoy/push-config does). No default configuration: the listener
    waits until the file gave one. Only a wasm filter configuration (http or network) is
    accepted from the file."""
    return {
        "name": name,
        "config_discovery": {
            "config_source": {"path_config_source": {
                "path": ecds_path(ecds_dir, name),
                # The directory, not the file: a rename replaces the file's inode, and
                # Kubernetes ConfigMap volumes update by renaming a symlink.
                "watched_directory": {"path": os.path.abspath(ecds_dir)},
            }},
            "apply_default_config_without_warming": False,
            "type_urls": [NETWORK_WASM_TYPE if network else WASM_TYPE],
        },
    }


def _discovered_filter_comment(name, ecds_dir, network=False):
    """What an operator must know about a filter configured by ECDS (YAML comment lines)."""
    scope = "network_filter" if network else "http_filter"
    return [
        f"# By ECDS from {ecds_path(ecds_dir, name)}: the .wasm, the",
        "# filter's JSON and failure_policy (one TypedExtensionConfig of this name). Change it",
        "# only by rename, with envoy/push-config; a rejected file leaves the previous one in",
        f"# force (extension_config_discovery.{scope}.{name}.update_rejected). At start and",
        "# on errors: envoy/README.md, \"Changing policy at runtime\".",
    ]


def filter_entry_yaml(name, wasm, filter_config, spaces, ecds_dir=None, network=False,
                      failure_policy=DEFAULT_FAILURE_POLICY, allow_on_headers_stop_iteration=None):
    """A wasm filter's entry in a listener's filter list, as YAML lines at `spaces`
    indentation: inline (wasm_filter(wasm_plugin(...))), or with `ecds_dir` discovered by ECDS
    (discovered_filter(...); write its resource with ecds_resource(...)). Every template's wasm
    filter comes from here."""
    env_names = secret_env_names(filter_config)
    env_comment = _indent([
        f"# Start Envoy with {', '.join(env_names)} in its environment: the filter takes its",
        "# client secret from there (host_env_keys), and refuses its configuration without it.",
    ], spaces) + "\n" if env_names else ""
    if ecds_dir:
        return env_comment + \
            _indent(_discovered_filter_comment(name, ecds_dir, network), spaces) + "\n" + \
            filter_yaml(discovered_filter(name, ecds_dir, network), spaces)
    return env_comment + filter_yaml(wasm_filter(wasm_plugin(
        name, wasm, filter_config, failure_policy,
        None if network else allow_on_headers_stop_iteration), network=network), spaces)


def _yaml_lines(value):
    """Block-style YAML lines of dicts, lists and scalars (strings as JSON literals)."""
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            key = key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else yaml_string(key)
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{key}:")
                lines += ["  " + line for line in _yaml_lines(item)]
            else:
                lines.append(f"{key}: {_yaml_scalar(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            inner = _yaml_lines(item)
            lines += ["- " + inner[0]] + ["  " + line for line in inner[1:]]
        return lines
    return [_yaml_scalar(value)]


def _yaml_scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if value == {}:
        return "{}"
    # Plain where YAML cannot misread it (names, type URLs, enum values), else quoted.
    if (re.fullmatch(r"[A-Za-z][A-Za-z0-9._/-]*", value)
            and value.lower() not in ("true", "false", "yes", "no", "on", "off", "null")):
        return value
    return yaml_string(value)


def filter_yaml(entry, spaces):
    """A filter list entry (a wasm_filter(...)) as YAML lines at `spaces` indentation."""
    return _indent(_yaml_lines([entry]), spaces)


def ecds_resource(filter_config, wasm=DEFAULT_WASM, version="1",
                  allow_on_headers_stop_iteration=False, name=ECDS_NAME,
                  failure_policy=DEFAULT_FAILURE_POLICY, network=False):
    """The ECDS resource file's content (a DiscoveryResponse with one TypedExtensionConfig):
    the same wasm filter configuration sidecar.yaml (or, with `network`, mqtt-sidecar.yaml)
    has inline."""
    return {
        "version_info": str(version),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": name,
            "typed_config": wasm_filter(wasm_plugin(
                name, wasm, filter_config, failure_policy,
                None if network else allow_on_headers_stop_iteration),
                network=network)["typed_config"],
        }],
    }


# token-auth's default identity header names (policy::identity_headers::IdentityHeaderNames).
DEFAULT_IDENTITY_HEADERS = {
    "subject": "x-auth-subject", "kind": "x-auth-kind", "nick_name": "x-nick-name",
    "display_name": "x-display-name", "roles": "x-roles", "organizations": "x-organizations",
    "tenant": "x-auth-tenant", "app_id": "x-app-id", "eidas_profile": "x-eidas-profile",
    "format": "list",
}


def identity_header_names(config):
    """The identity header names a filter configuration uses (defaults filled in)."""
    names = dict(DEFAULT_IDENTITY_HEADERS)
    names.update((config or {}).get("identity_headers") or {})
    return {k: str(v).lower() for k, v in names.items()}


def check_identity_headers(token_auth_config, extra_filters):
    """Refuses a chain whose later filters read other identity header names than token-auth
    sets: they would read headers the client sent (issue 12). token-auth also strips the
    default names, so such a chain fails closed, but it would refuse every caller."""
    expected = identity_header_names(token_auth_config)
    for f in extra_filters:
        if f["name"] not in ("entity-acl", "device-ownership"):
            continue
        got = identity_header_names(f["config"])
        if got != expected:
            diff = sorted(k for k in expected if expected[k] != got.get(k))
            raise ValueError(
                f"{f['name']}: identity_headers {diff} differ from token-auth's; give every "
                "filter of the chain the same identity_headers")


# The `broker` setting of entity-acl and device-ownership (policy::ngsi::Broker).
BROKERS = ("orion", "ngsi-ld", "fogflow")


def check_broker(extra_filters):
    """Refuses an unknown `broker` in entity-acl or device-ownership, and a chain whose two
    NGSI filters model different brokers (one sidecar is in front of one broker)."""
    seen = {}
    for f in extra_filters:
        if f["name"] not in ("entity-acl", "device-ownership"):
            continue
        broker = (f["config"] or {}).get("broker", "orion")
        if broker not in BROKERS:
            raise ValueError(f"{f['name']}: broker {broker!r} is not one of {', '.join(BROKERS)}")
        seen[f["name"]] = broker
    if len(set(seen.values())) > 1:
        raise ValueError(f"entity-acl and device-ownership name different brokers {seen}; "
                         "give both the broker behind this sidecar")


def chain_filter(name, config, wasm=None, allow_on_headers_stop_iteration=True):
    """One filter after token-auth, for render(extra_filters=...): {"name", "config", "wasm"}.
    allow_on_headers_stop_iteration=False exists for the test that shows what that
    misconfiguration does; never deploy it."""
    if name not in CHAIN_FILTERS:
        raise ValueError(f"unknown filter {name!r} (known: {', '.join(CHAIN_FILTERS)})")
    config = json_object(config, name)
    return {"name": name, "config": config, "about": CHAIN_FILTERS[name][1],
            "wasm": os.path.abspath(wasm or os.path.join(WASM_DIR, CHAIN_FILTERS[name][0])),
            "allow_on_headers_stop_iteration": bool(allow_on_headers_stop_iteration)}


def gateway_filter(token_auth_config, extra_filters, wasm=None):
    """The chain token-auth -> extra_filters as ngsi-gateway's one filter: {"name", "config",
    "wasm", "about", ...}, its configuration one key per stage (`token_auth`,
    `device_ownership`, `entity_acl`) holding exactly that filter's. The checks a chain of
    separate filters gets (identity header names, broker) run first. A chain the gateway cannot
    run as given raises ValueError naming --separate (never a silent switch of form)."""
    if token_auth_config is None:
        raise ValueError("ngsi-gateway: a chain without token-auth (identity headers trusted "
                         "from the client, tests only) is rendered with --separate "
                         "(separate=True)")
    token_auth_config = json_object(token_auth_config, "token-auth")
    if wasm and os.path.basename(wasm) in SEPARATE_MODULES:
        raise ValueError(f"--wasm: {os.path.basename(wasm)} is a separate filter's module; the "
                         "default sidecar is ngsi-gateway (ngsi_gateway.wasm): give its module, "
                         "or --separate (separate=True) to run the separate filters")
    check_identity_headers(token_auth_config, extra_filters)
    check_broker(extra_filters)
    config = {"token_auth": token_auth_config}
    order = list(CHAIN_FILTERS)
    for n, f in enumerate(extra_filters):
        if f["name"] not in CHAIN_FILTERS:
            raise ValueError(f"{f['name']} is not a stage of ngsi-gateway: render this chain "
                             "with --separate (separate=True)")
        key = f["name"].replace("-", "_")
        out_of_order = n and order.index(f["name"]) < order.index(extra_filters[n - 1]["name"])
        if key in config or out_of_order:
            raise ValueError(f"ngsi-gateway runs its stages once each, in the order token-auth"
                             f" -> {' -> '.join(order)}; for the chain "
                             f"{' -> '.join(x['name'] for x in extra_filters)} use --separate "
                             "(separate=True)")
        if not f.get("allow_on_headers_stop_iteration", True):
            raise ValueError(f"{f['name']}: allow_on_headers_stop_iteration false is a separate "
                             "filter's (mis)configuration; ngsi-gateway always sets it when a "
                             "stage decides on the body: use --separate (separate=True)")
        config[key] = f["config"]
    stages = " -> ".join(["token-auth"] + [f["name"] for f in extra_filters])
    return {"name": GATEWAY_NAME, "config": config,
            "wasm": os.path.abspath(wasm or DEFAULT_GATEWAY_WASM),
            "about": f"ngsi-gateway: {stages} as stages of one module, in one pass",
            # Any stage after token-auth decides on the body.
            "allow_on_headers_stop_iteration": bool(extra_filters)}


def test_probe_filter(config, wasm=os.path.join(WASM_DIR, "abi_probe.wasm")):
    """Tests only, never deploy: the abi-probe test filter as a chain filter (the recovery
    tests trap it on demand to watch the failure policy)."""
    return {"name": "abi-probe", "config": json_object(config, "abi-probe"),
            "about": "TEST filter abi-probe (never deploy)", "wasm": os.path.abspath(wasm),
            "allow_on_headers_stop_iteration": True}


def _chain_filter_yaml(f, number, ecds_dir=None, failure_policy=DEFAULT_FAILURE_POLICY):
    """The http_filters entry of a filter after token-auth (YAML lines at the list's
    indentation): inline, or by ECDS from ecds_dir/<name>.json."""
    name = f["name"]
    lines = [
        f"# {number}. {name}: {f['about']}.",
        "#    It decides on the request body: allow_on_headers_stop_iteration must be true, or",
        "#    the body never reaches it (it then answers 503 after its body_timeout_ms).",
    ]
    return _indent(lines, 10) + "\n" + filter_entry_yaml(
        name, f["wasm"], f["config"], 10, ecds_dir, failure_policy=failure_policy,
        allow_on_headers_stop_iteration=f.get("allow_on_headers_stop_iteration", True))


def _gateway_entry_yaml(g, ecds_dir, failure_policy, allow_on_headers_stop_iteration):
    """ngsi-gateway's http_filters entry, in token-auth's place in the template."""
    lines = [
        f"# {g['about']}.",
        "# The default HTTP sidecar (render.py --separate renders the separate filters instead).",
        "# The notes on token-auth above are about its token_auth stage. The configuration",
        "# holds each stage's under its key (token_auth, device_ownership, entity_acl); the",
        "# identity passes from stage to stage in memory. allow_on_headers_stop_iteration is",
        "# true when a stage after token-auth decides on the body.",
    ]
    return _indent(lines, 10) + "\n" + filter_entry_yaml(
        g["name"], g["wasm"], g["config"], 10, ecds_dir, failure_policy=failure_policy,
        allow_on_headers_stop_iteration=(g["allow_on_headers_stop_iteration"]
                                         or allow_on_headers_stop_iteration))


def write_atomically(path, data):
    """Writes `data` (JSON-serializable) to `path` by rename: a temporary file in the same
    directory, then os.rename. Envoy's watched_directory reacts to the rename (never sees a
    half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ecds_path(ecds_dir, name=ECDS_NAME):
    return os.path.join(os.path.abspath(ecds_dir), f"{name}.json")


def write_ecds_resources(ecds_dir, filter_config, wasm=None, extra_filters=(),
                         allow_on_headers_stop_iteration=False,
                         failure_policy=DEFAULT_FAILURE_POLICY, separate=False):
    """Writes every filter's first ECDS resource: ngsi-gateway.json alone (`wasm`:
    ngsi_gateway.wasm by default); with `separate`, token-auth.json (`wasm`: token_auth.wasm by
    default) and <name>.json for each filter after it."""
    if not separate:
        g = gateway_filter(filter_config, extra_filters, wasm)
        write_atomically(ecds_path(ecds_dir, g["name"]), ecds_resource(
            g["config"], g["wasm"], name=g["name"], failure_policy=failure_policy,
            allow_on_headers_stop_iteration=(g["allow_on_headers_stop_iteration"]
                                             or allow_on_headers_stop_iteration)))
        return
    check_identity_headers(json_object(filter_config, "token-auth"), extra_filters)
    check_broker(extra_filters)
    write_atomically(ecds_path(ecds_dir), ecds_resource(
        filter_config, wasm or DEFAULT_WASM,
        allow_on_headers_stop_iteration=allow_on_headers_stop_iteration,
        failure_policy=failure_policy))
    for f in extra_filters:
        write_atomically(ecds_path(ecds_dir, f["name"]), ecds_resource(
            f["config"], f["wasm"],
            allow_on_headers_stop_iteration=f.get("allow_on_headers_stop_iteration", True),
            name=f["name"], failure_policy=failure_policy))


def upstream_tls_socket(tls, what):
    """A cluster's upstream TLS `transport_socket` (YAML lines at the cluster's indentation), or
    [] without `tls`. `tls` = {"cert", "key": the client certificate Envoy presents (mTLS: the
    service knows the sidecar by it), "ca": verify the service's certificate against this CA
    (optional), "server_name": SNI, and the name the service's certificate must carry (a DNS
    name or an IP address; optional)}. Files must exist; paths are made absolute."""
    if not tls:
        return []
    unknown = set(tls) - {"cert", "key", "ca", "server_name"}
    if unknown:
        raise ValueError(f"{what}: unknown TLS options {sorted(unknown)}")
    if not tls.get("cert") or not tls.get("key"):
        raise ValueError(f"{what}: a client certificate needs both cert and key")
    files = {}
    for option in ("cert", "key", "ca"):
        if tls.get(option):
            if not os.path.isfile(tls[option]):
                raise ValueError(f"{what}: {option} {tls[option]} does not exist")
            files[option] = yaml_string(os.path.abspath(tls[option]))
    lines = [
        "transport_socket:",
        "  name: envoy.transport_sockets.tls",
        "  typed_config:",
        '    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
    ]
    name = tls.get("server_name")
    if name:
        if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", name):
            raise ValueError(f"{what}: server_name {name!r} is not a host name or IP address")
        lines.append(f"    sni: {yaml_string(name)}")
    lines += [
        "    common_tls_context:",
        "      tls_params: { tls_minimum_protocol_version: TLSv1_2 }",
        "      tls_certificates:",
        f"      - certificate_chain: {{ filename: {files['cert']} }}",
        f"        private_key: {{ filename: {files['key']} }}",
    ]
    if "ca" in files:
        lines += ["      validation_context:",
                  f"        trusted_ca: {{ filename: {files['ca']} }}"]
        if name:
            san_type = "IP_ADDRESS" if _IPV4.match(name) or ":" in name else "DNS"
            lines += ["        match_typed_subject_alt_names:",
                      f"        - san_type: {san_type}",
                      f"          matcher: {{ exact: {yaml_string(name)} }}"]
    return lines


_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# Clusters the templates define themselves (an --http-cluster may not take their names).
_TEMPLATE_CLUSTERS = ("broker", "idp", "owners", "mosquitto", "mqtt_acl_refusal")


def parse_http_cluster(value):
    """--http-cluster NAME=HOST:PORT -> (NAME, "HOST:PORT"), checked; ValueError says what is
    wrong."""
    name, sep, address = value.partition("=")
    if not sep or not _CLUSTER_NAME.fullmatch(name):
        raise ValueError(f"--http-cluster {value!r}: expected NAME=HOST:PORT, NAME of letters, "
                         "digits, '_', '.' or '-'")
    if name in _TEMPLATE_CLUSTERS:
        raise ValueError(f"--http-cluster {value!r}: {name} is a cluster of the template itself")
    split_host_port(address, f"--http-cluster {name}")
    return name, address


def plain_cluster(name, address, comment, tls=None):
    """A plain HTTP/1.1 cluster `name` at host:port, YAML lines at the clusters list's
    indentation (e.g. the web app an mqtt-acl http_backend asks); with `tls`
    (upstream_tls_socket's), Envoy calls it over TLS with its client certificate."""
    host, port = split_host_port(address, name)
    kind = "STATIC" if _IPV4.match(host) else "STRICT_DNS"
    lines = [
        f"# {comment}",
        f"- name: {name}",
        f"  type: {kind}",
        "  connect_timeout: 1s",
        "  dns_lookup_family: V4_ONLY",
        "  load_assignment:",
        f"    cluster_name: {name}",
        "    endpoints:",
        "    - lb_endpoints:",
        "      - endpoint:",
        f"          address: {{ socket_address: {{ address: {host}, port_value: {port} }} }}",
    ]
    lines += ["  " + line for line in upstream_tls_socket(tls, name)]
    return _indent(lines, 2)


def owners_cluster(owners, tls=None):
    """The "owners" cluster (an ownership registry device-ownership calls), YAML lines at the
    clusters list's indentation; `tls` as plain_cluster's."""
    return plain_cluster(
        "owners", owners,
        "The ownership registry device-ownership asks (see filters/device-ownership/README.md).",
        tls)


def render(
    filter_config,
    listen="127.0.0.1:10000",
    admin="127.0.0.1:9901",
    broker="127.0.0.1:1026",
    idp="127.0.0.1:3000",
    wasm=None,
    node_id="iot-sidecar",
    allow_on_headers_stop_iteration=False,
    template_path=TEMPLATE,
    tls_cert=None,
    tls_key=None,
    client_ca=None,
    ecds_dir=None,
    extra_filters=(),
    owners=None,
    failure_policy=DEFAULT_FAILURE_POLICY,
    exact_balance=False,
    separate=False,
    http_clusters=(),
    owners_tls=None,
):
    """Returns the rendered YAML: by default the chain token-auth -> `extra_filters` as
    ngsi-gateway, one filter whose stages they are (`wasm`: ngsi_gateway.wasm by default; with
    `ecds_dir` its resource is ngsi-gateway.json); with `separate`, each as its own filter
    (`wasm`: token_auth.wasm by default). A chain the gateway cannot run as given raises
    ValueError naming separate=True. `filter_config` is token-auth's, a dict or a JSON string
    (an object); None leaves token-auth out (tests only, `separate` only: later filters then
    trust identity headers from the client). `extra_filters`: chain_filter(...)s after
    token-auth, in order. `owners`: HOST:PORT of an ownership registry (cluster "owners", for
    device-ownership); `owners_tls`: call it over TLS with a client certificate (mTLS; see
    upstream_tls_socket). `http_clusters`: (name, "host:port"[, tls]) of other HTTP services
    the filters ask (a device registry, say), as render_mqtt's.
    `failure_policy`: every wasm filter's ("reload", the default, or "fail-closed").
    `exact_balance`: the listener spreads connections evenly over the workers (tests use it to
    reach every worker's VM deterministically).
    With `ecds_dir`, every filter is discovered by ECDS (its configuration then lives in its
    resource file: write them with write_ecds_resources(...))."""
    without_token_auth = filter_config is None and not ecds_dir
    gateway = None if separate else gateway_filter(filter_config, extra_filters, wasm)
    wasm = wasm or DEFAULT_WASM
    # None: only for tests whose requests carry identity headers themselves (tests/e2e parity).
    filter_config = json_object({} if without_token_auth else filter_config, "token-auth")
    template_path = template_path or TEMPLATE
    listen_host, listen_port = split_host_port(listen, "--listen", allow_zero=True)
    admin_host, admin_port = split_host_port(admin, "--admin", allow_zero=True)
    broker_host, broker_port = split_host_port(broker, "--broker")
    idp_host, idp_port = split_host_port(idp, "--idp")
    check_node_id(node_id, "--node-id")
    if not without_token_auth:
        check_identity_headers(filter_config, extra_filters)
    check_broker(extra_filters)
    wasm = os.path.abspath(wasm)
    failure_policy = failure_policy_value(failure_policy)
    params = {
        "NODE_ID": node_id,
        "LISTEN_ADDRESS": listen_host,
        "LISTEN_PORT": listen_port,
        "ADMIN_ADDRESS": admin_host,
        "ADMIN_PORT": admin_port,
        "BROKER_ADDRESS": broker_host,
        "BROKER_PORT": broker_port,
        "BROKER_CLUSTER_TYPE": "STATIC" if _IPV4.match(broker_host) else "STRICT_DNS",
        "IDP_ADDRESS": idp_host,
        "IDP_PORT": idp_port,
        "IDP_CLUSTER_TYPE": "STATIC" if _IPV4.match(idp_host) else "STRICT_DNS",
        "TOKEN_AUTH_FILTER": _gateway_entry_yaml(
            gateway, ecds_dir, failure_policy,
            allow_on_headers_stop_iteration) if gateway else filter_entry_yaml(
            ECDS_NAME, wasm, filter_config, 10, ecds_dir, failure_policy=failure_policy,
            allow_on_headers_stop_iteration=allow_on_headers_stop_iteration),
        "FAILURE_POLICY": failure_policy,
        "CONNECTION_BALANCE": _indent([
            "# Tests: hand connections to the workers in turn, so that fresh connections reach",
            "# every worker's VM (by default the kernel picks, and one worker may get them all).",
            "connection_balance_config: { exact_balance: {} }"], 4) if exact_balance else "",
        "TRANSPORT_SOCKET": transport_socket(tls_cert, tls_key, client_ca),
        "MORE_HTTP_FILTERS": "" if gateway else "\n".join(
            _chain_filter_yaml(f, n, ecds_dir, failure_policy)
            for n, f in enumerate(extra_filters, start=2)),
        "EXTRA_CLUSTERS": "\n".join(
            ([owners_cluster(owners, owners_tls)] if owners else [])
            + [plain_cluster(name, address, "An HTTP service the filters ask.", *tls)
               for name, address, *tls in http_clusters]),
    }
    with open(template_path, encoding="utf-8") as f:
        text = f.read()
    if without_token_auth:
        text = re.sub(r"\n *# <token-auth>.*?# </token-auth>", "", text, flags=re.S)
    return string.Template(text).substitute(params)


def validate_chain(token_auth_config, token_auth_wasm, extra_filters):
    """Every filter of the chain must accept its configuration offline (the real .wasm in
    host-harness), before anything is written."""
    def warn(message):
        print(f"render.py: {message}", file=sys.stderr)
    validate_offline(ECDS_NAME, token_auth_wasm, token_auth_config, warn)
    for f in extra_filters:
        validate_offline(f["name"], f["wasm"], f["config"], warn)


# The command line's defaults for the HTTP sidecar and (--mqtt) the MQTT one.
HTTP_CLI_DEFAULTS = {"listen": "127.0.0.1:10000", "admin": "127.0.0.1:9901",
                     "broker": "127.0.0.1:1026", "node_id": "iot-sidecar"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter-config", required=True,
                        help="token-auth JSON configuration file (with --mqtt: mqtt-acl's)")
    parser.add_argument("--mqtt", action="store_true",
                        help="render the MQTT sidecar (mqtt-sidecar.yaml: mqtt-acl in front of an"
                             " MQTT broker) instead of the HTTP one")
    parser.add_argument("--websocket", action="store_true",
                        help="with --mqtt: MQTT over WebSockets (mqtt-acl's \"transport\":"
                             " \"websocket\") in front of the broker's WebSocket listener"
                             " (defaults: --listen 127.0.0.1:8083, --broker 127.0.0.1:9001)")
    parser.add_argument("--out", help="output file (default: standard output)")
    parser.add_argument("--listen", help="listener HOST:PORT (default 127.0.0.1:10000;"
                                         " --mqtt: 127.0.0.1:1883)")
    parser.add_argument("--admin", help="admin interface HOST:PORT (default 127.0.0.1:9901;"
                                        " --mqtt: 127.0.0.1:9902)")
    parser.add_argument("--broker", help="NGSI broker HOST:PORT (default 127.0.0.1:1026;"
                                         " --mqtt: the MQTT broker, 127.0.0.1:11883)")
    parser.add_argument("--idp", default="127.0.0.1:3000", help="identity provider HOST:PORT")
    parser.add_argument("--wasm", help="ngsi_gateway.wasm path (--separate: token_auth.wasm;"
                                       " --mqtt: mqtt_acl.wasm)")
    parser.add_argument("--node-id", help="Envoy's node id (default iot-sidecar; --mqtt:"
                                          " iot-mqtt-sidecar)")
    parser.add_argument(
        "--allow-on-headers-stop-iteration",
        action="store_true",
        help="let the filter's body callbacks run while it pauses (see sidecar.yaml)",
    )
    parser.add_argument("--tls-cert", help="HTTPS: the listener's certificate chain (PEM)")
    parser.add_argument("--tls-key", help="HTTPS: its private key (PEM)")
    parser.add_argument("--client-ca", help="mTLS: require client certificates signed by this CA")
    parser.add_argument("--ecds", metavar="DIR",
                        help="filter configurations from DIR/<filter>.json (ECDS, reloadable)")
    for name, (wasm_file, _) in CHAIN_FILTERS.items():
        parser.add_argument(f"--{name}-config", metavar="FILE",
                            help=f"add {name} after token-auth with this JSON configuration"
                                 " (a stage of ngsi-gateway; with --separate its own filter)")
        parser.add_argument(f"--{name}-wasm", default=os.path.join(WASM_DIR, wasm_file),
                            help=f"{wasm_file} path (--separate only)")
    parser.add_argument("--separate", action="store_true",
                        help="run token-auth and the filters after it as separate filters"
                             " (token_auth.wasm, device_ownership.wasm, entity_acl.wasm)"
                             " instead of ngsi-gateway, the default (one module, one pass)")
    parser.add_argument("--gateway", action="store_true",
                        help="the default (ngsi-gateway); accepted so that scripts written"
                             " when it was a switch keep working")
    parser.add_argument("--owners", metavar="HOST:PORT",
                        help="ownership registry for device-ownership (cluster \"owners\")")
    parser.add_argument("--owners-tls-cert", metavar="PEM",
                        help="call the ownership registry over TLS, presenting this client"
                             " certificate (mTLS; with --owners-tls-key)")
    parser.add_argument("--owners-tls-key", metavar="PEM", help="its private key")
    parser.add_argument("--owners-tls-ca", metavar="PEM",
                        help="verify the registry's certificate against this CA")
    parser.add_argument("--owners-tls-server-name", metavar="NAME",
                        help="SNI, and the name (DNS or IP) the registry's certificate must carry")
    parser.add_argument("--http-cluster", metavar="NAME=HOST:PORT", action="append", default=[],
                        help="an HTTP service the filters ask, as a plain cluster NAME (a device"
                             " registry, an http_backend's web app, an introspection endpoint);"
                             " repeatable; HTTP and --mqtt sidecars")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the offline check (host-harness validate) of each filter's"
                             " configuration against its .wasm")
    parser.add_argument("--failure-policy", choices=list(FAILURE_POLICIES), default="reload",
                        help="when a filter's VM fails: refuse that request and start a fresh VM"
                             " (reload, the default), or refuse every request until a restart"
                             " (fail-closed); see envoy/README.md")
    args = parser.parse_args(argv)
    if args.mqtt:
        return _main_mqtt(parser, args)
    if args.websocket:
        print("render.py: --websocket only applies with --mqtt", file=sys.stderr)
        return 2
    if args.gateway and args.separate:
        print("render.py: --gateway and --separate contradict each other (ngsi-gateway is the"
              " default; --separate renders the separate filters)", file=sys.stderr)
        return 2
    if args.wasm is None:
        args.wasm = DEFAULT_WASM if args.separate else DEFAULT_GATEWAY_WASM
    for option, default in HTTP_CLI_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    try:
        with open(args.filter_config, encoding="utf-8") as f:
            config = json.load(f)
        if not os.path.isfile(args.wasm):
            raise ValueError(f"--wasm: {args.wasm} does not exist (build it with `cargo wasm`)")
        for option in ("tls_cert", "tls_key", "client_ca"):
            value = getattr(args, option)
            if value and not os.path.isfile(value):
                raise ValueError(f"--{option.replace('_', '-')}: {value} does not exist")
        if args.ecds and not os.path.isdir(args.ecds):
            raise ValueError(f"--ecds: {args.ecds} is not a directory")
        http_clusters = [parse_http_cluster(value) for value in args.http_cluster]
        owners_tls = {option: getattr(args, f"owners_tls_{option}")
                      for option in ("cert", "key", "ca", "server_name")
                      if getattr(args, f"owners_tls_{option}")}
        if owners_tls and not args.owners:
            raise ValueError("--owners-tls-*: give --owners too")
        extra_filters = []
        for name in CHAIN_FILTERS:
            option = name.replace("-", "_")
            config_file = getattr(args, f"{option}_config")
            if config_file is None:
                continue
            wasm = getattr(args, f"{option}_wasm")
            if not args.separate:
                if wasm != parser.get_default(f"{option}_wasm"):
                    raise ValueError(f"--{name}-wasm: with ngsi-gateway (the default) {name} is "
                                     "a stage of --wasm's module; --separate runs it as its own"
                                     " filter")
                wasm = None  # a stage: not loaded on its own
            elif not os.path.isfile(wasm):
                raise ValueError(f"--{name}-wasm: {wasm} does not exist (build it with `cargo wasm`)")
            with open(config_file, encoding="utf-8") as f:
                extra_filters.append(chain_filter(name, json.load(f), wasm))
        gateway = None if args.separate else gateway_filter(config, extra_filters, args.wasm)
        if args.no_validate:
            pass
        elif gateway:
            validate_offline(gateway["name"], gateway["wasm"], gateway["config"],
                             lambda message: print(f"render.py: {message}", file=sys.stderr))
        else:
            validate_chain(config, args.wasm, extra_filters)
        text = render(
            config,
            listen=args.listen,
            admin=args.admin,
            broker=args.broker,
            idp=args.idp,
            wasm=args.wasm,
            node_id=args.node_id,
            allow_on_headers_stop_iteration=args.allow_on_headers_stop_iteration,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            ecds_dir=args.ecds,
            extra_filters=extra_filters,
            owners=args.owners,
            owners_tls=owners_tls,
            failure_policy=args.failure_policy,
            separate=args.separate,
            http_clusters=http_clusters,
        )
        if args.ecds:
            write_ecds_resources(args.ecds, config, args.wasm, extra_filters,
                                 allow_on_headers_stop_iteration=args.allow_on_headers_stop_iteration,
                                 failure_policy=args.failure_policy, separate=args.separate)
    except (OSError, ValueError) as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.ecds:
        written = [GATEWAY_NAME] if not args.separate else \
            ["token-auth"] + [f["name"] for f in extra_filters]
        for name in written:
            print(f"render.py: wrote {name}'s ECDS resource {ecds_path(args.ecds, name)}",
                  file=sys.stderr)
    return 0



# ------------------------------------------------------------------------------------------------
# mqtt-acl: Envoy in front of an MQTT broker (envoy/mqtt-sidecar.yaml)

MQTT_TEMPLATE = os.path.join(HERE, "mqtt-sidecar.yaml")
DEFAULT_MQTT_WASM = os.path.join(WASM_DIR, "mqtt_acl.wasm")
# mqtt-acl's filter name, vm_id and (with ecds_dir) ECDS resource name: <ecds_dir>/mqtt-acl.json.
MQTT_ECDS_NAME = "mqtt-acl"


def write_mqtt_ecds_resource(ecds_dir, filter_config, wasm=DEFAULT_MQTT_WASM,
                             failure_policy=DEFAULT_FAILURE_POLICY):
    """Writes mqtt-acl's first ECDS resource, ecds_dir/mqtt-acl.json (atomically), for
    render_mqtt(..., ecds_dir=ecds_dir); returns its path."""
    path = ecds_path(ecds_dir, MQTT_ECDS_NAME)
    write_atomically(path, ecds_resource(json_object(filter_config, MQTT_ECDS_NAME), wasm,
                                         name=MQTT_ECDS_NAME, failure_policy=failure_policy,
                                         network=True))
    return path


def render_mqtt(
    filter_config,
    listen="127.0.0.1:1883",
    admin="127.0.0.1:9902",
    broker="127.0.0.1:11883",
    wasm=DEFAULT_MQTT_WASM,
    node_id="iot-mqtt-sidecar",
    tls_cert=None,
    tls_key=None,
    client_ca=None,
    template_path=MQTT_TEMPLATE,
    failure_policy=DEFAULT_FAILURE_POLICY,
    exact_balance=False,
    ecds_dir=None,
    http_clusters=(),
    websocket=False,
):
    """Returns envoy/mqtt-sidecar.yaml rendered: listener -> mqtt-acl (network wasm filter) ->
    tcp_proxy -> cluster "mosquitto". `filter_config` is mqtt-acl's configuration, a dict or a
    JSON string (an object). tls_cert/tls_key make the listener MQTT over TLS; client_ca also
    requires client certificates signed by that CA (mTLS). `failure_policy` as render()'s.
    exact_balance spreads connections evenly over the workers (connection_balance_config), e.g.
    so a test reaches every worker. With `ecds_dir`, mqtt-acl is discovered by ECDS from
    ecds_dir/mqtt-acl.json instead of inline (reloadable with envoy/push-config; write the
    first resource with write_mqtt_ecds_resource(...)). `http_clusters`: (name, "host:port"[, tls])
    of HTTP clusters to add, e.g. the web app of mqtt-acl's http_backend or its device registry;
    with `tls` (upstream_tls_socket's dict) Envoy calls it over TLS with a client certificate.
    `websocket`: MQTT over WebSockets (browsers, the npm `mqtt` package): the filter's
    configuration gets "transport": "websocket" and `broker` is the broker's WebSocket listener
    (Mosquitto: `listener 9001` + `protocol websockets`); with tls_cert/tls_key clients use wss://."""
    filter_config = json_object(filter_config, "mqtt-acl")
    if websocket:
        filter_config = websocket_config(filter_config)
    listen_host, listen_port = split_host_port(listen, "listen", allow_zero=True)
    admin_host, admin_port = split_host_port(admin, "admin", allow_zero=True)
    broker_host, broker_port = split_host_port(broker, "broker")
    check_node_id(node_id, "node_id")
    # The HTTP listener's TLS settings, without its HTTP ALPN protocols.
    tls = "\n".join(line for line in transport_socket(tls_cert, tls_key, client_ca).split("\n")
                    if "alpn_protocols" not in line)
    params = {
        "NODE_ID": node_id,
        "LISTEN_ADDRESS": listen_host,
        "LISTEN_PORT": listen_port,
        "ADMIN_ADDRESS": admin_host,
        "ADMIN_PORT": admin_port,
        "BROKER_ADDRESS": broker_host,
        "BROKER_PORT": broker_port,
        "BROKER_CLUSTER_TYPE": "STATIC" if _IPV4.match(broker_host) else "STRICT_DNS",
        "MQTT_ACL_FILTER": filter_entry_yaml(MQTT_ECDS_NAME, wasm, filter_config, 6, ecds_dir,
                                             network=True, failure_policy=failure_policy),
        "FAILURE_POLICY": failure_policy_value(failure_policy),
        "TRANSPORT_SOCKET": tls,
        "CONNECTION_BALANCE": ("    connection_balance_config: { exact_balance: {} }\n"
                               if exact_balance else ""),
    }
    with open(template_path, encoding="utf-8") as f:
        text = string.Template(f.read()).substitute(params)
    for name, address, *tls in http_clusters:
        cluster = plain_cluster(name, address, "An HTTP service the filter asks.", *tls)
        text = text.replace("\n  clusters:\n", f"\n  clusters:\n{cluster}\n", 1)
    return text


def websocket_config(filter_config):
    """mqtt-acl's configuration for MQTT over WebSockets ("transport": "websocket")."""
    return {**filter_config, "transport": "websocket"}


MQTT_CLI_DEFAULTS = {"listen": "127.0.0.1:1883", "admin": "127.0.0.1:9902",
                     "broker": "127.0.0.1:11883", "wasm": DEFAULT_MQTT_WASM,
                     "node_id": "iot-mqtt-sidecar"}
# --mqtt --websocket: in front of Mosquitto's WebSocket listener (`listener 9001`, `protocol
# websockets`), clients on 8083.
MQTT_WEBSOCKET_CLI_DEFAULTS = {"listen": "127.0.0.1:8083", "broker": "127.0.0.1:9001"}
# HTTP-only options, refused with --mqtt (their parser defaults, to tell whether one was given).
_HTTP_ONLY_OPTIONS = ("idp", "allow_on_headers_stop_iteration", "owners", "gateway", "separate",
                      *(f"{name.replace('-', '_')}_config" for name in CHAIN_FILTERS))


def _main_mqtt(parser, args):
    """render.py --mqtt: envoy/mqtt-sidecar.yaml with --filter-config as mqtt-acl's
    configuration; with --ecds DIR, mqtt-acl is discovered from DIR/mqtt-acl.json, written here
    (as for the HTTP sidecar)."""
    given = [o for o in _HTTP_ONLY_OPTIONS if getattr(args, o) != parser.get_default(o)]
    if given:
        print(f"render.py: --mqtt: {', '.join('--' + o.replace('_', '-') for o in given)} "
              "only apply to the HTTP sidecar", file=sys.stderr)
        return 2
    defaults = dict(MQTT_CLI_DEFAULTS)
    if args.websocket:
        defaults.update(MQTT_WEBSOCKET_CLI_DEFAULTS)
    for option, default in defaults.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    try:
        with open(args.filter_config, encoding="utf-8") as f:
            config = json_object(json.load(f), MQTT_ECDS_NAME)
        if args.websocket:
            config = websocket_config(config)
        if not os.path.isfile(args.wasm):
            raise ValueError(f"--wasm: {args.wasm} does not exist (build it with `cargo wasm`)")
        for option in ("tls_cert", "tls_key", "client_ca"):
            value = getattr(args, option)
            if value and not os.path.isfile(value):
                raise ValueError(f"--{option.replace('_', '-')}: {value} does not exist")
        if args.ecds and not os.path.isdir(args.ecds):
            raise ValueError(f"--ecds: {args.ecds} is not a directory")
        if not args.no_validate:
            validate_offline(MQTT_ECDS_NAME, args.wasm, config,
                             lambda message: print(f"render.py: {message}", file=sys.stderr))
        text = render_mqtt(config, listen=args.listen, admin=args.admin, broker=args.broker,
                           wasm=args.wasm, node_id=args.node_id, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, client_ca=args.client_ca,
                           failure_policy=args.failure_policy, ecds_dir=args.ecds,
                           http_clusters=[parse_http_cluster(v) for v in args.http_cluster])
        written = (write_mqtt_ecds_resource(args.ecds, config, args.wasm, args.failure_policy)
                   if args.ecds else None)
    except (OSError, ValueError) as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if written:
        print(f"render.py: wrote {MQTT_ECDS_NAME}'s ECDS resource {written}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------
# Offline validation and module files: what render.py and push-config check before Envoy sees
# a configuration.

HOST_HARNESS_CANDIDATES = (
    os.path.join(ROOT, "target", "release", "host-harness"),
    os.path.join(ROOT, "target", "debug", "host-harness"),
)


def host_harness():
    """The host-harness binary ($HOST_HARNESS, else the workspace's build), or None."""
    explicit = os.environ.get("HOST_HARNESS")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return next((p for p in HOST_HARNESS_CANDIDATES if os.access(p, os.X_OK)), None)


def validate_offline(name, wasm, filter_config, warn=None):
    """Starts `wasm` with `filter_config` (dict or JSON text: the exact plugin configuration
    string Envoy would get) in host-harness, as Envoy starts plugin `name`. Returns None if it
    accepted; raises ValueError with the filter's reason if it refused. Without a built
    harness, says so through `warn` (loudly: nothing was checked) and returns "not validated"."""
    import subprocess
    import tempfile

    harness = host_harness()
    if harness is None:
        (warn or print)(f"WARNING: {name}: configuration NOT validated offline: host-harness is "
                        "not built (cargo build --release -p host-harness, or set $HOST_HARNESS)")
        return "not validated"
    text = filter_config if isinstance(filter_config, str) else json.dumps(
        json_object(filter_config, name), separators=(",", ":"))
    # The variables the configuration takes secrets from, with a placeholder: what is checked
    # is the configuration; Envoy's environment is checked when Envoy starts the filter.
    env = [arg for n in secret_env_names(text) for arg in ("--env", f"{n}=placeholder")]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(text)
    try:
        done = subprocess.run([harness, "validate", "--name", name, *env, wasm, f.name],
                              capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    if done.returncode == 0:
        return None
    said = (done.stdout + done.stderr).strip().replace(f.name, "<configuration>")
    if done.returncode == 1:
        raise ValueError(f"{name}: the filter refuses this configuration (host-harness "
                         f"validate):\n{said}")
    raise ValueError(f"{name}: {harness} validate could not check it (exit {done.returncode};"
                     f" rebuild the harness, or --no-validate):\n{said}")


def check_local_code(plugin, what):
    """Refuses a wasm PluginConfig whose module is not a local file. A `remote` (HTTP +
    sha256) source makes Envoy fetch at run time: in an ECDS update, Envoy 1.40 acknowledges it
    and serves requests without the filter if the fetch fails; and the module's integrity then
    rests on the fetch. Local files, named by content (install_module), have neither problem."""
    code = ((plugin.get("vm_config") or {}).get("code") or {})
    if "local" not in code or "remote" in code:
        raise ValueError(f"{what}: the wasm module must come from a local file (vm_config.code."
                         "local.filename); a remote source is refused: Envoy would fetch it at "
                         "run time, and a failed fetch in an update leaves the listener without "
                         "the filter")


def install_module(wasm, modules_dir, name):
    """Copies `wasm` to modules_dir/<name>-<sha256 prefix>.wasm (atomically; kept if already
    there) and returns that path. A module file is never changed once written, so a reload
    never swaps the bytes under an Envoy worker that is still reading the previous one."""
    import hashlib
    import shutil

    with open(wasm, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    os.makedirs(modules_dir, exist_ok=True)
    target = os.path.join(modules_dir, f"{name}-{digest}.wasm")
    if not os.path.isfile(target):
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.copyfile(wasm, tmp)
        os.rename(tmp, target)
    return os.path.abspath(target)


if __name__ == "__main__":
    sys.exit(main())
