//! Structure-aware generators: NGSI requests (every dialect), JSON bodies from a grammar and
//! their mutations, odd header bytes, chunking, tokens, callout answers and MQTT streams.
//! Everything draws from one seeded ChaCha stream, so a case is reproducible from its seed.

use rand::seq::SliceRandom;
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

pub type Rng = ChaCha8Rng;

/// True with probability `p`.
pub fn chance(rng: &mut Rng, p: f64) -> bool {
    rng.gen_bool(p)
}

pub fn pick<T: Clone>(rng: &mut Rng, items: &[T]) -> T {
    items
        .choose(rng)
        .cloned()
        .expect("pick from a non-empty list")
}

/// Bytes no well-behaved client sends: high bytes, NUL, CR/LF, DEL, commas, percent signs.
pub fn odd_bytes(rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max_len);
    (0..len)
        .map(|_| match rng.gen_range(0..6) {
            0 => rng.gen_range(0x80..=0xFF),
            1 => pick(rng, &[0u8, b'\r', b'\n', 0x7F, b'\t']),
            2 => pick(rng, b",%/#*\"\\;"),
            _ => rng.gen_range(0x20..0x7F),
        })
        .collect()
}

/// Valid UTF-8 text with the characters that break naive parsers (no bytes above 0x7F that
/// are not part of a character).
pub fn odd_text(rng: &mut Rng, max_len: usize) -> String {
    let len = rng.gen_range(0..=max_len);
    (0..len)
        .map(|_| match rng.gen_range(0..6) {
            0 => pick(rng, &['é', '€', '😀', '\u{202e}', '\u{FEFF}', 'ſ', 'K']),
            1 => pick(rng, &['\0', '\r', '\n', '\t', '\u{7f}']),
            2 => pick(
                rng,
                &[',', '%', '/', '#', '*', '"', '\\', '.', '?', '&', '='],
            ),
            _ => rng.gen_range(b'a'..=b'z') as char,
        })
        .collect()
}

/// Valid, plausible UTF-8 for a value, or odd text, or (when `raw_bytes`) arbitrary bytes.
pub fn header_value(rng: &mut Rng, plausible: &[&str], raw_bytes: bool) -> Vec<u8> {
    match rng.gen_range(0..10) {
        0..=6 => pick(rng, plausible).as_bytes().to_vec(),
        7 | 8 => odd_text(rng, 24).into_bytes(),
        _ if raw_bytes => odd_bytes(rng, 24),
        _ => odd_text(rng, 8).into_bytes(),
    }
}

pub const ENTITY_IDS: &[&str] = &[
    "urn:ngsi-ld:Room:1",
    "urn:ngsi-ld:Room:2",
    "urn:ngsi-ld:Room:vault1",
    "urn:ngsi-ld:Lamp:1",
    "Lamp1",
    "Room1",
    "lamp-01",
    "alice",
    "Park1",
    "Sensor1",
    "*",
    "urn:ngsi-ld:Room:*",
    "a%2Fb",
    "..",
    "%00",
    "Room%201",
];
pub const TYPES: &[&str] = &["Room", "Lamp", "Device", "Thing", "Sensor", "room", "*"];
pub const ATTRS: &[&str] = &[
    "temperature",
    "humidity",
    "owner",
    "delegations",
    "on",
    "location",
    "name",
    "secret",
];
pub const SERVICES: &[&str] = &[
    "smartcity",
    "openiot",
    "SmartCity",
    "",
    "other",
    "smart_city",
];
pub const SERVICE_PATHS: &[&str] = &[
    "/",
    "/rooms",
    "/rooms/#",
    "/devices",
    "/devices/#",
    "/#",
    "/rooms,/devices",
    "/lights",
    "rooms",
    "/rooms//a",
    "/a/#/b",
    "/rooms/..",
];
pub const SUBJECTS: &[&str] = &[
    "alice", "bob", "carol", "lamp-01", "operator", "a*", "a,b", "%41", "%zz", "",
];
pub const URLS: &[&str] = &[
    "http://quantumleap:8668/v2/notify",
    "http://quantumleap:8668/v2/../../admin",
    "http://evil.example/steal",
    "http://quantumleap:8668@evil.example/v2/",
    "",
    "not a url",
];

