//! Wire formats of device-ownership: which endpoint a request is, the registry's JSON
//! contract, the broker's owner-attribute read, owner injection in create bodies, and list
//! filtering of responses.
//!
//! Registry contract (documented in `filters/device-ownership/README.md`):
//! * lookup: `POST {lookup_path}` with `{"entity_id": ..., "service": ...}` →
//!   `200 {"owner": "alice", "delegations": [{"user": "bob", "access": "read"}, ...],
//!   "public": false}` (`delegations` and `public` optional), or `404` (nobody owns it);
//! * claim: `POST {claim_path}` with `{"entity_id", "entity_type", "owner", "service",
//!   "service_path"}` → `200`/`201` (claimed; the caller is the owner), `409` (someone else
//!   owns it).
//!
//! Anything else (other status, a body that does not parse) is an error: the request fails
//! closed with 503.

use std::collections::HashSet;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};

use super::config::BrokerApi;
use super::{DelegatedAccess, Delegation, EntityKey, Grantee, Record};
use crate::decision::DenyReason;
use crate::ngsi::canonical::{canonical_path, decode_form_field, CanonicalPath};

/// The NGSI dialect of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    V2,
    Ld,
    Ngsi10,
}

/// A body that creates entities, and its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateBody {
    /// `POST /v2/entities`: one entity object.
    V2Entity,
    /// `POST /v2/op/update`: `entities` array.
    V2OpUpdate,
    /// `POST /v2/notify`: `data` array.
    V2Notify,
    /// `POST /ngsi-ld/v1/entities` (and temporal): one entity object.
    LdEntity,
    /// `POST /ngsi-ld/v1/entityOperations/{create,upsert}`: array of entity objects.
    LdBatch,
    /// `POST /ngsi10/updateContext`: `contextElements[].attributes`.
    Ngsi10Update,
    /// `POST /ngsi10/notifyContext`: `contextResponses[].contextElement.attributes`.
    Ngsi10Notify,
}

/// The shape of a list response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// An array of v2 entities (normalized or keyValues).
    V2,
    /// An array of NGSI-LD entities (normalized, concise or simplified).
    Ld,
    /// `{"contextResponses": [{"contextElement": ...}]}` or an array of contextElements.
    Ngsi10,
}

/// Where an attribute restriction of a list request lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrsIn {
    /// The `attrs` query parameter.
    Query,
    /// A body member (`attrs` for v2 op/query and NGSI-LD query, `attributes` for NGSI10).
    Body(&'static str),
}

/// What the filter needs to know about an endpoint beyond its accesses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub dialect: Dialect,
    pub create_body: Option<CreateBody>,
    pub list: Option<(ListFormat, AttrsIn)>,
    /// v2 `options=keyValues`: attribute values without type.
    pub key_values: bool,
}

impl Endpoint {
    /// Classifies `method` + `:path` (already accepted by `ngsi::classify`).
    pub fn of(method: &str, path: &str) -> Result<Endpoint, DenyReason> {
        Endpoint::of_canonical(method, &canonical_path(path)?)
    }

