//! NGSI-LD (ETSI GS CIM 009), as served by Orion-LD, Scorpio, Stellio and FogFlow.
//!
//! Names are taken **as sent**: NGSI-LD expands short names (attribute names, types) against
//! the `@context` of the `Link` header or the body, but the model does not fetch or apply
//! contexts; an ACL written for an NGSI-LD broker must name attributes and types the way its
//! clients send them (short names with the usual context, or the expanded URIs).
//! A `type` query that is an NGSI-LD selection expression (`|`, `;`, parentheses) reaches
//! [`TypeSelector::Any`] (the conservative reading for a read).
//!
//! A read's attributes are the ones it returns (`attrs`) and the ones it filters on or names
//! (`q`, `geoproperty`, `geometryProperty`, `pick`, `omit`; a query body's `q` and `geoQ`); a
//! subscription's add `watchedAttributes`, `q` and `geoQ`. See [`super::named_attrs`].
//!
//! | endpoint (under `/ngsi-ld/v1`) | method | access |
//! |---|---|---|
//! | `/entities` | GET | Read per id×type (`id`/`idPattern`, `type`, `attrs`) |
//! | `/entities` | POST | Create per entity type (id, body attrs) |
//! | `/entities/{id}` | GET / DELETE / PATCH / PUT | Read / Delete All / Write body attrs / Write All |
//! | `/entities/{id}/attrs` | POST / PATCH | Write body attrs |
//! | `/entities/{id}/attrs/{a}` | PATCH / PUT / DELETE | Write a / Write a / Delete a |
//! | `/entityOperations/create` | POST | Create per entity |
//! | `/entityOperations/upsert` | POST | Create + Write per entity (`options=replace` → Write All) |
//! | `/entityOperations/update`, `/merge` | POST | Write per entity |
//! | `/entityOperations/delete` | POST | Delete All per id |
//! | `/entityOperations/query` | POST | Read per `entities` item, `attrs` |
//! | `/subscriptions` | POST | Subscribe per `entities` (Any if only watchedAttributes), `notification.attributes`, endpoint `notification.endpoint.uri` |
//! | `/subscriptions/{id}` | PATCH | Subscribe Any (the id may name any subscription) + Subscribe per body `entities`, endpoint if given |
//! | `/subscriptions[/{id}]` | GET / DELETE | Subscribe Any |
//! | `/csourceRegistrations` | POST | Register per `information[].entities`, property+relationship names, endpoint `endpoint` |
//! | `/csourceRegistrations[/{id}]` | GET / PATCH / DELETE | Register Any (PATCH: with the body's new `endpoint`, if any) |
//! | `/temporal/entities` | GET / POST | Read (as `/entities`) / Create + Write |
//! | `/temporal/entities/{id}` | GET / DELETE | Read / Delete All |
//! | `/temporal/entities/{id}/attrs` | POST | Write body attrs |
//! | `/temporal/entities/{id}/attrs/{a}[/{instance}]` | DELETE / PATCH (instance) | Delete a / Write a |
//! | `/temporal/entityOperations/query` | POST | Read (as `/entityOperations/query`) |
//! | `/types[/{t}]`, `/attributes[/{a}]` | GET | Read Any (type t / attribute a) |

use crate::access::{Action, AttributeSelector, EntitySelector, TypeSelector};
use crate::decision::DenyReason;
use serde_json::{Map, Value};

use super::canonical::{CanonicalPath, Query, TenantScope};
use super::{
    as_batch, as_object, attr_name_list, attribute_keys, bad, check_name, cross, endpoint_str,
    extend_checked, named_attrs, only_or_all, opt_str, parse_json, req_str, Classified, Draft,
};

/// Entity members that are not attributes.
const NOT_ATTRIBUTES: &[&str] = &["id", "type", "@context", "scope"];

type R = Result<Option<Classified>, DenyReason>;