fn id(rng: &mut Rng) -> String {
    if chance(rng, 0.1) {
        odd_text(rng, 12)
    } else {
        pick(rng, ENTITY_IDS).to_string()
    }
}

fn list(rng: &mut Rng, items: &[&str], max: usize) -> Vec<String> {
    let n = rng.gen_range(1..=max);
    (0..n).map(|_| pick(rng, items).to_string()).collect()
}

/// The three NGSI dialects the model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    V2,
    Ld,
    FogFlow,
    Other,
}

/// A method and a path (with query) of some NGSI endpoint, mutated now and then.
pub fn ngsi_target(rng: &mut Rng) -> (String, String, Dialect) {
    let e = id(rng);
    let a = pick(rng, ATTRS);
    let (methods, path, dialect): (&[&str], String, Dialect) = match rng.gen_range(0..24) {
        0 => (&["GET", "POST"], "/v2/entities".into(), Dialect::V2),
        1 => (
            &["GET", "DELETE", "PATCH"],
            format!("/v2/entities/{e}"),
            Dialect::V2,
        ),
        2 => (
            &["GET", "POST", "PATCH", "PUT"],
            format!("/v2/entities/{e}/attrs"),
            Dialect::V2,
        ),
        3 => (
            &["GET", "PUT", "DELETE"],
            format!("/v2/entities/{e}/attrs/{a}"),
            Dialect::V2,
        ),
        4 => (
            &["GET", "PUT"],
            format!("/v2/entities/{e}/attrs/{a}/value"),
            Dialect::V2,
        ),
        5 => (&["GET"], "/v2/types".into(), Dialect::V2),
        6 => (&["POST"], "/v2/op/update".into(), Dialect::V2),
        7 => (&["POST"], "/v2/op/query".into(), Dialect::V2),
        8 => (&["GET", "POST"], "/v2/subscriptions".into(), Dialect::V2),
        9 => (
            &["GET", "PATCH", "DELETE"],
            format!(
                "/v2/subscriptions/{}",
                pick(rng, &["57458eb60962ef754e7c0998", "x"])
            ),
            Dialect::V2,
        ),
        10 => (&["GET", "POST"], "/v2/registrations".into(), Dialect::V2),
        11 => (&["GET", "POST"], "/ngsi-ld/v1/entities".into(), Dialect::Ld),
        12 => (
            &["GET", "DELETE", "PATCH"],
            format!("/ngsi-ld/v1/entities/{e}"),
            Dialect::Ld,
        ),
        13 => (
            &["POST", "PATCH"],
            format!("/ngsi-ld/v1/entities/{e}/attrs"),
            Dialect::Ld,
        ),
        14 => (
            &["POST"],
            format!(
                "/ngsi-ld/v1/entityOperations/{}",
                pick(rng, &["create", "upsert", "update", "delete", "query"])
            ),
            Dialect::Ld,
        ),
        15 => (
            &["GET", "POST"],
            "/ngsi-ld/v1/subscriptions".into(),
            Dialect::Ld,
        ),
        16 => (
            &["GET", "POST"],
            "/ngsi-ld/v1/csourceRegistrations".into(),
            Dialect::Ld,
        ),
        17 => (
            &["GET", "POST"],
            "/ngsi-ld/v1/temporal/entities".into(),
            Dialect::Ld,
        ),
        18 => (&["POST"], "/ngsi10/updateContext".into(), Dialect::FogFlow),
        19 => (&["POST"], "/ngsi10/queryContext".into(), Dialect::FogFlow),
        20 => (
            &["POST"],
            pick(
                rng,
                &["/ngsi10/subscribeContext", "/ngsi10/unsubscribeContext"],
            )
            .into(),
            Dialect::FogFlow,
        ),
        21 => (
            &["GET", "DELETE"],
            format!("/ngsi10/entity/{e}"),
            Dialect::FogFlow,
        ),
        22 => (
            &["POST"],
            pick(
                rng,
                &[
                    "/NGSI9/registerContext",
                    "/ngsi9/discoverContextAvailability",
                ],
            )
            .into(),
            Dialect::FogFlow,
        ),
        _ => (
            &["GET"],
            pick(rng, &["/version", "/", "/admin", "/v2", "/ngsi-ld/v1/"]).into(),
            Dialect::Other,
        ),
    };
    let mut method = pick(rng, methods).to_string();
    if chance(rng, 0.05) {
        method = pick(rng, &["OPTIONS", "HEAD", "get", "TRACE", "", "P\u{0}ST"]).into();
    }
    let mut path = path;
    if chance(rng, 0.5) {
        path.push('?');
        path.push_str(&query(rng));
    }
    if chance(rng, 0.08) {
        path = mutate_path(rng, &path);
    }
    (method, path, dialect)
}

