//! NGSI request models: one classifier for the three dialects a policy filter sees in front of
//! a context broker (FIWARE Orion NGSI v2, NGSI-LD, FogFlow's NGSI9/NGSI10 broker and
//! discovery). A request becomes a [`RequestAccess`] (what it touches) or is refused.
//!
//! Refusals, decided here and relied on by the filter:
//! * [`DenyReason::BadRequest`] (400): the path is not canonical (dot segments, `//`, encoded
//!   separators, bad escapes), tenant headers are duplicated or invalid (an NGSI-LD tenant
//!   with upper-case letters too: Orion lowercases `fiware-service`, but NGSI-LD brokers differ,
//!   and a rule for `city` must not cover a distinct `City` tenant), or the body of a
//!   classified endpoint is not valid JSON / misses a required field / exceeds
//!   [`MAX_BATCH_ENTITIES`].
//! * an empty batch (no entity to check) is a 400 too: only `GET /version` classifies to an
//!   empty access list (it touches no entity data; the filter still authenticates it unless
//!   a public route says otherwise).
//! * [`DenyReason::Forbidden`] (403) with a description starting with [`UNCLASSIFIED`]: a
//!   well-formed request for a path/method the model does not know. Never an allow; 403
//!   (not 404) because the broker may well serve it, we just do not authorise it.
//!
//! Other decisions:
//! * methods are matched exactly (uppercase); `HEAD`, `OPTIONS` (CORS preflight) and any
//!   method an endpoint does not list are unclassified;
//! * listing, reading, changing (`PATCH`) or deleting subscriptions/registrations by id needs
//!   Subscribe/Register on everything (`Any`, all attributes): brokers find them by id alone,
//!   the model cannot know which entities an existing one covers, and reading one reveals
//!   the entity ids it watches and other clients' endpoints and custom headers; a `PATCH`
//!   needs, on top, the accesses of its new body (entities, attributes, endpoint);
//! * writes that may create (v2 `append`/`appendStrict`, `POST /v2/entities?options=upsert`,
//!   `/v2/notify`, LD upsert and temporal POST, FogFlow `UPDATE`/`APPEND`/notifyContext) are
//!   Create + Write, so a rule must grant both;
//! * body attribute names are reported sorted; JSON bodies with duplicate keys are refused.
//!
//! Dispatch is by the first canonical path segment, case-sensitively, as the brokers route:
//! `v2` and `version` → [`v2`], `ngsi-ld` → [`ld`], `ngsi10`, `ngsi9`, `v1` → [`fogflow`].
//! Before that, a path under one of the NGSI APIs (`/v2`, `/v1`, `/version`, `/ngsi-ld`,
//! `/ngsi10`, `/ngsi9`, `/NGSI9`) must be one the configured [`Broker`] serves (Orion: `/v2`,
//! `/v1`, `/version`; NGSI-LD brokers: `/ngsi-ld`, `/version`; FogFlow: exactly
//! [`fogflow::served`]); one it does not serve is a [`DenyReason::BadRequest`] (400) starting
//! with [`NOT_SERVED`]: the broker would answer 404, or worse, another component behind the
//! same address would answer with semantics the model did not decide. Other paths are
//! unclassified (403) as before.
//! On FogFlow, [`fogflow::widen`] turns each access into what FogFlow really does, and the
//! tenant is always the default service and the whole tree ([`fogflow::tenant`]).

pub mod canonical;
pub mod fogflow;
pub mod ld;
pub mod memo;
pub mod named_attrs;
pub mod v2;

#[cfg(test)]
mod named_attrs_tests;
#[cfg(test)]
mod tests;

use crate::access::Action;
use crate::access::{Access, AttributeSelector, EntitySelector, RequestAccess, TypeSelector};
use crate::decision::DenyReason;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use canonical::{CanonicalPath, Query, TenantScope};

/// At most this many entities (or entity selectors) in one batch body; more → 400. Also caps
/// the number of accesses one request may expand to (id list × type list, upsert = 2 each).
pub const MAX_BATCH_ENTITIES: usize = 1000;

/// At most this many items in any list a request names (URL `id`, `type`, `attrs`,
/// `options`; body attribute lists, entity type arrays); more → 400. Duplicates are dropped
/// (after counting): `attrs=a,a` is `attrs=a`. Real clients send one to a few (ngsijs, FiLiP).
pub const MAX_LIST_ITEMS: usize = 1000;

