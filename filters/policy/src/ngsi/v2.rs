//! FIWARE Orion NGSI v2 (telefonicaid/fiware-orion, doc/manuals/orion-api.md).
//!
//! | endpoint | method | access |
//! |---|---|---|
//! | `/version` | GET | none (empty list: touches no entity data) |
//! | `/v2/entities` | GET | Read per id×type (`id`/`idPattern`, `type`/`typePattern`, `attrs`) |
//! | `/v2/entities` | POST | Create (id, type or Orion's default `Thing`, body attrs); `options=upsert` adds Write |
//! | `/v2/entities/{id}` | GET / DELETE | Read (`type`, `attrs`) / Delete All |
//! | `/v2/entities/{id}/attrs` | GET / POST / PATCH / PUT | Read / Write body attrs / Write body attrs / Write All |
//! | `/v2/entities/{id}/attrs/{a}` | GET / PUT / DELETE | Read a / Write a / Delete a |
//! | `/v2/entities/{id}/attrs/{a}/value` | GET / PUT | Read a / Write a |
//! | `/v2/types`, `/v2/types/{t}` | GET | Read Any (type t) |
//! | `/v2/op/update` | POST | per entity: append/appendStrict → Create+Write; update → Write; replace → Write All; delete → Delete attrs (or All) |
//! | `/v2/op/query` | POST | Read per `entities` item (Any if none), `attrs` |
//! | `/v2/subscriptions` | POST | Subscribe per `subject.entities`, `notification.attrs`, endpoint = http/httpCustom/mqtt/mqttCustom url |
//! | `/v2/subscriptions[/{id}]` | GET / DELETE | Subscribe Any (listing shows others' endpoints and headers) |
//! | `/v2/subscriptions/{id}` | PATCH | Subscribe Any (the id may name any subscription) + Subscribe per body `subject.entities`, endpoint if given |
//! | `/v2/registrations` | POST | Register per `dataProvided.entities`, `dataProvided.attrs`, endpoint `provider.http.url` |
//! | `/v2/registrations[/{id}]` | GET / DELETE | Register Any |
//! | `/v2/notify` | POST | Create+Write per entity in `data` (Orion applies notifications as `append`) |
//!
//! `?type=` on `/v2/entities/{id}...` narrows the type; without it the access reaches any type.
//!
//! A read's attributes are the ones it returns (`attrs`) and the ones it filters or sorts on
//! (`q`, `mq`, `orderBy`, op/query `expression`; a geo-query reads every attribute); a
//! subscription's add those of `subject.condition` (`attrs`, `expression`). See
//! [`super::named_attrs`].

use crate::access::{Action, AttributeSelector, EntitySelector, TypeSelector};
use crate::decision::DenyReason;
use serde_json::{Map, Value};

use super::canonical::{CanonicalPath, Query, TenantScope};
use super::{
    as_batch, as_object, attr_name_list, attribute_keys, bad, check_name, cross, endpoint_str,
    named_attrs, only_or_all, opt_str, parse_json, req_str, Classified, Draft,
};

/// Orion's type for entities created without one.
pub const DEFAULT_TYPE: &str = "Thing";

type R = Result<Option<Classified>, DenyReason>;