/// A query string of NGSI parameters: id, type, attrs, q, idPattern, options, limit.
pub fn query(rng: &mut Rng) -> String {
    let mut params = Vec::new();
    let n = rng.gen_range(1..=4);
    for _ in 0..n {
        let p = match rng.gen_range(0..8) {
            0 => format!("id={}", list(rng, ENTITY_IDS, 4).join(",")),
            1 => format!("type={}", list(rng, TYPES, 3).join(",")),
            2 => format!("attrs={}", list(rng, ATTRS, 4).join(",")),
            3 => format!(
                "q={}",
                pick(
                    rng,
                    &["temperature>20", "name=='x';on==true", "a..b", "%27"]
                )
            ),
            4 => format!(
                "idPattern={}",
                pick(rng, &[".*", "urn:ngsi-ld:Room:.*", "(", ""])
            ),
            5 => format!(
                "options={}",
                pick(rng, &["keyValues", "count,values", "upsert"])
            ),
            6 => format!(
                "limit={}",
                pick(rng, &["10", "1000", "-1", "99999999999999999999"])
            ),
            _ => format!("{}={}", odd_text(rng, 4), odd_text(rng, 6)),
        };
        params.push(p);
    }
    params.join("&")
}

/// A list query expanding to `ids × attrs` accesses (per service path).
pub fn huge_query(rng: &mut Rng) -> (String, usize) {
    let ids = rng.gen_range(100..=1000);
    let attrs = rng.gen_range(100..=1000);
    let id_list: Vec<String> = (0..ids).map(|i| format!("urn:ngsi-ld:Room:{i}")).collect();
    let attr_list: Vec<String> = (0..attrs).map(|i| format!("a{i}")).collect();
    (
        format!(
            "/v2/entities?id={}&type=Room&attrs={}",
            id_list.join(","),
            attr_list.join(",")
        ),
        ids * attrs,
    )
}

fn mutate_path(rng: &mut Rng, path: &str) -> String {
    let mut p = path.to_string();
    let at = rng.gen_range(0..=p.len());
    let at = (0..=at).rev().find(|i| p.is_char_boundary(*i)).unwrap_or(0);
    let insert = pick(
        rng,
        &[
            "/..", "//", "%2F", "%2e%2e", "/./", "%00", "#", "?", ";", "é", "\\", "%",
        ],
    );
    p.insert_str(at, insert);
    p
}