/// At most this many attribute names over all the accesses of one request (an access naming
/// every attribute counts 1); more → 400. It bounds the product of an id list and an
/// attribute list (1000 ids × 100 attrs), which every access carries, before it is built.
pub const MAX_ACCESS_NAMES: usize = 100_000;

/// Prefix of the description of a [`DenyReason::Forbidden`] for an endpoint the model does
/// not classify.
pub const UNCLASSIFIED: &str = "unclassified NGSI request";

/// The request headers the NGSI model reads (besides pseudo-headers): the tenant headers. A
/// filter must have them as text; anything else goes to the broker untouched.
pub fn reads_header(name: &str) -> bool {
    ["fiware-service", "fiware-servicepath", "ngsild-tenant"]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// The broker behind the sidecar (the `broker` setting of entity-acl and device-ownership).
/// It decides which routes exist (a route it does not serve is refused, 400, whatever the
/// rules say) and what a classified request really does there (see [`fogflow`] for FogFlow's
/// widening).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Broker {
    /// FIWARE Orion: `/v2/...`, the NGSIv1 `/v1/...` routes Orion still serves, `/version`.
    #[default]
    #[serde(rename = "orion")]
    Orion,
    /// An NGSI-LD broker (Orion-LD, Scorpio, Stellio): `/ngsi-ld/v1/...`, `/version`.
    #[serde(rename = "ngsi-ld")]
    NgsiLd,
    /// FogFlow: the routes its broker and IoT Discovery register, nothing else.
    #[serde(rename = "fogflow")]
    FogFlow,
}

impl Broker {
    /// The setting's spelling, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Broker::Orion => "orion",
            Broker::NgsiLd => "ngsi-ld",
            Broker::FogFlow => "fogflow",
        }
    }

    /// False if the path is one of the NGSI APIs ([`API_PREFIXES`]) and this broker does not
    /// serve `method` on it. Other paths (a broker's admin routes, typos) are left to the
    /// model, which refuses them as unclassified.
    fn serves(self, method: &str, canon: &CanonicalPath) -> bool {
        let first = canon.segments.first().map(String::as_str).unwrap_or("");
        if !API_PREFIXES.contains(&first) {
            return true;
        }
        match self {
            Broker::Orion => matches!(first, "v2" | "v1" | "version"),
            Broker::NgsiLd => matches!(first, "ngsi-ld" | "version"),
            Broker::FogFlow => fogflow::served(method, &canon.parts()),
        }
    }
}

/// The broker a test request is meant for, from its first path segment: `/ngsi-ld` an NGSI-LD
/// broker, FogFlow's `/ngsi10` and `/ngsi9` FogFlow, anything else Orion.
#[cfg(test)]
pub(crate) fn broker_for_path(path: &str) -> Broker {
    let first = path.trim_start_matches('/').split(['/', '?']).next();
    match first {
        Some("ngsi-ld") => Broker::NgsiLd,
        Some("ngsi10" | "ngsi9") => Broker::FogFlow,
        _ => Broker::Orion,
    }
}

/// First path segments of the NGSI APIs some broker serves: Orion's `v2`, `v1` and
/// `version`, NGSI-LD's `ngsi-ld`, FogFlow's `ngsi10`, `ngsi9` and its former `NGSI9`.
const API_PREFIXES: [&str; 7] = ["v2", "v1", "version", "ngsi-ld", "ngsi10", "ngsi9", "NGSI9"];

/// Prefix of the description of the 400 for a route the configured broker does not serve.
pub const NOT_SERVED: &str = "not served by the configured broker";

/// One HTTP request as the filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct NgsiRequest<'a> {
    /// The broker behind the sidecar.
    pub broker: Broker,
    /// Uppercase HTTP method.
    pub method: &'a str,
    /// `:path`, with its query string, exactly as received (still percent-encoded).
    pub path: &'a str,
    /// Request headers, names lowercase.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Classify a request into the accesses it performs, or refuse it (see the module docs).
pub fn classify(req: &NgsiRequest) -> Result<RequestAccess, DenyReason> {
    classify_with_path(req).map(|(classified, _)| classified)
}