pub(crate) fn classify(method: &str, canon: &CanonicalPath, body: &[u8]) -> R {
    use Action::*;
    use TenantScope as S;
    let q = &canon.query;
    let parts = canon.parts();
    match (method, parts.as_slice()) {
        ("GET", ["version"]) => Ok(Classified::new(S::Read, vec![])),
        ("GET", ["v2", "entities"]) => {
            let entities = id_selectors(q)?;
            let types = type_selectors(q)?;
            let attrs = query_attrs(q)?;
            Ok(Classified::new(
                S::Read,
                cross(Read, &entities, &types, &attrs)?,
            ))
        }
        ("POST", ["v2", "entities"]) => {
            let v = parse_json(body)?;
            let obj = as_object(&v, "entity")?;
            let id = req_str(obj, "id", "entity")?;
            let ty = opt_str(obj, "type", "entity")?;
            let attrs = AttributeSelector::Only(attribute_keys(obj, &["id", "type"])?);
            let mut drafts = vec![Draft::new(
                Create,
                EntitySelector::Id(id.into()),
                TypeSelector::Type(ty.unwrap_or(DEFAULT_TYPE).into()),
                attrs.clone(),
            )];
            if q.has_option("upsert")? {
                drafts.push(Draft::new(
                    Write,
                    EntitySelector::Id(id.into()),
                    type_or_any(ty),
                    attrs,
                ));
            }
            Ok(Classified::new(S::Write, drafts))
        }
        (_, ["v2", "entities", id, rest @ ..]) => entity_path(method, id, rest, q, body),
        ("GET", ["v2", "types"]) => Ok(Classified::new(S::Read, vec![Draft::any(Read)])),
        ("GET", ["v2", "types", t]) => Ok(Classified::new(
            S::Read,
            vec![Draft::new(
                Read,
                EntitySelector::Any,
                TypeSelector::Type((*t).into()),
                AttributeSelector::All,
            )],
        )),
        ("POST", ["v2", "op", "update"]) => op_update(body),
        ("POST", ["v2", "op", "query"]) => op_query(q, body),
        ("POST", ["v2", "subscriptions"]) => subscription(body, true),
        ("PATCH", ["v2", "subscriptions", _]) => super::by_id(subscription(body, false)?),
        ("GET", ["v2", "subscriptions"] | ["v2", "subscriptions", _])
        | ("DELETE", ["v2", "subscriptions", _]) => {
            Ok(Classified::new(S::Subscribe, vec![Draft::any(Subscribe)]))
        }
        ("POST", ["v2", "registrations"]) => registration(body),
        ("GET", ["v2", "registrations"] | ["v2", "registrations", _])
        | ("DELETE", ["v2", "registrations", _]) => {
            Ok(Classified::new(S::Write, vec![Draft::any(Register)]))
        }
        ("POST", ["v2", "notify"]) => notify(body),
        _ => Ok(None),
    }
}

fn type_or_any(t: Option<&str>) -> TypeSelector {
    t.map_or(TypeSelector::Any, |t| TypeSelector::Type(t.into()))
}

fn id_selectors(q: &Query) -> Result<Vec<EntitySelector>, DenyReason> {
    match (q.list("id")?, q.get("idPattern")?) {
        (Some(_), Some(_)) => Err(bad("id and idPattern are incompatible")),
        (Some(ids), None) => Ok(ids.into_iter().map(EntitySelector::Id).collect()),
        (None, Some(p)) => Ok(vec![EntitySelector::IdPattern(p.into())]),
        (None, None) => Ok(vec![EntitySelector::Any]),
    }
}

fn type_selectors(q: &Query) -> Result<Vec<TypeSelector>, DenyReason> {
    match (q.list("type")?, q.get("typePattern")?) {
        (Some(_), Some(_)) => Err(bad("type and typePattern are incompatible")),
        (Some(ts), None) => Ok(ts.into_iter().map(TypeSelector::Type).collect()),
        (None, Some(p)) => Ok(vec![TypeSelector::Pattern(p.into())]),
        (None, None) => Ok(vec![TypeSelector::Any]),
    }
}

/// What a read returns (`attrs`) and what it filters and sorts on (`q`, `mq`, `orderBy`,
/// geo-queries: [`named_attrs`]).
fn query_attrs(q: &Query) -> Result<AttributeSelector, DenyReason> {
    let projection = q.list("attrs")?.map_or(AttributeSelector::All, only_or_all);
    Ok(named_attrs::v2_url(q)?.join(projection))
}

