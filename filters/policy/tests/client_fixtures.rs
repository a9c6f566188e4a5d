//! The NGSI request model against what real client libraries send.
//!
//! `tests/fixtures/ngsi-clients/{ngsijs,filip}.json` hold requests recorded on loopback from
//! npm `ngsijs` and PyPI `filip` (see that directory's README), each with an `expect` block
//! written by hand from the client call and the broker docs (Orion NGSI v2, ETSI NGSI-LD):
//!
//! ```json
//! {"tenant": {"service": "smartcity", "service_paths": ["/parks"]},
//!  "accesses": [{"action": "create", "id": "urn:x", "type": "Room", "attrs": ["temp"],
//!                "endpoint": "http://..."}]}
//! ```
//! `id`: an entity id, or `"*"` for any; or `id_pattern` instead. `type`: a type, or `"*"`;
//! or `type_pattern` instead. `attrs`: a list of names, or `"*"` for all. `endpoint` is
//! optional (none if absent); `why` (optional) says where the expectation comes from. The order
//! of accesses and of attribute names does not matter. A refusal is
//! `{"status": 400|403, "reason": "..."}` (a 403 must be an unclassified request).
//!
//! Every request is classified and every mismatch is listed before the test fails.

use std::path::PathBuf;

use policy::access::{Access, Action, AttributeSelector, EntitySelector, Tenant, TypeSelector};
use policy::ngsi::{classify, Broker, NgsiRequest, UNCLASSIFIED};
use serde_json::{Map, Value};

const CLIENTS: &[&str] = &["ngsijs", "filip"];

/// One access in comparable form.
type Shape = (
    Action,
    EntitySelector,
    TypeSelector,
    AttributeSelector,
    Tenant,
    Option<String>,
);

#[derive(Debug)]
enum Expect {
    Allow(Vec<Shape>),
    Refuse(u32),
}

fn fixture_path(client: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ngsi-clients")
        .join(format!("{client}.json"))
}

/// The fixture of a client; missing, unreadable or without requests → `Err`.
fn load(client: &str) -> Result<Value, String> {
    let path = fixture_path(client);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("fixture {} is missing: {e}", path.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| format!("fixture {} is not JSON: {e}", path.display()))?;
    if doc["requests"].as_array().is_none_or(Vec::is_empty) {
        return Err(format!("fixture {} has no requests", path.display()));
    }
    Ok(doc)
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key} must be a string, got {other}")),
    }
}

fn action(s: &str) -> Result<Action, String> {
    Ok(match s {
        "read" => Action::Read,
        "write" => Action::Write,
        "create" => Action::Create,
        "delete" => Action::Delete,
        "subscribe" => Action::Subscribe,
        "register" => Action::Register,
        other => return Err(format!("unknown action {other:?}")),
    })
}