/// [`classify`], and the canonical form of the request's path it read, for a caller that
/// looks further at the path (the path is parsed once).
pub fn classify_with_path(req: &NgsiRequest) -> Result<(RequestAccess, CanonicalPath), DenyReason> {
    let canon = canonical::canonical_path(req.path)?;
    if !req.broker.serves(req.method, &canon) {
        return Err(bad(format!(
            "{NOT_SERVED} ({}): {} {}",
            req.broker.name(),
            req.method,
            canon.display()
        )));
    }
    let first = canon.segments.first().map(String::as_str).unwrap_or("");
    let (dialect, classified) = match first {
        "v2" | "version" => ("ngsi-v2", v2::classify(req.method, &canon, req.body)?),
        "ngsi-ld" => ("ngsi-ld", ld::classify(req.method, &canon, req.body)?),
        "ngsi10" | "ngsi9" | "v1" => ("fogflow", fogflow::classify(req.method, &canon, req.body)?),
        _ => return Err(unclassified(req.method, &canon)),
    };
    let Some(mut classified) = classified else {
        return Err(unclassified(req.method, &canon));
    };
    if req.broker == Broker::FogFlow {
        classified.drafts = fogflow::widen(classified.drafts);
    }
    // Only `/version` touches nothing; an empty batch or entity list is not a vacuous allow.
    let is_version = canon.segments == ["version"];
    if classified.drafts.is_empty() && !is_version {
        return Err(bad("request names no entity (empty batch)"));
    }
    if classified.drafts.len() > MAX_BATCH_ENTITIES {
        return Err(bad(format!(
            "request expands to {} accesses, more than the {MAX_BATCH_ENTITIES} allowed",
            classified.drafts.len()
        )));
    }
    let names: usize = classified
        .drafts
        .iter()
        .map(|d| d.attributes.weight())
        .sum();
    if names > MAX_ACCESS_NAMES {
        return Err(bad(format!(
            "request names {names} attributes over its accesses, more than the \
             {MAX_ACCESS_NAMES} allowed"
        )));
    }
    let tenant = match req.broker {
        // FogFlow has no tenants: its headers are ignored, every entity lives in one space.
        Broker::FogFlow => fogflow::tenant(),
        _ => canonical::tenant(req.headers, classified.scope, dialect == "ngsi-ld")?,
    };
    let accesses = classified
        .drafts
        .into_iter()
        .map(|d| Access {
            action: d.action,
            entity: d.entity,
            entity_type: d.entity_type,
            attributes: d.attributes,
            tenant: tenant.clone(),
            endpoint: d.endpoint,
        })
        .collect();
    let classified = RequestAccess {
        operation: format!("{dialect} {} {}", req.method, canon.display()),
        accesses,
    };
    Ok((classified, canon))
}

/// An access before its tenant is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Draft {
    pub action: Action,
    pub entity: EntitySelector,
    pub entity_type: TypeSelector,
    pub attributes: AttributeSelector,
    pub endpoint: Option<String>,
}

impl Draft {
    pub(crate) fn new(
        action: Action,
        entity: EntitySelector,
        entity_type: TypeSelector,
        attributes: AttributeSelector,
    ) -> Self {
        Draft {
            action,
            entity,
            entity_type,
            attributes,
            endpoint: None,
        }
    }

    /// Every entity, every type, every attribute (collection-wide operations).
    pub(crate) fn any(action: Action) -> Self {
        Draft::new(
            action,
            EntitySelector::Any,
            TypeSelector::Any,
            AttributeSelector::All,
        )
    }

    /// One draft per (entity, type) selector, all with the same action, attributes and
    /// endpoint: what queries, subscriptions and registrations name. Refused (before the
    /// attribute list is copied into each) when that expands past the caps.
    pub(crate) fn per_selector(
        action: Action,
        selectors: Vec<(EntitySelector, TypeSelector)>,
        attributes: &AttributeSelector,
        endpoint: Option<&str>,
    ) -> Result<Vec<Draft>, DenyReason> {
        check_expansion(selectors.len(), attributes)?;
        Ok(selectors
            .into_iter()
            .map(|(e, t)| {
                Draft::new(action, e, t, attributes.clone())
                    .with_endpoint(endpoint.map(str::to_owned))
            })
            .collect())
    }

    pub(crate) fn with_endpoint(mut self, endpoint: Option<String>) -> Self {
        self.endpoint = endpoint;
        self
    }
}

