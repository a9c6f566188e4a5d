//! FogFlow's NGSI9/NGSI10 API (smartfog/fogflow: `broker/restapisrv.go` for the broker,
//! `discovery/main.go` for IoT Discovery). Routes are matched exactly as FogFlow's
//! go-json-rest router registers them, case-sensitively: the broker serves `/ngsi10/...`, IoT
//! Discovery serves `/ngsi9/...` (lower case). The upper-case `/NGSI9/...` routes are gone
//! from FogFlow's broker (and were never Orion's): refused as not served (400).
//! The broker's `/v2/...` and `/ngsi-ld/v1/...` routes are classified by [`super::v2`] and
//! [`super::ld`]; with the `fogflow` broker setting only the routes of [`served`] pass, and
//! [`widen`] makes each access what FogFlow really does.
//!
//! `entityId.isPattern` is accepted as a boolean or the strings `"true"`/`"false"` (the seed's
//! registerContext example sends `"false"`); a pattern id becomes [`EntitySelector::IdPattern`],
//! a pattern without id [`EntitySelector::Any`]. Updates by pattern are refused (400).
//!
//! | endpoint | method | access |
//! |---|---|---|
//! | `/ngsi10/updateContext`, `/v1/updateContext` | POST | per contextElement: UPDATE/APPEND → Create + Write (FogFlow creates unknown entities); DELETE → Delete attrs (All if none) |
//! | `/ngsi10/notifyContext` | POST | Create + Write per `contextResponses[].contextElement` |
//! | `/ngsi10/queryContext`, `/v1/queryContext` | POST | Read per `entities` item, `attributes` and the attributes `restriction` filters on |
//! | `/ngsi10/subscribeContext` | POST | Subscribe per `entities`, `attributes` (and those of `restriction`, `notifyConditions`), endpoint `reference` |
//! | `/ngsi10/unsubscribeContext` | POST | Subscribe Any |
//! | `/ngsi10/entity[/{id}[/{attr}]]` | GET | Read (Any / id / id+attr) |
//! | `/ngsi10/entity/{id}` | DELETE | Delete All |
//! | `/ngsi10/subscription[/{id}]` | GET, DELETE (id) | Subscribe Any |
//! | `/ngsi9/registerContext` | POST | Register per registration entity, attributes, endpoint `providingApplication` (none if empty) |
//! | `/ngsi9/registration/{id}` | GET / DELETE | Register Any |
//! | `/ngsi9/discoverContextAvailability` | POST | Read per `entities`, `attributes` |
//! | `/ngsi9/subscribeContextAvailability` | POST | Subscribe per `entities`, endpoint `reference` |
//! | `/ngsi9/unsubscribeContextAvailability` | POST | Subscribe Any |
//!
//! `/v1/updateContext` is also Orion's legacy NGSIv1 update (still served by Orion 3.10, sent
//! by e.g. ngsijs' v1 API and ngsi-go), whose contextElements carry `id`/`type`/`isPattern`
//! at top level instead of an `entityId` object: on that route both forms are accepted, and
//! an element with both is refused (400: Orion and FogFlow would read different entities).
//! `/ngsi10/updateContext` takes the `entityId` form only. `/v1/queryContext` is Orion's
//! legacy NGSIv1 query (Orion 3.10 serves it on `/v1/` and `/ngsi10/`; ngsijs sends it): its
//! `entities` items have the same `id`/`type`/`isPattern` members as FogFlow's, so both routes
//! share one reading.

use crate::access::{Action, AttributeSelector, EntitySelector, Tenant, TypeSelector};
use crate::decision::DenyReason;
use serde_json::{Map, Value};

use super::canonical::{CanonicalPath, TenantScope};
use super::{
    as_batch, as_object, bad, check_name, endpoint_str, named_attrs, only_or_all, opt_str,
    parse_json, req_str, Classified, Draft,
};

type R = Result<Option<Classified>, DenyReason>;