pub(crate) fn classify(method: &str, canon: &CanonicalPath, body: &[u8]) -> R {
    use Action::*;
    use TenantScope as S;
    let q = &canon.query;
    let parts = canon.parts();
    let ["ngsi-ld", "v1", rest @ ..] = parts.as_slice() else {
        return Ok(None);
    };
    let only = |a: &str| AttributeSelector::Only(vec![a.to_string()]);
    match (method, rest) {
        ("GET", ["entities"] | ["temporal", "entities"]) => query_entities(q),
        ("POST", ["entities"]) => {
            let v = parse_json(body)?;
            Ok(Classified::new(S::Write, entity_drafts(&v, &[Create])?))
        }
        ("POST", ["temporal", "entities"]) => {
            let v = parse_json(body)?;
            Ok(Classified::new(
                S::Write,
                entity_drafts(&v, &[Create, Write])?,
            ))
        }
        (_, ["entities", id, tail @ ..]) => entity_path(method, id, tail, q, body),
        ("GET", ["temporal", "entities", id]) => {
            one(Read, id, type_param(q)?, query_attrs(q)?, S::Read)
        }
        ("DELETE", ["temporal", "entities", id]) => one(
            Delete,
            id,
            TypeSelector::Any,
            AttributeSelector::All,
            S::Write,
        ),
        ("POST", ["temporal", "entities", id, "attrs"]) => {
            one(Write, id, TypeSelector::Any, body_attrs(body)?, S::Write)
        }
        (
            "DELETE",
            ["temporal", "entities", id, "attrs", a] | ["temporal", "entities", id, "attrs", a, _],
        ) => one(Delete, id, TypeSelector::Any, only(a), S::Write),
        ("PATCH", ["temporal", "entities", id, "attrs", a, _]) => {
            one(Write, id, TypeSelector::Any, only(a), S::Write)
        }
        ("POST", ["entityOperations", op]) => batch(op, q, body),
        ("POST", ["temporal", "entityOperations", "query"]) => query_body(body),
        ("POST", ["subscriptions"]) => subscription(body, true),
        ("PATCH", ["subscriptions", _]) => super::by_id(subscription(body, false)?),
        ("GET", ["subscriptions"] | ["subscriptions", _]) | ("DELETE", ["subscriptions", _]) => {
            Ok(Classified::new(S::Subscribe, vec![Draft::any(Subscribe)]))
        }
        ("POST", ["csourceRegistrations"]) => registration(body),
        ("GET", ["csourceRegistrations"] | ["csourceRegistrations", _])
        | ("DELETE", ["csourceRegistrations", _]) => {
            Ok(Classified::new(S::Write, vec![Draft::any(Register)]))
        }
        ("PATCH", ["csourceRegistrations", _]) => {
            // The id may name anyone's registration; a new endpoint is where the broker will
            // forward requests, checked like any endpoint.
            let v = parse_json(body)?;
            let endpoint =
                endpoint_str(as_object(&v, "registration")?.get("endpoint"), "endpoint")?;
            Ok(Classified::new(
                S::Write,
                vec![Draft::any(Register).with_endpoint(endpoint)],
            ))
        }
        ("GET", ["types"] | ["attributes"]) => Ok(Classified::new(S::Read, vec![Draft::any(Read)])),
        ("GET", ["types", t]) => Ok(Classified::new(
            S::Read,
            vec![Draft::new(
                Read,
                EntitySelector::Any,
                TypeSelector::Type((*t).into()),
                AttributeSelector::All,
            )],
        )),
        ("GET", ["attributes", a]) => Ok(Classified::new(
            S::Read,
            vec![Draft::new(
                Read,
                EntitySelector::Any,
                TypeSelector::Any,
                only(a),
            )],
        )),
        _ => Ok(None),
    }
}

fn one(
    action: Action,
    id: &str,
    ty: TypeSelector,
    attrs: AttributeSelector,
    scope: TenantScope,
) -> R {
    check_name(id, "entity id")?;
    Ok(Classified::new(
        scope,
        vec![Draft::new(action, EntitySelector::Id(id.into()), ty, attrs)],
    ))
}

/// What a read returns (`attrs`) and what it filters on or names (`q`, `geoproperty`,
/// `pick`, `omit`, ...: [`named_attrs`]).
fn query_attrs(q: &Query) -> Result<AttributeSelector, DenyReason> {
    let projection = q.list("attrs")?.map_or(AttributeSelector::All, only_or_all);
    Ok(named_attrs::ld_url(q)?.join(projection))
}

/// `type=` as a list of types; a selection expression → Any.
fn type_list(q: &Query) -> Result<Vec<TypeSelector>, DenyReason> {
    match q.get("type")? {
        None => Ok(vec![TypeSelector::Any]),
        Some(t) if t.contains(['|', ';', '(', ')']) => Ok(vec![TypeSelector::Any]),
        Some(_) => Ok(q
            .list("type")?
            .unwrap_or_default()
            .into_iter()
            .map(TypeSelector::Type)
            .collect()),
    }
}

fn type_param(q: &Query) -> Result<TypeSelector, DenyReason> {
    match type_list(q)?.as_slice() {
        [one] => Ok(one.clone()),
        _ => Ok(TypeSelector::Any),
    }
}

