"""Every JSON example of filters/mqtt-acl/README.md is a configuration mqtt_acl.wasm accepts:
each goes through `host-harness validate` (render.validate_offline, what render.py runs before
Envoy gets a configuration), so the examples cannot drift from the schema. Placeholders (an
RSA key's "...", "<hex sha256 of the key>") are filled first; secrets taken from the
environment get a placeholder value, as render.py gives them. No Envoy runs here."""

import json
import os
import re

import pytest

import e2e_support as e2e

README = os.path.join(e2e.ROOT, "filters", "mqtt-acl", "README.md")
# A real 2048-bit modulus: the filter parses the key.
RSA_N = ("txLGjlGfw13K_5AM6x1KRHFgZA4015hqR6EhCbEqnN5C8bZ-3CKIFZbzdTmQ-8Womq7Cu_Dcp_1sUIeJ"
         "FC7ruioPr2wFR4RLsjaLS6gfpd7vy-c88G33rx_-pJT0y3jEEC5jg3GDdhIBV_dmuAyXu_rLV1DX9xHt"
         "YAt-ku3w9-OXiKpGoq5nKBrcf33oeYBqL0c1f1aqWOynBg1ypnp0wi8HuEzFvD2Se9of1dsveMlklo8z"
         "fCwXOOO4bMjXJ2gK3Wegtlfe25RI7uJsWXDbsDCzXDqFzBFLfn_mjLPFSp575Jhyvh5HNRKvOXhRgl3H"
         "gRjvILYd8yNi77akkPzaow")
PLACEHOLDERS = {
    '"n": "..."': f'"n": "{RSA_N}"',
    '"<hex sha256 of the key>"': '"' + "ab" * 32 + '"',
}


def examples():
    with open(README) as f:
        return re.findall(r"```json\n(.*?)\n```", f.read(), re.S)


def filled(text):
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return json.loads(text)


def validate(config):
    # None: accepted; "not validated" (no harness built) fails the test too.
    return e2e.render.validate_offline("mqtt-acl", e2e.MQTT_WASM, config)


def test_the_readme_has_its_examples():
    # The base configuration, http_backend, introspection, registry, bridge, bounds.
    assert len(examples()) >= 6


@pytest.mark.parametrize("index", range(len(examples())))
def test_every_readme_example_is_accepted(index):
    config = filled(examples()[index])
    assert validate(config) is None, examples()[index]


def test_the_base_example_is_accepted_over_websockets():
    config = filled(examples()[0])
    assert validate({**config, "transport": "websocket"}) is None
    # The check is real: a value or a key the schema lacks is refused.
    for wrong in ({"transport": "websockets"}, {"no_such_key": 1}):
        with pytest.raises(ValueError, match="refuses this configuration"):
            validate({**config, **wrong})