fn tenant(v: &Value) -> Result<Tenant, String> {
    let obj = v.as_object().ok_or("expect.tenant must be an object")?;
    let service = string(obj, "service")?
        .ok_or("expect.tenant.service is required")?
        .to_string();
    let paths = obj
        .get("service_paths")
        .and_then(Value::as_array)
        .ok_or("expect.tenant.service_paths must be an array")?;
    let service_paths = paths
        .iter()
        .map(|p| {
            p.as_str()
                .map(str::to_string)
                .ok_or("service path not a string")
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tenant {
        service,
        service_paths,
    })
}

fn access(v: &Value, tenant: &Tenant) -> Result<Shape, String> {
    let obj = v
        .as_object()
        .ok_or("an expected access must be an object")?;
    let known = [
        "action",
        "id",
        "id_pattern",
        "type",
        "type_pattern",
        "attrs",
        "endpoint",
    ];
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown key {k:?} in an expected access"));
    }
    let act = action(string(obj, "action")?.ok_or("access.action is required")?)?;
    let entity = match (string(obj, "id")?, string(obj, "id_pattern")?) {
        (Some("*"), None) => EntitySelector::Any,
        (Some(id), None) => EntitySelector::Id(id.into()),
        (None, Some(p)) => EntitySelector::IdPattern(p.into()),
        _ => return Err("access needs exactly one of id, id_pattern".into()),
    };
    let ty = match (string(obj, "type")?, string(obj, "type_pattern")?) {
        (Some("*"), None) => TypeSelector::Any,
        (Some(t), None) => TypeSelector::Type(t.into()),
        (None, Some(p)) => TypeSelector::Pattern(p.into()),
        _ => return Err("access needs exactly one of type, type_pattern".into()),
    };
    let attrs = match obj.get("attrs") {
        Some(Value::String(s)) if s == "*" => AttributeSelector::All,
        Some(Value::Array(a)) => AttributeSelector::Only(
            a.iter()
                .map(|x| x.as_str().map(str::to_string).ok_or("attr not a string"))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => return Err("access.attrs must be \"*\" or a list of names".into()),
    };
    let endpoint = string(obj, "endpoint")?.map(str::to_string);
    Ok((act, entity, ty, attrs, tenant.clone(), endpoint))
}

fn expectation(v: &Value) -> Result<Expect, String> {
    let obj = v
        .as_object()
        .ok_or("no expectation written (expect is null): write it by hand")?;
    if let Some(status) = obj.get("status") {
        let status = status.as_u64().ok_or("expect.status must be a number")?;
        if !matches!(status, 400 | 403) {
            return Err(format!("expect.status {status} is not 400 or 403"));
        }
        if string(obj, "reason")?.is_none_or(str::is_empty) {
            return Err("a refusal needs a reason".into());
        }
        return Ok(Expect::Refuse(status as u32));
    }
    let t = tenant(obj.get("tenant").ok_or("expect.tenant is required")?)?;
    let list = obj
        .get("accesses")
        .and_then(Value::as_array)
        .ok_or("expect.accesses must be an array")?;
    let shapes = list
        .iter()
        .map(|a| access(a, &t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Expect::Allow(shapes))
}

fn shape(a: &Access) -> Shape {
    (
        a.action,
        a.entity.clone(),
        a.entity_type.clone(),
        a.attributes.clone(),
        a.tenant.clone(),
        a.endpoint.clone(),
    )
}

/// Order-insensitive form: attribute names and accesses sorted (neither order means anything).
fn sorted(mut v: Vec<Shape>) -> Vec<Shape> {
    for s in &mut v {
        if let AttributeSelector::Only(names) = &mut s.3 {
            names.sort();
        }
    }
    v.sort_by_key(|s| format!("{s:?}"));
    v
}

/// Classify one recorded request and compare; `Err` describes the mismatch.
fn check(entry: &Value) -> Result<(), String> {
    let req = entry["request"]
        .as_object()
        .ok_or("entry has no request object")?;
    let method = string(req, "method")?.ok_or("request.method missing")?;
    let path = string(req, "path")?.ok_or("request.path missing")?;
    let body = string(req, "body")?.unwrap_or("");
    let headers = req
        .get("headers")
        .and_then(Value::as_array)
        .ok_or("request.headers must be an array of [name, value]")?
        .iter()
        .map(|h| match h.as_array().map(Vec::as_slice) {
            Some([Value::String(k), Value::String(v)]) => Ok((k.clone(), v.clone())),
            _ => Err(format!("bad header entry {h}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expect = expectation(&entry["expect"])?;
    let got = classify(&NgsiRequest {
        broker: broker_of(path),
        method,
        path,
        headers: &headers,
        body: body.as_bytes(),
    });
    let what = format!("{method} {path}");
    match (expect, got) {
        (Expect::Allow(want), Ok(r)) => {
            let want = sorted(want);
            let got = sorted(r.accesses.iter().map(shape).collect());
            if want == got {
                return Ok(());
            }
            let mut msg = format!("{what}: accesses differ\n");
            for w in want.iter().filter(|w| !got.contains(w)) {
                msg += &format!("      expected, missing: {w:?}\n");
            }
            for g in got.iter().filter(|g| !want.contains(g)) {
                msg += &format!("      classified, unexpected: {g:?}\n");
            }
            if want.len() != got.len() {
                msg += &format!(
                    "      {} accesses expected, {} classified\n",
                    want.len(),
                    got.len()
                );
            }
            Err(msg)
        }
        (Expect::Allow(_), Err(e)) => Err(format!(
            "{what}: expected an allow-able classification, refused {}: {e:?}",
            e.status()
        )),
        (Expect::Refuse(s), Ok(r)) => Err(format!(
            "{what}: expected a {s} refusal, classified as {:?}",
            r.accesses.iter().map(shape).collect::<Vec<_>>()
        )),
        (Expect::Refuse(s), Err(e)) => {
            if e.status() != s {
                return Err(format!(
                    "{what}: expected {s}, refused {}: {e:?}",
                    e.status()
                ));
            }
            if s == 403 && !format!("{e:?}").contains(UNCLASSIFIED) {
                return Err(format!("{what}: 403 but not as unclassified: {e:?}"));
            }
            Ok(())
        }
    }
}

/// ngsijs and FiLiP speak Orion's NGSI v2 and NGSI-LD: the recorded request is meant for an
/// NGSI-LD broker when its path says so, for Orion otherwise.
fn broker_of(path: &str) -> Broker {
    if path.starts_with("/ngsi-ld/") {
        Broker::NgsiLd
    } else {
        Broker::Orion
    }
}

#[test]
fn recorded_client_requests_classify_as_expected() {
    let mut failures = Vec::new();
    let mut total = 0;
    for client in CLIENTS {
        let doc = match load(client) {
            Ok(doc) => doc,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let version = doc["version"].as_str().unwrap_or("?");
        for entry in doc["requests"].as_array().into_iter().flatten() {
            total += 1;
            let op = entry["operation"].as_str().unwrap_or("?");
            let index = entry["index"].as_u64().unwrap_or(0);
            if let Err(e) = check(entry) {
                failures.push(format!("[{client} {version}] {op} (request #{index}): {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems with the recorded client requests ({total} checked):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The fixtures must keep covering all three kinds of outcome per client, so a fixture that
/// lost most of its entries (or whose expectations all collapsed into refusals) fails.
#[test]
fn fixtures_cover_reads_writes_and_refusals() {
    for client in CLIENTS {
        let doc = load(client).unwrap_or_else(|e| panic!("{e}"));
        let entries = doc["requests"].as_array().cloned().unwrap_or_default();
        let actions: Vec<String> = entries
            .iter()
            .flat_map(|e| {
                e["expect"]["accesses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|a| a["action"].as_str().map(str::to_string))
            .collect();
        for needed in ["read", "write", "create", "delete", "subscribe", "register"] {
            assert!(
                actions.iter().any(|a| a == needed),
                "{client}: no recorded request is expected to {needed}"
            );
        }
        assert!(
            entries.iter().any(|e| e["expect"]["status"].is_number()),
            "{client}: no recorded request is expected to be refused"
        );
        let dialects = ["/v2/", "/ngsi-ld/v1/"];
        for d in dialects {
            assert!(
                entries.iter().any(|e| e["request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(d))),
                "{client}: no recorded request under {d}"
            );
        }
    }
}