fn entity_path(method: &str, id: &str, rest: &[&str], q: &Query, body: &[u8]) -> R {
    use Action::*;
    use TenantScope as S;
    check_name(id, "entity id")?;
    let entity = EntitySelector::Id(id.into());
    let ty = type_or_any(q.get("type")?);
    let one = |action, attrs, scope| {
        Ok(Classified::new(
            scope,
            vec![Draft::new(action, entity.clone(), ty.clone(), attrs)],
        ))
    };
    let only = |a: &str| AttributeSelector::Only(vec![a.to_string()]);
    match (method, rest) {
        ("GET", []) => one(Read, query_attrs(q)?, S::Read),
        ("DELETE", []) => one(Delete, AttributeSelector::All, S::Write),
        ("GET", ["attrs"]) => one(Read, query_attrs(q)?, S::Read),
        ("POST" | "PATCH", ["attrs"]) => {
            let v = parse_json(body)?;
            let obj = as_object(&v, "attributes")?;
            one(
                Write,
                AttributeSelector::Only(attribute_keys(obj, &[])?),
                S::Write,
            )
        }
        ("PUT", ["attrs"]) => {
            let v = parse_json(body)?;
            as_object(&v, "attributes")?;
            one(Write, AttributeSelector::All, S::Write)
        }
        ("GET", ["attrs", a]) | ("GET", ["attrs", a, "value"]) => one(Read, only(a), S::Read),
        ("PUT", ["attrs", a]) | ("PUT", ["attrs", a, "value"]) => one(Write, only(a), S::Write),
        ("DELETE", ["attrs", a]) => one(Delete, only(a), S::Write),
        _ => Ok(None),
    }
}

/// `id`/`idPattern` and `type`/`typePattern` of an entity selector object (op/query,
/// subscription subject, registration dataProvided). Neither id nor idPattern → Any.
fn selector(
    obj: &Map<String, Value>,
    what: &str,
) -> Result<(EntitySelector, TypeSelector), DenyReason> {
    let e = match (opt_str(obj, "id", what)?, opt_str(obj, "idPattern", what)?) {
        (Some(_), Some(_)) => {
            return Err(bad(format!("{what}: id and idPattern are incompatible")))
        }
        (Some(id), None) => EntitySelector::Id(id.into()),
        (None, Some(p)) => EntitySelector::IdPattern(p.into()),
        (None, None) => EntitySelector::Any,
    };
    let t = match (
        opt_str(obj, "type", what)?,
        opt_str(obj, "typePattern", what)?,
    ) {
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "{what}: type and typePattern are incompatible"
            )))
        }
        (Some(t), None) => TypeSelector::Type(t.into()),
        (None, Some(p)) => TypeSelector::Pattern(p.into()),
        (None, None) => TypeSelector::Any,
    };
    Ok((e, t))
}

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
    arr.iter()
        .map(|i| selector(as_object(i, what)?, what))
        .collect()
}