    /// [`Endpoint::of`] with the path already in canonical form (as
    /// `ngsi::classify_with_path` gives it).
    pub fn of_canonical(method: &str, canon: &CanonicalPath) -> Result<Endpoint, DenyReason> {
        let parts = canon.parts();
        let q = &canon.query;
        let dialect = match parts.first().copied() {
            Some("v2" | "version") => Dialect::V2,
            Some("ngsi-ld") => Dialect::Ld,
            _ => Dialect::Ngsi10,
        };
        let key_values = q.has_option("keyValues")?;
        let values_only = q.has_option("values")? || q.has_option("unique")?;
        let (create_body, list) = match (method, parts.as_slice()) {
            ("POST", ["v2", "entities"]) => (Some(CreateBody::V2Entity), None),
            ("POST", ["v2", "op", "update"]) => (Some(CreateBody::V2OpUpdate), None),
            ("POST", ["v2", "notify"]) => (Some(CreateBody::V2Notify), None),
            ("GET", ["v2", "entities"]) if !values_only => {
                (None, Some((ListFormat::V2, AttrsIn::Query)))
            }
            ("POST", ["v2", "op", "query"]) if !values_only => {
                (None, Some((ListFormat::V2, AttrsIn::Body("attrs"))))
            }
            ("POST", ["ngsi-ld", "v1", "entities"] | ["ngsi-ld", "v1", "temporal", "entities"]) => {
                (Some(CreateBody::LdEntity), None)
            }
            ("POST", ["ngsi-ld", "v1", "entityOperations", "create" | "upsert"]) => {
                (Some(CreateBody::LdBatch), None)
            }
            ("GET", ["ngsi-ld", "v1", "entities"] | ["ngsi-ld", "v1", "temporal", "entities"]) => {
                (None, Some((ListFormat::Ld, AttrsIn::Query)))
            }
            (
                "POST",
                ["ngsi-ld", "v1", "entityOperations", "query"]
                | ["ngsi-ld", "v1", "temporal", "entityOperations", "query"],
            ) => (None, Some((ListFormat::Ld, AttrsIn::Body("attrs")))),
            ("POST", ["ngsi10" | "v1", "updateContext"]) => (Some(CreateBody::Ngsi10Update), None),
            ("POST", ["ngsi10", "notifyContext"]) => (Some(CreateBody::Ngsi10Notify), None),
            ("POST", ["ngsi10", "queryContext"]) => (
                None,
                Some((ListFormat::Ngsi10, AttrsIn::Body("attributes"))),
            ),
            ("GET", ["ngsi10", "entity"]) => (None, Some((ListFormat::Ngsi10, AttrsIn::Query))),
            _ => (None, None),
        };
        Ok(Endpoint {
            dialect,
            create_body,
            list,
            key_values,
        })
    }
}

// ---- records from JSON ----

/// Reads delegations: an array of `{"user"|"group": name, "access": "read"|"read_write"}`
/// (Snap4city's `READ_ACCESS`/`READ_WRITE` accepted) and `{"public": true}` entries. Returns
/// the delegations and whether a public entry was present.
pub fn parse_delegations(v: &Value) -> Result<(Vec<Delegation>, bool), String> {
    let arr = match v {
        Value::Null => return Ok((Vec::new(), false)),
        Value::Array(a) => a,
        _ => return Err("delegations must be an array".into()),
    };
    let mut out = Vec::new();
    let mut public = false;
    for item in arr {
        let obj = item.as_object().ok_or("a delegation must be an object")?;
        if let Some(p) = obj.get("public") {
            if obj.len() != 1 || !p.is_boolean() {
                return Err("a public delegation is exactly {\"public\": true|false}".into());
            }
            public |= p.as_bool() == Some(true);
            continue;
        }
        let access = obj
            .get("access")
            .and_then(Value::as_str)
            .and_then(DelegatedAccess::parse)
            .ok_or("delegation.access must be read or read_write")?;
        let name = |k: &str| obj.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let grantee = match (name("user"), name("group"), obj.len()) {
            (Some(u), None, 2) => Grantee::User(u.into()),
            (None, Some(g), 2) => Grantee::Group(g.into()),
            _ => return Err("a delegation names exactly one user or group, and its access".into()),
        };
        out.push(Delegation { grantee, access });
    }
    Ok((out, public))
}

/// A record from an owner value and a delegations value (either may be absent). No owner →
/// None (the source does not know the entity); delegations without an owner are ignored.
pub fn record_from_values(
    owner: Option<&Value>,
    delegations: Option<&Value>,
) -> Result<Option<Record>, String> {
    let owner = match owner {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err("the owner must be a non-empty string".into()),
    };
    let (delegations, public) = match delegations {
        Some(d) => parse_delegations(d)?,
        None => (Vec::new(), false),
    };
    Ok(Some(Record {
        owner,
        delegations,
        public,
    }))
}

/// The value of an attribute as v2/LD represent it: `{"value": v, ...}` (normalized) or `v`
/// itself (keyValues / simplified).
fn attr_value(v: &Value) -> &Value {
    match v {
        Value::Object(o) if o.contains_key("value") => o.get("value").unwrap_or(&Value::Null),
        other => other,
    }
}