fn query_entities(q: &Query) -> R {
    let ids = match (q.list("id")?, q.get("idPattern")?) {
        (Some(_), Some(_)) => return Err(bad("id and idPattern are incompatible")),
        (Some(ids), None) => ids.into_iter().map(EntitySelector::Id).collect(),
        (None, Some(p)) => vec![EntitySelector::IdPattern(p.into())],
        (None, None) => vec![EntitySelector::Any],
    };
    let drafts = cross(Action::Read, &ids, &type_list(q)?, &query_attrs(q)?)?;
    Ok(Classified::new(TenantScope::Read, drafts))
}

fn body_attrs(body: &[u8]) -> Result<AttributeSelector, DenyReason> {
    let v = parse_json(body)?;
    let obj = as_object(&v, "attributes")?;
    Ok(AttributeSelector::Only(attribute_keys(
        obj,
        NOT_ATTRIBUTES,
    )?))
}

fn entity_path(method: &str, id: &str, tail: &[&str], q: &Query, body: &[u8]) -> R {
    use Action::*;
    use TenantScope as S;
    let only = |a: &str| AttributeSelector::Only(vec![a.to_string()]);
    match (method, tail) {
        ("GET", []) => one(Read, id, type_param(q)?, query_attrs(q)?, S::Read),
        ("DELETE", []) => one(Delete, id, type_param(q)?, AttributeSelector::All, S::Write),
        ("PATCH", []) | ("POST" | "PATCH", ["attrs"]) => {
            one(Write, id, TypeSelector::Any, body_attrs(body)?, S::Write)
        }
        ("PUT", []) => {
            body_attrs(body)?;
            one(
                Write,
                id,
                TypeSelector::Any,
                AttributeSelector::All,
                S::Write,
            )
        }
        ("PATCH" | "PUT", ["attrs", a]) => one(Write, id, TypeSelector::Any, only(a), S::Write),
        ("DELETE", ["attrs", a]) => one(Delete, id, TypeSelector::Any, only(a), S::Write),
        _ => Ok(None),
    }
}

/// The type(s) of an NGSI-LD entity object: a string or a non-empty array of strings.
fn entity_types(obj: &Map<String, Value>, required: bool) -> Result<Vec<TypeSelector>, DenyReason> {
    match obj.get("type") {
        None if required => Err(bad("entity.type is required")),
        None => Ok(vec![TypeSelector::Any]),
        Some(Value::String(_)) => Ok(vec![TypeSelector::Type(
            req_str(obj, "type", "entity")?.into(),
        )]),
        Some(Value::Array(a)) if !a.is_empty() => super::as_list(a, "entity.type")?
            .iter()
            .map(|t| match t.as_str() {
                Some(s) if !s.is_empty() => {
                    check_name(s, "entity.type")?;
                    Ok(TypeSelector::Type(s.into()))
                }
                _ => Err(bad("entity.type must be a string or an array of strings")),
            })
            .collect(),
        Some(_) => Err(bad("entity.type must be a string or an array of strings")),
    }
}

/// Drafts for one entity object (or, for batches, each of an array of them): each action
/// once per type of the entity.
fn entity_drafts(v: &Value, actions: &[Action]) -> Result<Vec<Draft>, DenyReason> {
    let obj = as_object(v, "entity")?;
    let id = EntitySelector::Id(req_str(obj, "id", "entity")?.into());
    let creates = actions.contains(&Action::Create);
    let types = entity_types(obj, creates)?;
    let attrs = AttributeSelector::Only(attribute_keys(obj, NOT_ATTRIBUTES)?);
    super::check_expansion(actions.len().saturating_mul(types.len()), &attrs)?;
    let mut out = Vec::new();
    for action in actions {
        for t in &types {
            out.push(Draft::new(*action, id.clone(), t.clone(), attrs.clone()));
        }
    }
    Ok(out)
}