/// What a dialect module returns for a request it recognises.
#[derive(Debug)]
pub(crate) struct Classified {
    pub scope: TenantScope,
    pub drafts: Vec<Draft>,
}

impl Classified {
    pub(crate) fn new(scope: TenantScope, drafts: Vec<Draft>) -> Option<Self> {
        Some(Classified { scope, drafts })
    }
}

/// A change of a subscription by id: brokers find subscriptions by id alone (Orion's
/// `mongoUpdateSubscription` looks up `_id` only), so the id may name any subscription of the
/// tenant, whoever made it and whatever it watches. The change needs Subscribe on everything
/// (as reading or deleting one by id does) on top of the accesses of its new body.
pub(crate) fn by_id(body: Option<Classified>) -> Result<Option<Classified>, DenyReason> {
    Ok(body.map(|mut c| {
        c.drafts.insert(0, Draft::any(Action::Subscribe));
        // A body naming no entity already asks for all of them.
        c.drafts.dedup();
        c
    }))
}

pub(crate) fn bad(msg: impl Into<String>) -> DenyReason {
    DenyReason::BadRequest(msg.into())
}

fn unclassified(method: &str, canon: &CanonicalPath) -> DenyReason {
    DenyReason::Forbidden(format!("{UNCLASSIFIED}: {method} {}", canon.display()))
}

// ---- JSON helpers shared by the dialects ----

/// Parse a body, refusing duplicate object keys at any depth: serde_json keeps the last
/// `"id"` of `{"id":"a","id":"b"}` while the broker's parser may keep the first, and the
/// ACL must see what the broker acts on.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value, DenyReason> {
    serde_json::from_slice::<NoDuplicates>(body)
        .map(|v| v.0)
        .map_err(|e| bad(format!("body is not valid JSON: {e}")))
}

/// A JSON value whose objects have no duplicate keys.
struct NoDuplicates(Value);

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicatesVisitor).map(NoDuplicates)
    }
}

struct NoDuplicatesVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicatesVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(NoDuplicates(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let NoDuplicates(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

pub(crate) fn as_object<'v>(
    v: &'v Value,
    what: &str,
) -> Result<&'v Map<String, Value>, DenyReason> {
    v.as_object()
        .ok_or_else(|| bad(format!("{what} must be a JSON object")))
}

/// Refuses `accesses` accesses that would each carry `attributes`, past
/// [`MAX_BATCH_ENTITIES`] or [`MAX_ACCESS_NAMES`]: checked before the copies are made.
pub(crate) fn check_expansion(
    accesses: usize,
    attributes: &AttributeSelector,
) -> Result<(), DenyReason> {
    if accesses > MAX_BATCH_ENTITIES {
        return Err(bad(format!(
            "request expands to {accesses} accesses, more than the {MAX_BATCH_ENTITIES} allowed"
        )));
    }
    let names = accesses.saturating_mul(attributes.weight());
    if names > MAX_ACCESS_NAMES {
        return Err(bad(format!(
            "request names {accesses} entities × {} attributes, more than the \
             {MAX_ACCESS_NAMES} entity-attribute pairs allowed",
            attributes.weight()
        )));
    }
    Ok(())
}

/// Appends one body item's drafts, refusing as soon as the request passes
/// [`MAX_BATCH_ENTITIES`] accesses (a body of many registrations stops at the first too many).
pub(crate) fn extend_checked(drafts: &mut Vec<Draft>, more: Vec<Draft>) -> Result<(), DenyReason> {
    let total = drafts.len().saturating_add(more.len());
    if total > MAX_BATCH_ENTITIES {
        return Err(bad(format!(
            "request expands to more than {MAX_BATCH_ENTITIES} accesses"
        )));
    }
    drafts.extend(more);
    Ok(())
}

/// Drops repeated names, keeping the first of each in order (a repeat adds no access).
pub(crate) fn dedup_names(names: Vec<String>) -> Vec<String> {
    let mut keep = vec![true; names.len()];
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        keep[i] = seen.insert(n.as_str());
    }
    names
        .into_iter()
        .zip(keep)
        .filter_map(|(n, k)| k.then_some(n))
        .collect()
}