// ---- registry ----

/// The body of a registry lookup.
pub fn registry_lookup_body(key: &EntityKey) -> String {
    json!({"entity_id": key.id, "service": key.service}).to_string()
}

/// The body of a registry claim.
pub fn registry_claim_body(
    key: &EntityKey,
    entity_type: Option<&str>,
    service_path: &str,
    owner: &str,
) -> String {
    json!({
        "entity_id": key.id,
        "entity_type": entity_type,
        "service": key.service,
        "service_path": service_path,
        "owner": owner,
    })
    .to_string()
}

/// A registry lookup's answer: 200 with a record, 404 (nobody owns it), or an error.
pub fn parse_registry_lookup(status: u32, body: &[u8]) -> Result<Option<Record>, String> {
    match status {
        404 => Ok(None),
        200 => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| format!("registry answer is not JSON: {e}"))?;
            let obj = v.as_object().ok_or("registry answer must be an object")?;
            for k in obj.keys() {
                if !matches!(k.as_str(), "owner" | "delegations" | "public") {
                    return Err(format!("registry answer has an unknown member {k:?}"));
                }
            }
            let mut record = record_from_values(obj.get("owner"), obj.get("delegations"))?
                .ok_or("registry answer 200 without an owner")?;
            match obj.get("public") {
                None => {}
                Some(Value::Bool(b)) => record.public |= *b,
                Some(_) => return Err("registry answer: public must be a boolean".into()),
            }
            Ok(Some(record))
        }
        0 => Err("registry call failed (reset or no answer)".into()),
        other => Err(format!("registry answered status {other}")),
    }
}

/// A claim's answer: 200/201 → claimed, 409 → someone else owns it (403), else 503.
pub fn claim_outcome(status: u32, key: &EntityKey) -> Result<(), DenyReason> {
    match status {
        200 | 201 => Ok(()),
        409 => Err(DenyReason::Forbidden(format!(
            "the registry says {key} is already claimed by someone else"
        ))),
        0 => Err(DenyReason::Unavailable(
            "the ownership registry did not answer".into(),
        )),
        other => Err(DenyReason::Unavailable(format!(
            "the ownership registry answered {other} to a claim"
        ))),
    }
}

// ---- broker ----

/// Characters escaped in a path segment (everything but unreserved and `:`/`@`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b':')
    .remove(b'@');

/// The API a broker lookup uses for a request of `dialect`.
pub fn broker_api(api: BrokerApi, dialect: Dialect) -> BrokerApi {
    match (api, dialect) {
        (BrokerApi::Auto, Dialect::V2) => BrokerApi::V2,
        (BrokerApi::Auto, Dialect::Ld) => BrokerApi::Ld,
        (BrokerApi::Auto, Dialect::Ngsi10) => BrokerApi::Ngsi10,
        (other, _) => other,
    }
}

/// `:path` and tenant headers of a broker lookup of `key`'s owner attributes. The service path
/// is `/#` (the whole tenant: the key does not include service paths).
pub fn broker_lookup(
    api: BrokerApi,
    key: &EntityKey,
    owner_attr: &str,
    delegations_attr: &str,
) -> (String, Vec<(String, String)>) {
    let id = utf8_percent_encode(&key.id, SEGMENT);
    let attrs = format!(
        "{},{}",
        utf8_percent_encode(owner_attr, SEGMENT),
        utf8_percent_encode(delegations_attr, SEGMENT)
    );
    let mut headers = Vec::new();
    let path = match api {
        BrokerApi::Ld => {
            if !key.service.is_empty() {
                headers.push(("ngsild-tenant".to_string(), key.service.clone()));
            }
            headers.push(("accept".to_string(), "application/json".to_string()));
            format!("/ngsi-ld/v1/entities/{id}?attrs={attrs}&options=keyValues")
        }
        BrokerApi::Ngsi10 => {
            if !key.service.is_empty() {
                headers.push(("fiware-service".to_string(), key.service.clone()));
            }
            format!("/ngsi10/entity/{id}")
        }
        BrokerApi::V2 | BrokerApi::Auto => {
            if !key.service.is_empty() {
                headers.push(("fiware-service".to_string(), key.service.clone()));
            }
            headers.push(("fiware-servicepath".to_string(), "/#".to_string()));
            headers.push(("accept".to_string(), "application/json".to_string()));
            format!("/v2/entities/{id}?attrs={attrs}&options=keyValues")
        }
    };
    (path, headers)
}