/// A JSON value from a small grammar, down to `depth` levels.
pub fn json_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.gen_range(0..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(chance(rng, 0.5)),
        2 => json!(pick(rng, &[0.0, -1.5, 21.5, 1e300, -0.0])),
        3 => json!(rng.gen::<i64>()),
        4 => json!(odd_text(rng, 10)),
        5 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| json_value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..4) {
                let k = if chance(rng, 0.5) {
                    pick(rng, ATTRS).to_string()
                } else {
                    odd_text(rng, 6)
                };
                m.insert(k, json_value(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

fn attr_value(rng: &mut Rng, ld: bool) -> Value {
    if chance(rng, 0.15) {
        return json_value(rng, 2);
    }
    if ld {
        json!({"type": pick(rng, &["Property", "Relationship", "GeoProperty"]), "value": json_value(rng, 1)})
    } else {
        json!({"type": pick(rng, &["Number", "Text", "Boolean"]), "value": json_value(rng, 1)})
    }
}

fn entity(rng: &mut Rng, ld: bool) -> Value {
    let mut m = serde_json::Map::new();
    if chance(rng, 0.95) {
        m.insert("id".into(), json!(id(rng)));
    }
    if chance(rng, 0.85) {
        m.insert("type".into(), json!(pick(rng, TYPES)));
    }
    for _ in 0..rng.gen_range(0..3) {
        m.insert(pick(rng, ATTRS).into(), attr_value(rng, ld));
    }
    Value::Object(m)
}

fn entities(rng: &mut Rng, ld: bool) -> Vec<Value> {
    (0..rng.gen_range(0..4)).map(|_| entity(rng, ld)).collect()
}

fn selector(rng: &mut Rng) -> Value {
    let mut m = serde_json::Map::new();
    match rng.gen_range(0..3) {
        0 => m.insert("id".into(), json!(id(rng))),
        1 => m.insert(
            "idPattern".into(),
            json!(pick(rng, &[".*", "urn:ngsi-ld:Room:.*"])),
        ),
        _ => None,
    };
    if chance(rng, 0.7) {
        m.insert("type".into(), json!(pick(rng, TYPES)));
    }
    Value::Object(m)
}

fn fogflow_entity_id(rng: &mut Rng) -> Value {
    json!({"id": id(rng), "type": pick(rng, TYPES), "isPattern": pick(rng, &[json!(false), json!(true), json!("false")])})
}

/// A body for the endpoint at `path`: a valid-ish document of its dialect most of the time.
pub fn body_for(rng: &mut Rng, path: &str, dialect: Dialect) -> Value {
    let ld = dialect == Dialect::Ld;
    let p = path.split('?').next().unwrap_or(path);
    if chance(rng, 0.1) {
        return json_value(rng, 3);
    }
    if p.ends_with("/op/update") {
        return json!({"actionType": pick(rng, &["append", "appendStrict", "update", "delete", "replace", "APPEND", "upsert"]),
                      "entities": entities(rng, false)});
    }
    if p.ends_with("/op/query") {
        return json!({"entities": (0..rng.gen_range(0..3)).map(|_| selector(rng)).collect::<Vec<_>>(),
                      "attrs": list(rng, ATTRS, 3)});
    }
    if p.contains("subscriptions") {
        return if ld {
            json!({"type": "Subscription", "entities": (0..rng.gen_range(0..3)).map(|_| selector(rng)).collect::<Vec<_>>(),
                   "watchedAttributes": list(rng, ATTRS, 2),
                   "notification": {"endpoint": {"uri": pick(rng, URLS)}}})
        } else {
            json!({"subject": {"entities": (0..rng.gen_range(0..3)).map(|_| selector(rng)).collect::<Vec<_>>(),
                               "condition": {"attrs": list(rng, ATTRS, 2)}},
                   "notification": {"http": {"url": pick(rng, URLS)}, "attrs": list(rng, ATTRS, 2)}})
        };
    }
    if p.contains("egistration") {
        return if ld {
            json!({"type": "ContextSourceRegistration",
                   "information": [{"entities": (0..rng.gen_range(0..3)).map(|_| selector(rng)).collect::<Vec<_>>()}],
                   "endpoint": pick(rng, URLS)})
        } else {
            json!({"dataProvided": {"entities": (0..rng.gen_range(0..3)).map(|_| selector(rng)).collect::<Vec<_>>(), "attrs": list(rng, ATTRS, 2)},
                   "provider": {"http": {"url": pick(rng, URLS)}}})
        };
    }
    if p.contains("entityOperations") {
        return Value::Array(entities(rng, true));
    }
    if p.ends_with("/updateContext") {
        let elements: Vec<Value> = (0..rng.gen_range(0..3))
            .map(|_| {
                json!({"entityId": fogflow_entity_id(rng),
                       "attributes": [{"name": pick(rng, ATTRS), "type": "float", "value": json_value(rng, 1)}]})
            })
            .collect();
        return json!({"contextElements": elements,
                      "updateAction": pick(rng, &["UPDATE", "APPEND", "DELETE", "update", "REPLACE"])});
    }
    if p.ends_with("/queryContext") || p.ends_with("discoverContextAvailability") {
        return json!({"entities": (0..rng.gen_range(0..3)).map(|_| fogflow_entity_id(rng)).collect::<Vec<_>>(),
                      "attributes": list(rng, ATTRS, 2)});
    }
    if p.ends_with("/subscribeContext") {
        return json!({"entities": (0..rng.gen_range(0..3)).map(|_| fogflow_entity_id(rng)).collect::<Vec<_>>(),
                      "reference": pick(rng, URLS)});
    }
    if p.ends_with("/unsubscribeContext") {
        return json!({"subscriptionId": odd_text(rng, 8)});
    }
    if p.ends_with("registerContext") {
        return json!({"contextRegistrations": [{"entities": (0..rng.gen_range(0..3)).map(|_| fogflow_entity_id(rng)).collect::<Vec<_>>(),
                                                "providingApplication": pick(rng, URLS)}]});
    }
    if p.ends_with("/attrs") || p.contains("/attrs/") {
        let mut m = serde_json::Map::new();
        for _ in 0..rng.gen_range(0..3) {
            m.insert(pick(rng, ATTRS).into(), attr_value(rng, ld));
        }
        return Value::Object(m);
    }
    entity(rng, ld)
}

/// Serialises a body, then maybe breaks it: truncated, bytes flipped, huge numbers, deep
/// nesting, raw bytes.
pub fn body_bytes(rng: &mut Rng, value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("json");
    match rng.gen_range(0..20) {
        0 => {
            let cut = rng.gen_range(0..=bytes.len());
            bytes.truncate(cut);
        }
        1 => {
            for _ in 0..rng.gen_range(1..4) {
                if !bytes.is_empty() {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] = rng.gen();
                }
            }
        }
        2 => {
            let depth = rng.gen_range(100..2000);
            bytes = format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
        }
        3 => {
            let n = pick(
                rng,
                &[
                    "1e999999",
                    "-1e-999999",
                    "123456789012345678901234567890123456789",
                    "0.0000000000000000000000000001",
                ],
            );
            bytes = format!("{{\"id\":\"urn:ngsi-ld:Room:1\",\"type\":\"Room\",\"temperature\":{{\"value\":{n}}}}}").into_bytes();
        }
        4 => bytes = odd_bytes(rng, 64),
        5 => {
            // Duplicate keys: which one does the model read?
            bytes = b"{\"id\":\"urn:ngsi-ld:Room:1\",\"id\":\"urn:ngsi-ld:Room:vault1\",\"type\":\"Room\"}"
                .to_vec();
        }
        _ => {}
    }
    bytes
}

/// Splits a body as it might arrive: random chunk boundaries, now and then empty chunks.
pub fn chunks(rng: &mut Rng, body: &[u8]) -> Vec<Vec<u8>> {
    if body.is_empty() {
        return if chance(rng, 0.1) {
            vec![Vec::new()]
        } else {
            Vec::new()
        };
    }
    let pieces = rng.gen_range(1..=4usize).min(body.len());
    let mut cuts: Vec<usize> = (0..pieces - 1)
        .map(|_| rng.gen_range(0..=body.len()))
        .collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain(std::iter::once(body.len())) {
        out.push(body[start..cut].to_vec());
        start = cut;
    }
    out
}

/// Percent-encodes `raw` minimally, as token-auth writes identity header values.
pub fn pct(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