fn batch(op: &str, q: &Query, body: &[u8]) -> R {
    use Action::*;
    if op == "query" {
        return query_body(body);
    }
    if !matches!(op, "create" | "upsert" | "update" | "merge" | "delete") {
        return Ok(None);
    }
    let v = parse_json(body)?;
    let items = as_batch(&v, "batch body")?;
    let mut drafts = Vec::new();
    for item in items {
        match op {
            "create" => extend_checked(&mut drafts, entity_drafts(item, &[Create])?)?,
            "upsert" => {
                let mut d = entity_drafts(item, &[Create, Write])?;
                if q.has_option("replace")? {
                    for x in d.iter_mut().filter(|x| x.action == Write) {
                        x.attributes = AttributeSelector::All;
                    }
                }
                extend_checked(&mut drafts, d)?;
            }
            "update" | "merge" => extend_checked(&mut drafts, entity_drafts(item, &[Write])?)?,
            "delete" => {
                let id = item
                    .as_str()
                    .ok_or_else(|| bad("entityOperations/delete body must be an array of ids"))?;
                check_name(id, "entity id")?;
                drafts.push(Draft::new(
                    Delete,
                    EntitySelector::Id(id.into()),
                    TypeSelector::Any,
                    AttributeSelector::All,
                ));
            }
            _ => return Ok(None),
        }
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}

/// `{ "entities": [{id|idPattern, type}], ... }` → selectors; absent or empty → Any.
fn selectors(
    v: Option<&Value>,
    what: &str,
) -> Result<Vec<(EntitySelector, TypeSelector)>, DenyReason> {
    let Some(v) = v else {
        return Ok(vec![(EntitySelector::Any, TypeSelector::Any)]);
    };
    let arr = as_batch(v, what)?;
    if arr.is_empty() {
        return Ok(vec![(EntitySelector::Any, TypeSelector::Any)]);
    }
    let mut out = Vec::new();
    for item in arr {
        let obj = as_object(item, what)?;
        let e = match (opt_str(obj, "id", what)?, opt_str(obj, "idPattern", what)?) {
            (Some(_), Some(_)) => {
                return Err(bad(format!("{what}: id and idPattern are incompatible")));
            }
            (Some(id), None) => EntitySelector::Id(id.into()),
            (None, Some(p)) => EntitySelector::IdPattern(p.into()),
            (None, None) => EntitySelector::Any,
        };
        let t = match opt_str(obj, "type", what)? {
            Some(t) if !t.contains(['|', ';', '(', ')', ',']) => TypeSelector::Type(t.into()),
            _ => TypeSelector::Any,
        };
        out.push((e, t));
    }
    Ok(out)
}

fn query_body(body: &[u8]) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "query")?;
    let attrs = named_attrs::ld_body(obj)?.join(attr_name_list(obj.get("attrs"), "attrs")?);
    let drafts = Draft::per_selector(
        Action::Read,
        selectors(obj.get("entities"), "entities")?,
        &attrs,
        None,
    )?;
    Ok(Classified::new(TenantScope::Read, drafts))
}

fn subscription(body: &[u8], create: bool) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "subscription")?;
    let notification = obj
        .get("notification")
        .map(|n| as_object(n, "notification"))
        .transpose()?;
    if create && notification.is_none() {
        return Err(bad("subscription.notification is required"));
    }
    if create && !obj.contains_key("entities") && !obj.contains_key("watchedAttributes") {
        return Err(bad("subscription needs entities or watchedAttributes"));
    }
    let mut attrs = AttributeSelector::All;
    let mut endpoint = None;
    if let Some(n) = notification {
        attrs = attr_name_list(n.get("attributes"), "notification.attributes")?;
        match n.get("endpoint") {
            Some(e) => {
                let uri = as_object(e, "notification.endpoint")?.get("uri");
                endpoint = Some(
                    endpoint_str(uri, "notification.endpoint.uri")?
                        .ok_or_else(|| bad("notification.endpoint.uri is required"))?,
                );
            }
            None if create => return Err(bad("notification.endpoint is required")),
            None => {}
        }
    }
    // What it watches and filters on is read too (`watchedAttributes`, `q`, `geoQ`).
    let attrs = named_attrs::ld_body(obj)?.join(attrs);
    let drafts = Draft::per_selector(
        Action::Subscribe,
        selectors(obj.get("entities"), "entities")?,
        &attrs,
        endpoint.as_deref(),
    )?;
    Ok(Classified::new(TenantScope::Subscribe, drafts))
}

fn registration(body: &[u8]) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "registration")?;
    let endpoint = endpoint_str(obj.get("endpoint"), "endpoint")?
        .ok_or_else(|| bad("registration.endpoint is required"))?;
    let info = as_batch(
        obj.get("information")
            .ok_or_else(|| bad("registration.information is required"))?,
        "information",
    )?;
    if info.is_empty() {
        return Err(bad("registration.information must not be empty"));
    }
    let mut drafts = Vec::new();
    for i in info {
        let i = as_object(i, "information")?;
        let mut names = Vec::new();
        for key in ["propertyNames", "relationshipNames"] {
            if let AttributeSelector::Only(n) = attr_name_list(i.get(key), key)? {
                names.extend(n);
            }
        }
        let attrs = only_or_all(super::dedup_names(names));
        let more = Draft::per_selector(
            Action::Register,
            selectors(i.get("entities"), "information.entities")?,
            &attrs,
            Some(&endpoint),
        )?;
        super::extend_checked(&mut drafts, more)?;
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}