/// A broker lookup's answer: 200 with the entity looked up (owner attribute absent → the
/// broker does not know an owner: None), 404 (no such entity: None), anything else an error
/// (409 from Orion: the id is ambiguous across service paths or types).
///
/// A 200 must be the entity `id` itself, as the lookup's API writes it (v2 / NGSI-LD `id`,
/// NGSI10 `entityId.id`): a list, another entity or an object without id says nothing about
/// `id`, and reading it as "exists, no owner" would let a create claim someone's entity.
pub fn parse_broker_lookup(
    api: BrokerApi,
    id: &str,
    status: u32,
    body: &[u8],
    owner_attr: &str,
    delegations_attr: &str,
) -> Result<Option<Record>, String> {
    match status {
        404 => Ok(None),
        200 => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| format!("broker answer is not JSON: {e}"))?;
            let format = match api {
                BrokerApi::Ld => ListFormat::Ld,
                BrokerApi::Ngsi10 => ListFormat::Ngsi10,
                _ => ListFormat::V2,
            };
            if !v.is_object() {
                return Err("broker answer is not an entity object".into());
            }
            let (answered, entity) = item_id(format, &v)
                .map_err(|_| "broker answer is an object without an entity id".to_string())?;
            if answered != id {
                return Err(format!(
                    "broker answered entity {}, not the one looked up",
                    crate::log_text::bounded_debug(&answered)
                ));
            }
            embedded_record(format, entity, owner_attr, delegations_attr)
        }
        0 => Err("broker call failed (reset or no answer)".into()),
        other => Err(format!("broker answered status {other}")),
    }
}

/// The record an entity carries in its own attributes (any representation).
pub fn embedded_record(
    format: ListFormat,
    entity: &Value,
    owner_attr: &str,
    delegations_attr: &str,
) -> Result<Option<Record>, String> {
    let Some(obj) = entity.as_object() else {
        return Err("an entity must be a JSON object".into());
    };
    match format {
        ListFormat::V2 | ListFormat::Ld => record_from_values(
            obj.get(owner_attr).map(attr_value),
            obj.get(delegations_attr).map(attr_value),
        ),
        ListFormat::Ngsi10 => {
            let attrs = match obj.get("attributes") {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::Array(a)) => a,
                Some(_) => return Err("contextElement.attributes must be an array".into()),
            };
            let find = |name: &str| {
                attrs
                    .iter()
                    .find(|a| a.get("name").and_then(Value::as_str) == Some(name))
                    .map(|a| a.get("value").unwrap_or(&Value::Null))
            };
            record_from_values(find(owner_attr), find(delegations_attr))
        }
    }
}

// ---- create bodies ----

fn forbidden(msg: String) -> DenyReason {
    DenyReason::Forbidden(msg)
}