/// The routes FogFlow serves (smartfog/fogflow `broker/restapisrv.go` and
/// `discovery/main.go`), by method and canonical path (a trailing `/` is already dropped, so
/// FogFlow's `/ngsi-ld/v1/subscriptions/` is `ngsi-ld/v1/subscriptions`). The broker no longer
/// routes `/NGSI9/registerContext`: it is not here. Routes FogFlow serves that the model does
/// not classify (`notifyContextAvailability`, `/ngsi9/broker`, ...) stay unclassified (403).
pub(crate) fn served(method: &str, parts: &[&str]) -> bool {
    matches!(
        (method, parts),
        ("GET", ["version"])
            // broker: NGSI10
            | ("GET", ["ngsi10", "entity"] | ["ngsi10", "entity", _] | ["ngsi10", "entity", _, _])
            | ("DELETE", ["ngsi10", "entity", _])
            | ("GET", ["ngsi10", "subscription"] | ["ngsi10", "subscription", _])
            | ("DELETE", ["ngsi10", "subscription", _])
            | (
                "POST",
                ["ngsi10", "updateContext" | "queryContext" | "notifyContext"
                    | "subscribeContext" | "unsubscribeContext" | "notifyContextAvailability"]
            )
            // broker: NGSI v2
            | ("GET" | "POST", ["v2", "entities"])
            | ("GET", ["v2", "entities", _])
            | ("POST", ["v2", "notify"])
            // broker: NGSI-LD
            | ("POST", ["ngsi-ld", "v1", "entityOperations", "upsert" | "query"])
            | ("GET" | "POST", ["ngsi-ld", "v1", "entities"])
            | ("GET" | "DELETE", ["ngsi-ld", "v1", "entities", _])
            | ("DELETE", ["ngsi-ld", "v1", "entities", _, "attrs", _])
            | ("POST", ["ngsi-ld", "v1", "subscriptions" | "notifyContext"])
            | ("DELETE", ["ngsi-ld", "v1", "subscriptions", _])
            // IoT Discovery: NGSI9
            | (
                "POST",
                ["ngsi9", "registerContext" | "discoverContextAvailability"
                    | "subscribeContextAvailability" | "unsubscribeContextAvailability"]
            )
            | ("GET" | "DELETE", ["ngsi9", "registration", _])
    )
}

/// What FogFlow really does with a classified request (read in its broker source):
/// * it keys entities by id alone: the `type` of update bodies and `?type=` are ignored, so
///   every access reaches any type;
/// * `GET` by id returns every attribute whatever `attrs` says, and notifications carry the
///   whole entity: reads and subscriptions reach all attributes;
/// * `updateContext` `DELETE` removes the whole entity even when attributes are listed (and
///   its NGSI-LD attribute delete is a no-op): deletes reach all attributes;
/// * a create of an existing id overwrites it: a create is also a write.
pub(crate) fn widen(drafts: Vec<Draft>) -> Vec<Draft> {
    let mut out = Vec::with_capacity(drafts.len());
    for mut d in drafts {
        d.entity_type = TypeSelector::Any;
        if matches!(d.action, Action::Read | Action::Subscribe | Action::Delete) {
            d.attributes = AttributeSelector::All;
        }
        let also_write = d.action == Action::Create;
        let write = also_write.then(|| Draft {
            action: Action::Write,
            ..d.clone()
        });
        out.push(d);
        out.extend(write);
    }
    out.dedup();
    out
}

/// FogFlow has no tenants nor service paths: every request reaches the one space, which rules
/// name as the default service `""` and the whole tree `/#` (entity-acl refuses other rules
/// when the broker is FogFlow).
pub(crate) fn tenant() -> Tenant {
    Tenant {
        service: String::new(),
        service_paths: vec!["/#".into()],
    }
}