fn op_update(body: &[u8]) -> R {
    use Action::*;
    let v = parse_json(body)?;
    let obj = as_object(&v, "op/update body")?;
    let action = req_str(obj, "actionType", "op/update body")?;
    let entities = as_batch(
        obj.get("entities")
            .ok_or_else(|| bad("op/update body.entities is required"))?,
        "entities",
    )?;
    let mut drafts = Vec::new();
    for e in entities {
        let e = as_object(e, "entity")?;
        let id = EntitySelector::Id(req_str(e, "id", "entity")?.into());
        let ty = opt_str(e, "type", "entity")?;
        let attrs = attribute_keys(e, &["id", "type"])?;
        let only = AttributeSelector::Only(attrs.clone());
        match action {
            "append" | "appendStrict" => {
                let created = TypeSelector::Type(ty.unwrap_or(DEFAULT_TYPE).into());
                drafts.push(Draft::new(Create, id.clone(), created, only.clone()));
                drafts.push(Draft::new(Write, id, type_or_any(ty), only));
            }
            "update" => drafts.push(Draft::new(Write, id, type_or_any(ty), only)),
            "replace" => drafts.push(Draft::new(
                Write,
                id,
                type_or_any(ty),
                AttributeSelector::All,
            )),
            "delete" => {
                let a = if attrs.is_empty() {
                    AttributeSelector::All
                } else {
                    only
                };
                drafts.push(Draft::new(Delete, id, type_or_any(ty), a));
            }
            other => return Err(bad(format!("unknown actionType {other:?}"))),
        }
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}

fn op_query(q: &Query, body: &[u8]) -> R {
    let v = if body.is_empty() {
        Value::Object(Map::new())
    } else {
        parse_json(body)?
    };
    let obj = as_object(&v, "op/query body")?;
    if obj.contains_key("attrs") && obj.contains_key("attributes") {
        return Err(bad("op/query: attrs and attributes are incompatible"));
    }
    let projection = attr_name_list(obj.get("attrs").or_else(|| obj.get("attributes")), "attrs")?;
    let attrs = named_attrs::v2_op_query(q, obj)?.join(projection);
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
    let subject = obj
        .get("subject")
        .map(|s| as_object(s, "subject"))
        .transpose()?;
    let notification = obj
        .get("notification")
        .map(|n| as_object(n, "notification"))
        .transpose()?;
    if create && (subject.is_none() || notification.is_none()) {
        return Err(bad("subscription requires subject and notification"));
    }
    let entities = subject.and_then(|s| s.get("entities"));
    if create && entities.and_then(Value::as_array).is_none_or(Vec::is_empty) {
        return Err(bad(
            "subscription subject.entities must be a non-empty array",
        ));
    }
    let mut attrs = AttributeSelector::All;
    let mut endpoint = None;
    if let Some(n) = notification {
        attrs = attr_name_list(n.get("attrs"), "notification.attrs")?;
        for kind in ["http", "httpCustom", "mqtt", "mqttCustom"] {
            if let Some(k) = n.get(kind) {
                if endpoint.is_some() {
                    return Err(bad("notification has more than one endpoint"));
                }
                let url = as_object(k, kind)?.get("url");
                let url = endpoint_str(url, &format!("notification.{kind}.url"))?
                    .ok_or_else(|| bad(format!("notification.{kind}.url is required")))?;
                endpoint = Some(url);
            }
        }
        if create && endpoint.is_none() {
            return Err(bad(
                "notification needs http, httpCustom, mqtt or mqttCustom",
            ));
        }
    }
    // What it watches and filters on is read too (`subject.condition`).
    let attrs = named_attrs::v2_subscription(subject)?.join(attrs);
    let drafts = Draft::per_selector(
        Action::Subscribe,
        selectors(entities, "subject.entities")?,
        &attrs,
        endpoint.as_deref(),
    )?;
    Ok(Classified::new(TenantScope::Subscribe, drafts))
}

fn registration(body: &[u8]) -> R {
    let v = parse_json(body)?;
    let obj = as_object(&v, "registration")?;
    let data = as_object(
        obj.get("dataProvided")
            .ok_or_else(|| bad("registration.dataProvided is required"))?,
        "dataProvided",
    )?;
    let provider = as_object(
        obj.get("provider")
            .ok_or_else(|| bad("registration.provider is required"))?,
        "provider",
    )?;
    let http = as_object(
        provider
            .get("http")
            .ok_or_else(|| bad("provider.http is required"))?,
        "provider.http",
    )?;
    let url = endpoint_str(http.get("url"), "provider.http.url")?
        .ok_or_else(|| bad("provider.http.url is required"))?;
    let attrs = attr_name_list(data.get("attrs"), "dataProvided.attrs")?;
    let entities = data
        .get("entities")
        .ok_or_else(|| bad("dataProvided.entities is required"))?;
    let drafts = Draft::per_selector(
        Action::Register,
        selectors(Some(entities), "dataProvided.entities")?,
        &attrs,
        Some(&url),
    )?;
    Ok(Classified::new(TenantScope::Write, drafts))
}

fn notify(body: &[u8]) -> R {
    use Action::*;
    let v = parse_json(body)?;
    let obj = as_object(&v, "notification")?;
    let data = as_batch(
        obj.get("data")
            .ok_or_else(|| bad("notification.data is required"))?,
        "data",
    )?;
    let mut drafts = Vec::new();
    for e in data {
        let e = as_object(e, "entity")?;
        let id = EntitySelector::Id(req_str(e, "id", "entity")?.into());
        let ty = opt_str(e, "type", "entity")?;
        let only = AttributeSelector::Only(attribute_keys(e, &["id", "type"])?);
        drafts.push(Draft::new(
            Create,
            id.clone(),
            TypeSelector::Type(ty.unwrap_or(DEFAULT_TYPE).into()),
            only.clone(),
        ));
        drafts.push(Draft::new(Write, id, type_or_any(ty), only));
    }
    Ok(Classified::new(TenantScope::Write, drafts))
}