/// Makes the caller the owner of the new entities in a create body: the owner attribute is
/// added where missing; where present it must already name the caller (else 403: a create may
/// set the owner only to the caller). Returns the new body, or None if it needed no change.
pub fn inject_owner(
    kind: CreateBody,
    body: &[u8],
    key_values: bool,
    owner_attr: &str,
    caller: &str,
    new_ids: &HashSet<String>,
) -> Result<Option<Vec<u8>>, DenyReason> {
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| DenyReason::BadRequest(format!("body is not valid JSON: {e}")))?;
    let mut changed = false;
    let bad = |what: &str| DenyReason::BadRequest(format!("{what} has an unexpected shape"));
    match kind {
        CreateBody::V2Entity | CreateBody::LdEntity => {
            let obj = v.as_object_mut().ok_or_else(|| bad("entity"))?;
            let ld = kind == CreateBody::LdEntity;
            changed |= inject_object(obj, ld, key_values, owner_attr, caller, new_ids)?;
        }
        CreateBody::V2OpUpdate | CreateBody::V2Notify | CreateBody::LdBatch => {
            let list = match kind {
                CreateBody::V2OpUpdate => v.get_mut("entities"),
                CreateBody::V2Notify => v.get_mut("data"),
                _ => Some(&mut v),
            };
            let arr = list
                .and_then(Value::as_array_mut)
                .ok_or_else(|| bad("entity list"))?;
            let ld = kind == CreateBody::LdBatch;
            for e in arr {
                let obj = e.as_object_mut().ok_or_else(|| bad("entity"))?;
                changed |= inject_object(obj, ld, key_values, owner_attr, caller, new_ids)?;
            }
        }
        CreateBody::Ngsi10Update | CreateBody::Ngsi10Notify => {
            let arr = if kind == CreateBody::Ngsi10Update {
                v.get_mut("contextElements")
            } else {
                v.get_mut("contextResponses")
            }
            .and_then(Value::as_array_mut)
            .ok_or_else(|| bad("context element list"))?;
            for item in arr {
                let ce = if kind == CreateBody::Ngsi10Update {
                    Some(item)
                } else {
                    item.get_mut("contextElement")
                };
                let ce = ce
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| bad("contextElement"))?;
                changed |= inject_context_element(ce, owner_attr, caller, new_ids)?;
            }
        }
    }
    if !changed {
        return Ok(None);
    }
    serde_json::to_vec(&v)
        .map(Some)
        .map_err(|e| DenyReason::Unavailable(format!("cannot encode the body: {e}")))
}

fn inject_object(
    obj: &mut Map<String, Value>,
    ld: bool,
    key_values: bool,
    owner_attr: &str,
    caller: &str,
    new_ids: &HashSet<String>,
) -> Result<bool, DenyReason> {
    let Some(id) = obj.get("id").and_then(Value::as_str).map(str::to_owned) else {
        return Ok(false);
    };
    if !new_ids.contains(&id) {
        return Ok(false);
    }
    if let Some(existing) = obj.get(owner_attr) {
        return match attr_value(existing) {
            Value::String(s) if s == caller => Ok(false),
            _ => Err(forbidden(format!(
                "a create of {id:?} sets {owner_attr:?} to someone other than the caller"
            ))),
        };
    }
    let value = if ld {
        json!({"type": "Property", "value": caller})
    } else if key_values {
        json!(caller)
    } else {
        json!({"type": "Text", "value": caller})
    };
    obj.insert(owner_attr.to_string(), value);
    Ok(true)
}

fn inject_context_element(
    ce: &mut Map<String, Value>,
    owner_attr: &str,
    caller: &str,
    new_ids: &HashSet<String>,
) -> Result<bool, DenyReason> {
    let id = ce
        .get("entityId")
        .and_then(|e| e.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(id) = id.filter(|i| new_ids.contains(i)) else {
        return Ok(false);
    };
    let attrs = ce
        .entry("attributes")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Some(attrs) = attrs.as_array_mut() else {
        return Err(DenyReason::BadRequest(
            "contextElement.attributes must be an array".into(),
        ));
    };
    if let Some(existing) = attrs
        .iter()
        .find(|a| a.get("name").and_then(Value::as_str) == Some(owner_attr))
    {
        return match existing.get("value") {
            Some(Value::String(s)) if s == caller => Ok(false),
            _ => Err(forbidden(format!(
                "a create of {id:?} sets {owner_attr:?} to someone other than the caller"
            ))),
        };
    }
    attrs.push(json!({"name": owner_attr, "type": "string", "value": caller}));
    Ok(true)
}

/// The type of entity `id` in a create body (for the registry claim), if the body names one.
pub fn created_type(kind: CreateBody, body: &[u8], id: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let ty_of = |e: &Value| -> Option<String> {
        if e.get("id").and_then(Value::as_str) == Some(id) {
            return match e.get("type")? {
                Value::String(s) => Some(s.clone()),
                Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_owned),
                _ => None,
            };
        }
        let eid = e.get("entityId")?;
        (eid.get("id").and_then(Value::as_str) == Some(id))
            .then(|| eid.get("type").and_then(Value::as_str).map(str::to_owned))
            .flatten()
    };
    let items: Vec<&Value> = match kind {
        CreateBody::V2Entity | CreateBody::LdEntity => vec![&v],
        CreateBody::V2OpUpdate => v.get("entities")?.as_array()?.iter().collect(),
        CreateBody::V2Notify => v.get("data")?.as_array()?.iter().collect(),
        CreateBody::LdBatch => v.as_array()?.iter().collect(),
        CreateBody::Ngsi10Update => v.get("contextElements")?.as_array()?.iter().collect(),
        CreateBody::Ngsi10Notify => v
            .get("contextResponses")?
            .as_array()?
            .iter()
            .filter_map(|r| r.get("contextElement"))
            .collect(),
    };
    items.into_iter().find_map(ty_of)
}