pub(crate) fn classify(method: &str, canon: &CanonicalPath, body: &[u8]) -> R {
    use Action::*;
    use TenantScope as S;
    let parts = canon.parts();
    match (method, parts.as_slice()) {
        ("POST", ["ngsi10", "updateContext"]) => update_context(body, false),
        ("POST", ["v1", "updateContext"]) => update_context(body, true),
        ("POST", ["ngsi10", "notifyContext"]) => notify_context(body),
        ("POST", ["ngsi10" | "v1", "queryContext"] | ["ngsi9", "discoverContextAvailability"]) => {
            let v = parse_json(body)?;
            let obj = as_object(&v, "request")?;
            let attrs = named_attrs::ngsi10_body(obj)?.join(attributes(obj.get("attributes"))?);
            let drafts =
                Draft::per_selector(Read, entity_ids(obj.get("entities"), true)?, &attrs, None)?;
            Ok(Classified::new(S::Read, drafts))
        }
        ("POST", ["ngsi10", "subscribeContext"] | ["ngsi9", "subscribeContextAvailability"]) => {
            let v = parse_json(body)?;
            let obj = as_object(&v, "subscription")?;
            let attrs = named_attrs::ngsi10_body(obj)?.join(attributes(obj.get("attributes"))?);
            let reference = endpoint_str(obj.get("reference"), "reference")?
                .ok_or_else(|| bad("subscription.reference is required"))?;
            let drafts = Draft::per_selector(
                Subscribe,
                entity_ids(obj.get("entities"), true)?,
                &attrs,
                Some(&reference),
            )?;
            Ok(Classified::new(S::Subscribe, drafts))
        }
        (
            "POST",
            ["ngsi10", "unsubscribeContext"] | ["ngsi9", "unsubscribeContextAvailability"],
        ) => {
            let v = parse_json(body)?;
            req_str(
                as_object(&v, "unsubscribe")?,
                "subscriptionId",
                "unsubscribe",
            )?;
            Ok(Classified::new(S::Subscribe, vec![Draft::any(Subscribe)]))
        }
        ("GET", ["ngsi10", "entity"]) => Ok(Classified::new(S::Read, vec![Draft::any(Read)])),
        ("GET", ["ngsi10", "entity", id]) => by_id(Read, id, AttributeSelector::All, S::Read),
        ("GET", ["ngsi10", "entity", id, a]) => by_id(
            Read,
            id,
            AttributeSelector::Only(vec![(*a).into()]),
            S::Read,
        ),
        ("DELETE", ["ngsi10", "entity", id]) => by_id(Delete, id, AttributeSelector::All, S::Write),
        ("GET", ["ngsi10", "subscription"] | ["ngsi10", "subscription", _])
        | ("DELETE", ["ngsi10", "subscription", _]) => {
            Ok(Classified::new(S::Subscribe, vec![Draft::any(Subscribe)]))
        }
        ("POST", ["ngsi9", "registerContext"]) => register_context(body),
        ("GET" | "DELETE", ["ngsi9", "registration", _]) => {
            Ok(Classified::new(S::Write, vec![Draft::any(Register)]))
        }
        _ => Ok(None),
    }
}

fn by_id(action: Action, id: &str, attrs: AttributeSelector, scope: TenantScope) -> R {
    check_name(id, "entity id")?;
    Ok(Classified::new(
        scope,
        vec![Draft::new(
            action,
            EntitySelector::Id(id.into()),
            TypeSelector::Any,
            attrs,
        )],
    ))
}

fn is_pattern(obj: &Map<String, Value>) -> Result<bool, DenyReason> {
    match obj.get("isPattern") {
        None | Some(Value::Bool(false)) => Ok(false),
        Some(Value::Bool(true)) => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(_) => Err(bad("entityId.isPattern must be true or false")),
    }
}

/// One NGSI10 `entityId` object → selectors. `allow_pattern` false refuses patterns.
fn entity_id(v: &Value, allow_pattern: bool) -> Result<(EntitySelector, TypeSelector), DenyReason> {
    let obj = as_object(v, "entityId")?;
    let pattern = is_pattern(obj)?;
    let id = opt_str(obj, "id", "entityId")?;
    let ty = opt_str(obj, "type", "entityId")?
        .map_or(TypeSelector::Any, |t| TypeSelector::Type(t.into()));
    let e = match (id, pattern) {
        (_, true) if !allow_pattern => return Err(bad("entityId.isPattern is not allowed here")),
        (Some(id), false) => EntitySelector::Id(id.into()),
        (None, false) => return Err(bad("entityId.id is required unless isPattern is true")),
        (Some(p), true) => EntitySelector::IdPattern(p.into()),
        (None, true) => EntitySelector::Any,
    };
    Ok((e, ty))
}

fn entity_ids(
    v: Option<&Value>,
    allow_pattern: bool,
) -> Result<Vec<(EntitySelector, TypeSelector)>, DenyReason> {
    let v = v.ok_or_else(|| bad("entities is required"))?;
    let arr = as_batch(v, "entities")?;
    if arr.is_empty() {
        return Err(bad("entities must not be empty"));
    }
    arr.iter().map(|e| entity_id(e, allow_pattern)).collect()
}

