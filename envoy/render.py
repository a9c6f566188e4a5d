#!/usr/bin/env python3
"""Renders envoy/sidecar.yaml (a template) into a configuration Envoy can load.

    python3 envoy/render.py --filter-config token-auth.json [--out sidecar.yaml]
        [--listen 127.0.0.1:10000] [--admin 127.0.0.1:9901]
        [--broker 127.0.0.1:1026] [--idp 127.0.0.1:3000]
        [--wasm target/wasm32-wasip1/release/token_auth.wasm]
        [--node-id iot-sidecar] [--allow-on-headers-stop-iteration]

--filter-config is the token-auth configuration (JSON, see filters/policy/src/token_auth.rs);
it is checked to be a JSON object and embedded as the plugin's configuration string. Port 0 for
--listen or --admin lets the kernel choose (read them back from the admin interface, or with
envoy --admin-address-path). Addresses
may be IP addresses (STATIC clusters) or host names (STRICT_DNS clusters). The .wasm path is
made absolute. Only the standard library is used; `render()` is importable (tests/e2e uses it).
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
DEFAULT_WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "token_auth.wasm")

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


def render(
    filter_config,
    listen="127.0.0.1:10000",
    admin="127.0.0.1:9901",
    broker="127.0.0.1:1026",
    idp="127.0.0.1:3000",
    wasm=DEFAULT_WASM,
    node_id="iot-sidecar",
    allow_on_headers_stop_iteration=False,
    template_path=TEMPLATE,
):
    """Returns the rendered YAML. `filter_config` is a dict or a JSON string (an object)."""
    if isinstance(filter_config, str):
        filter_config = json.loads(filter_config)
    if not isinstance(filter_config, dict):
        raise ValueError("the filter configuration must be a JSON object")
    listen_host, listen_port = split_host_port(listen, "--listen", allow_zero=True)
    admin_host, admin_port = split_host_port(admin, "--admin", allow_zero=True)
    broker_host, broker_port = split_host_port(broker, "--broker")
    idp_host, idp_port = split_host_port(idp, "--idp")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", node_id):
        raise ValueError(f"--node-id: {node_id!r} must be letters, digits, '.', '_' or '-'")
    wasm = os.path.abspath(wasm)
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
        "WASM_PATH": yaml_string(wasm),
        "FILTER_CONFIG": yaml_string(json.dumps(filter_config, separators=(",", ":"))),
        "ALLOW_ON_HEADERS_STOP_ITERATION": "true" if allow_on_headers_stop_iteration else "false",
    }
    with open(template_path, encoding="utf-8") as f:
        template = string.Template(f.read())
    return template.substitute(params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter-config", required=True, help="token-auth JSON configuration file")
    parser.add_argument("--out", help="output file (default: standard output)")
    parser.add_argument("--listen", default="127.0.0.1:10000", help="listener HOST:PORT")
    parser.add_argument("--admin", default="127.0.0.1:9901", help="admin interface HOST:PORT")
    parser.add_argument("--broker", default="127.0.0.1:1026", help="NGSI broker HOST:PORT")
    parser.add_argument("--idp", default="127.0.0.1:3000", help="identity provider HOST:PORT")
    parser.add_argument("--wasm", default=DEFAULT_WASM, help="token_auth.wasm path")
    parser.add_argument("--node-id", default="iot-sidecar")
    parser.add_argument(
        "--allow-on-headers-stop-iteration",
        action="store_true",
        help="let the filter's body callbacks run while it pauses (see sidecar.yaml)",
    )
    args = parser.parse_args(argv)
    try:
        with open(args.filter_config, encoding="utf-8") as f:
            config = json.load(f)
        if not os.path.isfile(args.wasm):
            raise ValueError(f"--wasm: {args.wasm} does not exist (build it with `cargo wasm`)")
        text = render(
            config,
            listen=args.listen,
            admin=args.admin,
            broker=args.broker,
            idp=args.idp,
            wasm=args.wasm,
            node_id=args.node_id,
            allow_on_headers_stop_iteration=args.allow_on_headers_stop_iteration,
        )
    except (OSError, ValueError) as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