// ---- lists ----

/// What the filter does with the answer to a list request, by its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListAnswer {
    /// Any 2xx (200, 206 Partial Content of a temporal query, ...) may carry entities:
    /// filter it, or refuse it with 503 if it cannot be filtered.
    Filter,
    /// 1xx/3xx/4xx/5xx: an error or redirect carries no entity of the list; passed unchanged.
    PassThrough,
    /// No readable `:status`: nothing says the body is harmless, so it is refused (503).
    Unreadable,
}

/// Classifies a list answer's `:status` (None when it is missing or not three digits).
pub fn list_answer(status: Option<u32>) -> ListAnswer {
    match status {
        Some(200..=299) => ListAnswer::Filter,
        Some(_) => ListAnswer::PassThrough,
        None => ListAnswer::Unreadable,
    }
}

/// The entities of a list response: `(id, record the broker source reads from it)`, in order.
pub type Listed = Vec<(String, Result<Option<Record>, String>)>;

/// Parses a list response body into its JSON and its entities.
pub fn list_entities(
    format: ListFormat,
    body: &[u8],
    owner_attr: &str,
    delegations_attr: &str,
) -> Result<(Value, Listed), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("list response is not JSON: {e}"))?;
    let mut out = Vec::new();
    for e in list_items(format, &v)? {
        let (id, element) = item_id(format, e)?;
        out.push((
            id,
            embedded_record(format, element, owner_attr, delegations_attr),
        ));
    }
    Ok((v, out))
}

/// The items of a parsed list response, in the order of [`list_entities`].
pub fn list_items(format: ListFormat, v: &Value) -> Result<Vec<&Value>, String> {
    match (format, v) {
        (_, Value::Array(a)) => Ok(a.iter().collect()),
        (ListFormat::Ngsi10, Value::Object(o)) => match o.get("contextResponses") {
            Some(Value::Array(a)) => Ok(a.iter().collect()),
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(_) => Err("contextResponses must be an array".into()),
        },
        _ => Err("list response is not an array of entities".into()),
    }
}

/// An item's entity id, and the element that carries the attributes.
fn item_id(format: ListFormat, item: &Value) -> Result<(String, &Value), String> {
    let element = match format {
        ListFormat::Ngsi10 => item.get("contextElement").unwrap_or(item),
        _ => item,
    };
    let id = match format {
        ListFormat::Ngsi10 => element.get("entityId").and_then(|e| e.get("id")),
        _ => element.get("id"),
    };
    match id {
        Some(Value::String(s)) => Ok((s.clone(), element)),
        _ => Err("a listed entity has no id".into()),
    }
}

/// Keeps the items whose `keep` flag is true (same order as [`list_entities`]) and removes
/// the `strip` attributes from them. Returns the new body, or None when nothing was removed
/// (every item kept, no attribute to strip found): the answer is then passed as it came, byte
/// for byte, not rewritten. And how many items were kept.
pub fn filter_list(
    format: ListFormat,
    mut v: Value,
    keep: &[bool],
    strip: &[String],
) -> Result<(Option<Vec<u8>>, usize), String> {
    let arr = match (&mut v, format) {
        (Value::Array(a), _) => a,
        // No list of responses: nothing listed, nothing to remove.
        (Value::Object(o), ListFormat::Ngsi10) => match o.get_mut("contextResponses") {
            Some(Value::Array(a)) => a,
            _ if keep.is_empty() => return Ok((None, 0)),
            _ => return Err("list changed while filtering".into()),
        },
        _ => return Err("list response is not an array of entities".into()),
    };
    if arr.len() != keep.len() {
        return Err("list changed while filtering".into());
    }
    let mut i = 0;
    arr.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    let kept = arr.len();
    let mut changed = kept != keep.len();
    for item in arr.iter_mut() {
        changed |= strip_attrs(format, item, strip);
    }
    if !changed {
        return Ok((None, kept));
    }
    serde_json::to_vec(&v)
        .map(|b| (Some(b), kept))
        .map_err(|e| e.to_string())
}