/// `attributes`: names as strings (queryContext) or objects with `name` (updateContext,
/// registerContext). Absent or empty → All.
fn attributes(v: Option<&Value>) -> Result<AttributeSelector, DenyReason> {
    Ok(only_or_all(attribute_names(v)?))
}

fn attribute_names(v: Option<&Value>) -> Result<Vec<String>, DenyReason> {
    let Some(v) = v else {
        return Ok(vec![]);
    };
    let arr = as_batch(v, "attributes")?;
    let mut names = Vec::with_capacity(arr.len());
    for a in arr {
        let name = match a {
            Value::String(s) => {
                check_name(s, "attribute name")?;
                s.as_str()
            }
            Value::Object(o) => req_str(o, "name", "attribute")?,
            _ => return Err(bad("attributes must be names or objects with a name")),
        };
        names.push(name.to_string());
    }
    Ok(super::dedup_names(names))
}

/// Members of an Orion NGSIv1 contextElement that name its entity (no `entityId` object).
const ORION_V1_ENTITY_KEYS: [&str; 3] = ["id", "type", "isPattern"];

/// Drafts for one `contextElement` under an update action. `orion_v1` also accepts Orion's
/// NGSIv1 form (`id`/`type`/`isPattern` in the element itself, see the module docs).
fn context_element(v: &Value, action: &str, orion_v1: bool) -> Result<Vec<Draft>, DenyReason> {
    use Action::*;
    let ce = as_object(v, "contextElement")?;
    let flat = ORION_V1_ENTITY_KEYS.iter().any(|k| ce.contains_key(*k));
    let (e, t) = match ce.get("entityId") {
        Some(_) if orion_v1 && flat => {
            return Err(bad(
                "contextElement has both entityId and a top-level id/type/isPattern",
            ));
        }
        Some(entity_id_v) => entity_id(entity_id_v, false)?,
        None if orion_v1 && flat => entity_id(v, false)?,
        None => return Err(bad("contextElement.entityId is required")),
    };
    let names = attribute_names(ce.get("attributes"))?;
    Ok(match action {
        "UPDATE" | "APPEND" => {
            let only = AttributeSelector::Only(names);
            vec![
                Draft::new(Create, e.clone(), t.clone(), only.clone()),
                Draft::new(Write, e, t, only),
            ]
        }
        "DELETE" => vec![Draft::new(Delete, e, t, only_or_all(names))],
        other => return Err(bad(format!("unknown updateAction {other:?}"))),
    })
}

fn update_context(body: &[u8], orion_v1: bool) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "updateContext")?;
    let action = req_str(obj, "updateAction", "updateContext")?;
    let elements = as_batch(
        obj.get("contextElements")
            .ok_or_else(|| bad("contextElements is required"))?,
        "contextElements",
    )?;
    let mut drafts = Vec::new();
    for ce in elements {
        drafts.extend(context_element(ce, action, orion_v1)?);
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}

fn notify_context(body: &[u8]) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "notifyContext")?;
    let responses = as_batch(
        obj.get("contextResponses")
            .ok_or_else(|| bad("contextResponses is required"))?,
        "contextResponses",
    )?;
    let mut drafts = Vec::new();
    for r in responses {
        let ce = as_object(r, "contextResponse")?
            .get("contextElement")
            .ok_or_else(|| bad("contextResponse.contextElement is required"))?;
        drafts.extend(context_element(ce, "APPEND", false)?);
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}

fn register_context(body: &[u8]) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "registerContext")?;
    let regs = as_batch(
        obj.get("contextRegistrations")
            .ok_or_else(|| bad("contextRegistrations is required"))?,
        "contextRegistrations",
    )?;
    if regs.is_empty() {
        return Err(bad("contextRegistrations must not be empty"));
    }
    let mut drafts = Vec::new();
    for r in regs {
        let r = as_object(r, "contextRegistration")?;
        let endpoint = match r.get("providingApplication") {
            Some(Value::String(s)) if s.is_empty() => None,
            other => endpoint_str(other, "providingApplication")?,
        };
        let attrs = attributes(r.get("attributes"))?;
        let more = Draft::per_selector(
            Action::Register,
            entity_ids(r.get("entities"), true)?,
            &attrs,
            endpoint.as_deref(),
        )?;
        super::extend_checked(&mut drafts, more)?;
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}