/// A list of at most [`MAX_LIST_ITEMS`] items.
pub(crate) fn as_list<'v>(arr: &'v [Value], what: &str) -> Result<&'v [Value], DenyReason> {
    if arr.len() > MAX_LIST_ITEMS {
        return Err(bad(format!(
            "{what} has {} items, more than the {MAX_LIST_ITEMS} allowed",
            arr.len()
        )));
    }
    Ok(arr)
}

/// An array of at most [`MAX_BATCH_ENTITIES`] items.
pub(crate) fn as_batch<'v>(v: &'v Value, what: &str) -> Result<&'v Vec<Value>, DenyReason> {
    let arr = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be a JSON array")))?;
    if arr.len() > MAX_BATCH_ENTITIES {
        return Err(bad(format!(
            "{what} has {} items, more than the {MAX_BATCH_ENTITIES} allowed",
            arr.len()
        )));
    }
    Ok(arr)
}

/// An optional string member; present but not a non-empty string → 400.
pub(crate) fn opt_str<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<&'v str>, DenyReason> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => {
            check_name(s, &format!("{what}.{key}"))?;
            Ok(Some(s))
        }
        Some(_) => Err(bad(format!("{what}.{key} must be a non-empty string"))),
    }
}

pub(crate) fn req_str<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<&'v str, DenyReason> {
    opt_str(obj, key, what)?.ok_or_else(|| bad(format!("{what}.{key} is required")))
}

/// A name (id, type, attribute) as the ACL will see it: non-empty, no control characters.
pub(crate) fn check_name(s: &str, what: &str) -> Result<(), DenyReason> {
    if s.is_empty() {
        return Err(bad(format!("{what} must not be empty")));
    }
    if s.chars().any(is_refused_char) {
        return Err(bad(format!("{what} contains control characters")));
    }
    Ok(())
}

/// Characters no name may hold: controls, and U+2028/U+2029, which Java and JavaScript regex
/// engines (NGSI-LD brokers) treat as line ends, so `^id$` would match `id` followed by one.
pub(crate) fn is_refused_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The keys of an entity object that name attributes (all but `skip`), sorted (so the result
/// does not depend on serde_json's map ordering feature).
pub(crate) fn attribute_keys(
    obj: &Map<String, Value>,
    skip: &[&str],
) -> Result<Vec<String>, DenyReason> {
    let mut out = Vec::new();
    for k in obj.keys() {
        if skip.contains(&k.as_str()) {
            continue;
        }
        check_name(k, "attribute name")?;
        out.push(k.clone());
    }
    out.sort();
    Ok(out)
}

/// An optional array of attribute names (strings) → `Only(..)`, or `All` when absent.
/// An empty list means "all" in every dialect modelled here.
pub(crate) fn attr_name_list(
    v: Option<&Value>,
    what: &str,
) -> Result<AttributeSelector, DenyReason> {
    let Some(v) = v else {
        return Ok(AttributeSelector::All);
    };
    let arr = as_batch(v, what)?;
    let mut names = Vec::with_capacity(arr.len());
    for item in arr {
        let s = item
            .as_str()
            .ok_or_else(|| bad(format!("{what} must be an array of strings")))?;
        check_name(s, what)?;
        names.push(s.to_string());
    }
    Ok(only_or_all(dedup_names(names)))
}

pub(crate) fn only_or_all(names: Vec<String>) -> AttributeSelector {
    if names.is_empty() || names.iter().any(|n| n == "*") {
        AttributeSelector::All
    } else {
        AttributeSelector::Only(names)
    }
}

/// An optional URL-ish string for an endpoint: must be a non-empty string when present.
pub(crate) fn endpoint_str(v: Option<&Value>, what: &str) -> Result<Option<String>, DenyReason> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => {
            check_name(s, what)?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(bad(format!("{what} must be a non-empty string"))),
    }
}

/// Cross product of entity and type selectors, one draft each.
pub(crate) fn cross(
    action: Action,
    entities: &[EntitySelector],
    types: &[TypeSelector],
    attributes: &AttributeSelector,
) -> Result<Vec<Draft>, DenyReason> {
    check_expansion(entities.len().saturating_mul(types.len()), attributes)?;
    let mut out = Vec::new();
    for e in entities {
        for t in types {
            out.push(Draft::new(action, e.clone(), t.clone(), attributes.clone()));
        }
    }
    Ok(out)
}