/// Removes the `strip` attributes from a listed item; true if it had any.
fn strip_attrs(format: ListFormat, item: &mut Value, strip: &[String]) -> bool {
    if strip.is_empty() {
        return false;
    }
    match format {
        ListFormat::Ngsi10 => {
            let element = if item.get("contextElement").is_some() {
                item.get_mut("contextElement")
            } else {
                Some(item)
            };
            let Some(Value::Array(attrs)) = element.and_then(|e| e.get_mut("attributes")) else {
                return false;
            };
            let before = attrs.len();
            attrs.retain(|a| {
                !a.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| strip.iter().any(|s| s == n))
            });
            attrs.len() != before
        }
        _ => {
            let Some(obj) = item.as_object_mut() else {
                return false;
            };
            let mut removed = false;
            for s in strip {
                removed |= obj.remove(s).is_some();
            }
            removed
        }
    }
}

/// The count header value to send after filtering: the broker's total is kept exact only when
/// the page held every matching entity (total == items on the page); then it becomes the
/// number kept. Otherwise the readable total is unknown and the header is removed (None).
pub fn filtered_count(total: Option<&str>, page_items: usize, kept: usize) -> Option<String> {
    let total: usize = total?.trim().parse().ok()?;
    (total == page_items).then(|| kept.to_string())
}

/// For a list request with an attribute restriction that leaves out `names`, the request
/// with them added (so the broker returns the owner attributes), and the names added (to strip
/// from the response). Query restriction: the new `:path`; body restriction: the new body.
/// None: no restriction, or it already includes them (or `*`).
pub fn widen_attrs_path(path: &str, names: &[&str]) -> Option<(String, Vec<String>)> {
    let (base, query) = path.split_once('?')?;
    let mut added = Vec::new();
    let mut pairs: Vec<String> = Vec::new();
    for pair in query.split('&') {
        let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
        // Name and value as the broker decodes them (`+` is a space).
        let is_attrs = decode_form_field(k).is_ok_and(|k| k == "attrs");
        if is_attrs && added.is_empty() {
            let decoded = decode_form_field(val).ok()?;
            let items: Vec<&str> = decoded.split(',').collect();
            if items.contains(&"*") {
                return None;
            }
            let missing: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !items.contains(n))
                .collect();
            if missing.is_empty() {
                return None;
            }
            let mut v = val.to_string();
            for m in &missing {
                v.push(',');
                v.push_str(&utf8_percent_encode(m, SEGMENT).to_string());
                added.push((*m).to_string());
            }
            pairs.push(format!("{k}={v}"));
        } else {
            pairs.push(pair.to_string());
        }
    }
    (!added.is_empty()).then(|| (format!("{base}?{}", pairs.join("&")), added))
}

/// Like [`widen_attrs_path`] for a body member holding an array of attribute names.
pub fn widen_attrs_body(
    body: &[u8],
    member: &str,
    names: &[&str],
) -> Option<(Vec<u8>, Vec<String>)> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let arr = v.get_mut(member)?.as_array_mut()?;
    if arr.is_empty() || arr.iter().any(|a| a.as_str() == Some("*")) {
        return None;
    }
    let mut added = Vec::new();
    for n in names {
        if !arr.iter().any(|a| a.as_str() == Some(n)) {
            arr.push(json!(n));
            added.push((*n).to_string());
        }
    }
    if added.is_empty() {
        return None;
    }
    serde_json::to_vec(&v).ok().map(|b| (b, added))
}
