use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::config::{BrokerApi, RegistrySource};
use super::wire::{self, CreateBody, Endpoint, ListFormat};
use super::*;
use crate::access::{Tenant, TypeSelector};
use crate::ngsi::{classify, NgsiRequest};

fn config(v: Value) -> OwnershipConfig {
    serde_json::from_value(v).unwrap()
}

fn engine(v: Value) -> Ownership {
    Ownership::new(config(v)).unwrap()
}

fn broker() -> Ownership {
    engine(
        json!({"admin_roles": ["admin"], "device_entity_id": "urn:Device:{device}",
                  "sources": [{"kind": "broker", "cluster": "orion"}]}),
    )
}

fn user(sub: &str) -> Identity {
    Identity::new(IdentityKind::Jwt, sub)
}

fn request(method: &str, path: &str, body: &str) -> RequestAccess {
    let headers: Vec<(String, String)> = Vec::new();
    classify(&NgsiRequest {
        broker: crate::ngsi::broker_for_path(path),
        method,
        path,
        headers: &headers,
        body: body.as_bytes(),
    })
    .unwrap()
}

fn lamp1() -> Record {
    Record {
        owner: "alice".into(),
        delegations: vec![
            Delegation {
                grantee: Grantee::User("bob".into()),
                access: DelegatedAccess::Read,
            },
            Delegation {
                grantee: Grantee::Group("ops".into()),
                access: DelegatedAccess::ReadWrite,
            },
        ],
        public: false,
    }
}

fn records(entries: &[(&str, Option<Record>)]) -> HashMap<EntityKey, Option<Record>> {
    entries
        .iter()
        .map(|(id, r)| (EntityKey::new("", *id), r.clone()))
        .collect()
}

fn verdict(e: Eval) -> Verdict {
    match e {
        Eval::Done(v) => v,
        Eval::Need(k) => panic!("still needs {k:?}"),
    }
}

fn status(
    own: &Ownership,
    id: Option<&Identity>,
    req: &RequestAccess,
    list: bool,
    recs: &HashMap<EntityKey, Option<Record>>,
) -> u32 {
    match verdict(own.evaluate(id, req, list, recs)).decision {
        Decision::Allow(_) => 200,
        Decision::Deny(r) => r.status(),
    }
}

#[test]
fn asks_for_the_records_it_needs_and_marks_creates_fresh() {
    let own = broker();
    let req = request(
        "POST",
        "/v2/op/update",
        r#"{"actionType": "append", "entities": [{"id": "A"}, {"id": "B"}]}"#,
    );
    let alice = user("alice");
    match own.evaluate(Some(&alice), &req, false, &HashMap::new()) {
        Eval::Need(keys) => assert_eq!(
            keys,
            vec![
                (EntityKey::new("", "A"), true),
                (EntityKey::new("", "B"), true)
            ]
        ),
        other => panic!("{other:?}"),
    }
    let read = request("GET", "/v2/entities/A", "");
    assert_eq!(
        own.evaluate(Some(&alice), &read, false, &HashMap::new()),
        Eval::Need(vec![(EntityKey::new("", "A"), false)])
    );
}

#[test]
fn read_rules() {
    let own = broker();
    let req = request("GET", "/v2/entities/Lamp1", "");
    let recs = records(&[("Lamp1", Some(lamp1()))]);
    assert_eq!(status(&own, Some(&user("alice")), &req, false, &recs), 200);
    assert_eq!(status(&own, Some(&user("bob")), &req, false, &recs), 200);
    assert_eq!(
        status(&own, Some(&user("mallory")), &req, false, &recs),
        403
    );
    assert_eq!(status(&own, None, &req, false, &recs), 403);
    let mut ops = user("tom");
    ops.groups = vec!["ops".into()];
    assert_eq!(status(&own, Some(&ops), &req, false, &recs), 200);
    let mut public = lamp1();
    public.public = true;
    let recs = records(&[("Lamp1", Some(public))]);
    assert_eq!(status(&own, None, &req, false, &recs), 200);
    assert_eq!(
        status(&own, Some(&user("mallory")), &req, false, &recs),
        200
    );
}

#[test]
fn write_delete_and_owner_attribute_rules() {
    let own = broker();
    let recs = records(&[("Lamp1", Some(lamp1()))]);
    let mut ops = user("tom");
    ops.groups = vec!["ops".into()];
    let patch = request(
        "PATCH",
        "/v2/entities/Lamp1/attrs",
        r#"{"on": {"value": 1}}"#,
    );
    assert_eq!(status(&own, Some(&ops), &patch, false, &recs), 200);
    assert_eq!(
        status(&own, Some(&user("bob")), &patch, false, &recs),
        403,
        "read delegate"
    );
    assert_eq!(
        status(&own, Some(&user("alice")), &patch, false, &recs),
        200
    );
    let delete = request("DELETE", "/v2/entities/Lamp1", "");
    assert_eq!(status(&own, Some(&ops), &delete, false, &recs), 403);
    assert_eq!(
        status(&own, Some(&user("alice")), &delete, false, &recs),
        200
    );
    for (m, p, b) in [
        (
            "PATCH",
            "/v2/entities/Lamp1/attrs",
            r#"{"owner": {"value": "tom"}}"#,
        ),
        (
            "POST",
            "/v2/entities/Lamp1/attrs",
            r#"{"delegations": {"value": []}}"#,
        ),
        ("DELETE", "/v2/entities/Lamp1/attrs/owner", ""),
        ("PUT", "/v2/entities/Lamp1/attrs", r#"{"on": {"value": 1}}"#),
        ("PUT", "/v2/entities/Lamp1/attrs/owner/value", r#""tom""#),
    ] {
        let req = request(m, p, b);
        assert_eq!(status(&own, Some(&ops), &req, false, &recs), 403, "{m} {p}");
        let v = verdict(own.evaluate(Some(&user("alice")), &req, false, &recs));
        assert!(v.decision.is_allowed(), "{m} {p}");
        assert_eq!(v.invalidate, vec![EntityKey::new("", "Lamp1")], "{m} {p}");
    }
}

#[test]
fn creates() {
    let own = broker();
    let create = request("POST", "/v2/entities", r#"{"id": "New1", "type": "Lamp"}"#);
    let v = verdict(own.evaluate(
        Some(&user("alice")),
        &create,
        false,
        &records(&[("New1", None)]),
    ));
    assert!(v.decision.is_allowed());
    assert_eq!(v.new_entities, vec![EntityKey::new("", "New1")]);
    assert_eq!(v.invalidate, vec![EntityKey::new("", "New1")]);
    // Someone else owns it: a plain create is refused, even as the broker would 422.
    let owned = records(&[("New1", Some(Record::owned_by("carol")))]);
    assert_eq!(
        status(&own, Some(&user("alice")), &create, false, &owned),
        403
    );
    assert_eq!(
        status(&own, Some(&user("carol")), &create, false, &owned),
        200
    );
    // An upsert of an existing entity is its write.
    let upsert = request(
        "POST",
        "/v2/entities?options=upsert",
        r#"{"id": "Lamp1", "on": {"value": 1}}"#,
    );
    let recs = records(&[("Lamp1", Some(lamp1()))]);
    let mut ops = user("tom");
    ops.groups = vec!["ops".into()];
    let v = verdict(own.evaluate(Some(&ops), &upsert, false, &recs));
    assert!(v.decision.is_allowed());
    assert!(
        v.new_entities.is_empty(),
        "an existing entity is not re-owned"
    );
    assert_eq!(status(&own, Some(&user("bob")), &upsert, false, &recs), 403);
    // Anonymous creates are refused before any lookup.
    assert_eq!(status(&own, None, &create, false, &HashMap::new()), 403);
}

#[test]
fn static_only_can_not_record_new_owners() {
    let own = engine(
        json!({"sources": [{"kind": "static", "entities": [{"id": "A", "owner": "alice"}]}]}),
    );
    assert!(!own.can_record_owner());
    let create = request("POST", "/v2/entities", r#"{"id": "New1"}"#);
    assert_eq!(
        status(
            &own,
            Some(&user("alice")),
            &create,
            false,
            &records(&[("New1", None)])
        ),
        403
    );
}

#[test]
fn patterns_and_any() {
    let own = broker();
    let alice = user("alice");
    let none = HashMap::new();
    let sub = request(
        "POST",
        "/v2/subscriptions",
        r#"{"subject": {"entities": [{"idPattern": ".*"}]}, "notification": {"http": {"url": "http://x"}}}"#,
    );
    assert_eq!(status(&own, Some(&alice), &sub, false, &none), 403);
    let list = request("GET", "/v2/entities?type=Lamp", "");
    let v = verdict(own.evaluate(Some(&alice), &list, true, &none));
    assert!(v.decision.is_allowed() && v.filter_list);
    assert_eq!(
        status(&own, Some(&alice), &list, false, &none),
        403,
        "not filterable"
    );
    let ids = request("GET", "/v2/entities?id=A,B", "");
    let v = verdict(own.evaluate(Some(&alice), &ids, true, &none));
    assert!(v.filter_list, "listed ids are filtered, not looked up");
    let types = request("GET", "/v2/types", "");
    assert_eq!(status(&own, Some(&alice), &types, false, &none), 403);
    let listing = request("GET", "/v2/subscriptions", "");
    assert_eq!(status(&own, Some(&alice), &listing, false, &none), 403);
    let mut admin = user("root");
    admin.roles = vec!["admin".into()];
    assert_eq!(status(&own, Some(&admin), &listing, false, &none), 200);
    assert!(!verdict(own.evaluate(Some(&admin), &list, true, &none)).filter_list);
}

#[test]
fn subscriptions_and_registrations() {
    let own = broker();
    let recs = records(&[
        ("Lamp1", Some(lamp1())),
        ("M1", Some(Record::owned_by("carol"))),
    ]);
    let sub = |ids: &str| {
        request(
            "POST",
            "/v2/subscriptions",
            &format!(
                r#"{{"subject": {{"entities": [{ids}]}}, "notification": {{"http": {{"url": "http://x"}}}}}}"#
            ),
        )
    };
    assert_eq!(
        status(
            &own,
            Some(&user("bob")),
            &sub(r#"{"id": "Lamp1"}"#),
            false,
            &recs
        ),
        200
    );
    assert_eq!(
        status(
            &own,
            Some(&user("bob")),
            &sub(r#"{"id": "Lamp1"}, {"id": "M1"}"#),
            false,
            &recs
        ),
        403
    );
    let reg = request(
        "POST",
        "/v2/registrations",
        r#"{"dataProvided": {"entities": [{"id": "Lamp1"}]}, "provider": {"http": {"url": "http://p"}}}"#,
    );
    assert_eq!(status(&own, Some(&user("bob")), &reg, false, &recs), 403);
    assert_eq!(status(&own, Some(&user("alice")), &reg, false, &recs), 200);
}

#[test]
fn unowned_entities_are_closed() {
    let own = broker();
    let req = request("GET", "/v2/entities/X", "");
    assert_eq!(
        status(
            &own,
            Some(&user("alice")),
            &req,
            false,
            &records(&[("X", None)])
        ),
        403
    );
}

#[test]
fn devices_write_only_their_own_entity() {
    let own = broker();
    let dev = Identity::new(IdentityKind::DeviceKey, "lamp-01");
    let none = HashMap::new();
    let own_update = request(
        "POST",
        "/ngsi10/updateContext",
        r#"{"updateAction": "UPDATE", "contextElements": [{"entityId": {"id": "urn:Device:lamp-01"}, "attributes": [{"name": "on", "value": true}]}]}"#,
    );
    assert_eq!(
        status(&own, Some(&dev), &own_update, false, &none),
        200,
        "no lookup needed"
    );
    let other = request(
        "PATCH",
        "/v2/entities/urn:Device:lamp-02/attrs",
        r#"{"on": {"value": 1}}"#,
    );
    assert_eq!(status(&own, Some(&dev), &other, false, &none), 403);
    let plain_create = request("POST", "/v2/entities", r#"{"id": "urn:Device:lamp-01"}"#);
    assert_eq!(status(&own, Some(&dev), &plain_create, false, &none), 403);
    let delete = request("DELETE", "/v2/entities/urn:Device:lamp-01", "");
    assert_eq!(status(&own, Some(&dev), &delete, false, &none), 403);
    let owner = request(
        "PATCH",
        "/v2/entities/urn:Device:lamp-01/attrs",
        r#"{"owner": {"value": "lamp-01"}}"#,
    );
    assert_eq!(status(&own, Some(&dev), &owner, false, &none), 403);
    let cert = Identity::new(IdentityKind::ClientCertificate, "lamp-01");
    let patch = request(
        "PATCH",
        "/v2/entities/urn:Device:lamp-01/attrs",
        r#"{"on": {"value": 1}}"#,
    );
    assert_eq!(status(&own, Some(&cert), &patch, false, &none), 200);
    // A user with the same subject is not a device.
    assert!(matches!(
        own.evaluate(Some(&user("lamp-01")), &patch, false, &none),
        Eval::Need(_)
    ));
    // Reads follow ownership.
    let read = request("GET", "/v2/entities/urn:Device:lamp-01", "");
    let recs = records(&[("urn:Device:lamp-01", Some(Record::owned_by("alice")))]);
    assert_eq!(status(&own, Some(&dev), &read, false, &recs), 403);
}

#[test]
fn resolve_order_cache_and_negative_entries() {
    let mut own = engine(json!({
        "cache": {"ttl_secs": 60, "negative_ttl_secs": 5},
        "sources": [
            {"kind": "static", "entities": [{"id": "S1", "owner": "alice"}]},
            {"kind": "registry", "cluster": "owners"},
            {"kind": "static", "entities": [{"id": "S2", "owner": "carol"}]}
        ]
    }));
    let s1 = EntityKey::new("", "S1");
    let x = EntityKey::new("", "X");
    assert_eq!(
        own.resolve(&s1, 0, 100, false),
        Resolve::Known(Some(Record::owned_by("alice")))
    );
    assert_eq!(own.resolve(&x, 0, 100, false), Resolve::Fetch(1));
    // After the registry: the later static map, then nobody.
    assert_eq!(
        own.resolve(&EntityKey::new("", "S2"), 2, 100, false),
        Resolve::Known(Some(Record::owned_by("carol")))
    );
    assert_eq!(own.resolve(&x, 2, 100, false), Resolve::Known(None));
    own.remember(&x, &None, 100);
    assert_eq!(own.resolve(&x, 0, 104, false), Resolve::Known(None));
    assert_eq!(
        own.resolve(&x, 0, 104, true),
        Resolve::Fetch(1),
        "creates don't trust 'nobody'"
    );
    assert_eq!(
        own.resolve(&x, 0, 105, false),
        Resolve::Fetch(1),
        "negative TTL"
    );
    own.remember(&x, &Some(Record::owned_by("bob")), 200);
    assert_eq!(
        own.resolve(&x, 0, 259, true),
        Resolve::Known(Some(Record::owned_by("bob")))
    );
    assert_eq!(own.resolve(&x, 0, 260, false), Resolve::Fetch(1), "TTL");
    own.remember(&x, &Some(Record::owned_by("bob")), 300);
    own.forget(&x);
    assert_eq!(own.resolve(&x, 0, 301, false), Resolve::Fetch(1));
    // Tenants are separate keys.
    own.remember(&x, &Some(Record::owned_by("bob")), 400);
    assert_eq!(
        own.resolve(&EntityKey::new("t2", "X"), 0, 401, false),
        Resolve::Fetch(1)
    );
}

#[test]
fn cache_is_bounded() {
    let mut own = engine(
        json!({"cache": {"max_entries": 2}, "sources": [{"kind": "registry", "cluster": "o"}]}),
    );
    for i in 0..5 {
        own.remember(
            &EntityKey::new("", format!("E{i}")),
            &Some(Record::owned_by("a")),
            10,
        );
    }
    assert_eq!(own.cache.len(), 2);
    assert!(own.cache_stats().evictions >= 3);
}

#[test]
fn listed_entities_resolve_through_the_sources() {
    let mut own = engine(json!({"sources": [
        {"kind": "static", "entities": [{"id": "S1", "owner": "alice"}]},
        {"kind": "broker", "cluster": "orion"},
        {"kind": "registry", "cluster": "owners"}
    ]}));
    let k = |id: &str| EntityKey::new("", id);
    assert_eq!(
        own.resolve_listed(&k("S1"), &Ok(Some(Record::owned_by("x"))), 0, 1)
            .unwrap(),
        Resolve::Known(Some(Record::owned_by("alice")))
    );
    assert_eq!(
        own.resolve_listed(&k("B1"), &Ok(Some(Record::owned_by("bob"))), 0, 1)
            .unwrap(),
        Resolve::Known(Some(Record::owned_by("bob")))
    );
    assert_eq!(
        own.resolve_listed(&k("R1"), &Ok(None), 0, 1).unwrap(),
        Resolve::Fetch(2)
    );
    assert!(own
        .resolve_listed(&k("B2"), &Err("bad".into()), 0, 1)
        .is_err());
    own.remember(&k("R1"), &Some(Record::owned_by("carol")), 1);
    assert_eq!(
        own.resolve_listed(&k("R1"), &Ok(None), 0, 2).unwrap(),
        Resolve::Known(Some(Record::owned_by("carol")))
    );
}

#[test]
fn config_errors_name_what_is_wrong() {
    let err = |v: Value| match serde_json::from_value::<OwnershipConfig>(v) {
        Ok(c) => Ownership::new(c).err().unwrap_or_default(),
        Err(e) => e.to_string(),
    };
    assert!(err(json!({"sources": []})).contains("at least one"));
    assert!(
        err(json!({"sources": [{"kind": "static", "entities": [{"id": "A", "owner": ""}]}]}))
            .contains("sources[0].entities[0]: owner")
    );
    assert!(
        err(json!({"sources": [{"kind": "broker", "cluster": "o", "colour": 1}]}))
            .contains("unknown field `colour`")
    );
    assert!(
        err(json!({"sources": [{"kind": "broker", "cluster": "o", "api": "v3"}]}))
            .contains("unknown variant `v3`")
    );
    let e = err(json!({"broker": "scorpio", "sources": [{"kind": "broker", "cluster": "o"}]}));
    assert!(
        e.contains("unknown variant `scorpio`, expected one of `orion`, `ngsi-ld`, `fogflow`"),
        "{e}"
    );
    let fogflow =
        engine(json!({"broker": "fogflow", "sources": [{"kind": "broker", "cluster": "o"}]}));
    assert_eq!(fogflow.config().broker, crate::ngsi::Broker::FogFlow);
    assert_eq!(broker().config().broker, crate::ngsi::Broker::Orion);
    assert!(err(json!({"device_entity_id": "{device}{device}", "sources": [{"kind": "broker", "cluster": "o"}]})).contains("exactly once"));
    assert!(err(json!({"sources": [{"kind": "static", "entities": [{"id": "A", "owner": "a", "service": "City"}]}]})).contains("lowercase"));
    assert!(
        err(json!({"max_list_lookups": 0, "sources": [{"kind": "broker", "cluster": "o"}]}))
            .contains("max_list_lookups")
    );
    assert!(
        err(json!({"admin_roles": [""], "sources": [{"kind": "broker", "cluster": "o"}]}))
            .contains("admin_roles")
    );
    assert_eq!(
        err(json!({"sources": [{"kind": "broker", "cluster": "o"}]})),
        ""
    );
}

#[test]
fn delegations_parse_both_vocabularies_and_refuse_garbage() {
    let (d, public) = wire::parse_delegations(&json!([
        {"user": "bob", "access": "READ_ACCESS"}, {"group": "g", "access": "read_write"}, {"public": true}
    ])).unwrap();
    assert!(public);
    assert_eq!(d.len(), 2);
    assert_eq!(d[1].access, DelegatedAccess::ReadWrite);
    for bad in [
        json!({}),
        json!([{"user": "bob"}]),
        json!([{"user": "b", "group": "g", "access": "read"}]),
        json!([{"user": "b", "access": "write"}]),
        json!([{"public": "yes"}]),
        json!(["bob"]),
    ] {
        assert!(wire::parse_delegations(&bad).is_err(), "{bad}");
    }
}

#[test]
fn registry_contract() {
    let key = EntityKey::new("smartcity", "Lamp1");
    assert_eq!(
        wire::registry_lookup_body(&key),
        r#"{"entity_id":"Lamp1","service":"smartcity"}"#
    );
    assert_eq!(
        wire::registry_claim_body(&key, Some("Lamp"), "/lights", "alice"),
        r#"{"entity_id":"Lamp1","entity_type":"Lamp","owner":"alice","service":"smartcity","service_path":"/lights"}"#
    );
    let r = wire::parse_registry_lookup(200, br#"{"owner": "alice", "delegations": [{"user": "bob", "access": "read"}], "public": true}"#).unwrap().unwrap();
    assert_eq!(r.owner, "alice");
    assert!(r.public);
    assert_eq!(wire::parse_registry_lookup(404, b"").unwrap(), None);
    for (s, b) in [
        (200, &b"not json"[..]),
        (200, br#"{"owner": 1}"#),
        (200, br#"{}"#),
        (200, br#"{"owner": "a", "x": 1}"#),
        (500, b""),
        (0, b""),
        (504, b""),
        (200, br#"{"owner": "a", "public": "yes"}"#),
    ] {
        assert!(
            wire::parse_registry_lookup(s, b).is_err(),
            "{s} {:?}",
            String::from_utf8_lossy(b)
        );
    }
    assert!(wire::claim_outcome(201, &key).is_ok());
    assert_eq!(wire::claim_outcome(409, &key).unwrap_err().status(), 403);
    assert_eq!(wire::claim_outcome(500, &key).unwrap_err().status(), 503);
    assert_eq!(wire::claim_outcome(0, &key).unwrap_err().status(), 503);
}

#[test]
fn broker_lookups() {
    let key = EntityKey::new("smartcity", "urn:ngsi-ld:Lamp:1 x/y");
    let (path, headers) = wire::broker_lookup(BrokerApi::V2, &key, "owner", "delegations");
    assert_eq!(
        path,
        "/v2/entities/urn:ngsi-ld:Lamp:1%20x%2Fy?attrs=owner,delegations&options=keyValues"
    );
    assert!(headers.contains(&("fiware-service".into(), "smartcity".into())));
    assert!(headers.contains(&("fiware-servicepath".into(), "/#".into())));
    let (path, headers) = wire::broker_lookup(BrokerApi::Ld, &key, "owner", "delegations");
    assert!(
        path.starts_with("/ngsi-ld/v1/entities/urn:ngsi-ld:Lamp:1%20x%2Fy?attrs=owner,delegations")
    );
    assert!(headers.contains(&("ngsild-tenant".into(), "smartcity".into())));
    let (path, _) = wire::broker_lookup(BrokerApi::Ngsi10, &key, "owner", "delegations");
    assert_eq!(path, "/ngsi10/entity/urn:ngsi-ld:Lamp:1%20x%2Fy");
    let r = wire::parse_broker_lookup(
        BrokerApi::V2,
        "L",
        200,
        br#"{"id": "L", "owner": "alice", "delegations": [{"public": true}]}"#,
        "owner",
        "delegations",
    )
    .unwrap()
    .unwrap();
    assert!(r.public && r.owner == "alice");
    assert_eq!(
        wire::parse_broker_lookup(
            BrokerApi::V2,
            "L",
            200,
            br#"{"id": "L"}"#,
            "owner",
            "delegations"
        )
        .unwrap(),
        None
    );
    assert_eq!(
        wire::parse_broker_lookup(BrokerApi::V2, "L", 404, b"", "owner", "delegations").unwrap(),
        None
    );
    let ngsi10 = br#"{"entityId": {"id": "S"}, "attributes": [{"name": "owner", "type": "string", "value": "carol"}]}"#;
    assert_eq!(
        wire::parse_broker_lookup(BrokerApi::Ngsi10, "S", 200, ngsi10, "owner", "delegations")
            .unwrap(),
        Some(Record::owned_by("carol"))
    );
    for (s, b) in [
        (409, &b"{}"[..]),
        (500, b"{}"),
        (200, b"[]"),
        (200, b"nope"),
        (200, br#"{"owner": 5}"#),
        (0, b""),
    ] {
        assert!(
            wire::parse_broker_lookup(BrokerApi::V2, "L", s, b, "owner", "delegations").is_err(),
            "{s}"
        );
    }
    assert_eq!(
        wire::broker_api(BrokerApi::Auto, wire::Dialect::Ld),
        BrokerApi::Ld
    );
    assert_eq!(
        wire::broker_api(BrokerApi::V2, wire::Dialect::Ld),
        BrokerApi::V2
    );
}

fn inject(
    kind: CreateBody,
    body: &str,
    kv: bool,
    ids: &[&str],
) -> Result<Option<String>, DenyReason> {
    let ids: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    wire::inject_owner(kind, body.as_bytes(), kv, "owner", "alice", &ids)
        .map(|o| o.map(|b| String::from_utf8(b).unwrap()))
}

#[test]
fn owner_injection_in_every_create_shape() {
    assert_eq!(
        inject(CreateBody::V2Entity, r#"{"id":"A"}"#, false, &["A"])
            .unwrap()
            .unwrap(),
        r#"{"id":"A","owner":{"type":"Text","value":"alice"}}"#
    );
    assert_eq!(
        inject(CreateBody::V2Entity, r#"{"id":"A"}"#, true, &["A"])
            .unwrap()
            .unwrap(),
        r#"{"id":"A","owner":"alice"}"#
    );
    assert_eq!(
        inject(
            CreateBody::V2OpUpdate,
            r#"{"actionType":"append","entities":[{"id":"A"},{"id":"B"}]}"#,
            false,
            &["B"]
        )
        .unwrap()
        .unwrap(),
        r#"{"actionType":"append","entities":[{"id":"A"},{"id":"B","owner":{"type":"Text","value":"alice"}}]}"#
    );
    assert_eq!(
        inject(
            CreateBody::V2Notify,
            r#"{"data":[{"id":"A"}]}"#,
            false,
            &["A"]
        )
        .unwrap()
        .unwrap(),
        r#"{"data":[{"id":"A","owner":{"type":"Text","value":"alice"}}]}"#
    );
    assert_eq!(
        inject(
            CreateBody::LdEntity,
            r#"{"id":"urn:a","type":"T"}"#,
            false,
            &["urn:a"]
        )
        .unwrap()
        .unwrap(),
        r#"{"id":"urn:a","owner":{"type":"Property","value":"alice"},"type":"T"}"#
    );
    assert_eq!(
        inject(
            CreateBody::LdBatch,
            r#"[{"id":"urn:a"}]"#,
            false,
            &["urn:a"]
        )
        .unwrap()
        .unwrap(),
        r#"[{"id":"urn:a","owner":{"type":"Property","value":"alice"}}]"#
    );
    assert_eq!(
        inject(
            CreateBody::Ngsi10Update,
            r#"{"contextElements":[{"entityId":{"id":"S"}}]}"#,
            false,
            &["S"]
        )
        .unwrap()
        .unwrap(),
        r#"{"contextElements":[{"attributes":[{"name":"owner","type":"string","value":"alice"}],"entityId":{"id":"S"}}]}"#
    );
    assert_eq!(
        inject(
            CreateBody::Ngsi10Notify,
            r#"{"contextResponses":[{"contextElement":{"entityId":{"id":"S"},"attributes":[]}}]}"#,
            false,
            &["S"]
        )
        .unwrap()
        .unwrap(),
        r#"{"contextResponses":[{"contextElement":{"attributes":[{"name":"owner","type":"string","value":"alice"}],"entityId":{"id":"S"}}}]}"#
    );
    // Not new: untouched.
    assert_eq!(
        inject(CreateBody::V2Entity, r#"{"id":"A"}"#, false, &[]).unwrap(),
        None
    );
    // Owner already the caller: kept as sent.
    assert_eq!(
        inject(
            CreateBody::V2Entity,
            r#"{"id":"A","owner":{"value":"alice"}}"#,
            false,
            &["A"]
        )
        .unwrap(),
        None
    );
    assert_eq!(
        inject(
            CreateBody::LdEntity,
            r#"{"id":"A","owner":"alice"}"#,
            false,
            &["A"]
        )
        .unwrap(),
        None
    );
}

#[test]
fn a_create_may_not_name_another_owner() {
    for (kind, body) in [
        (
            CreateBody::V2Entity,
            r#"{"id":"A","owner":{"value":"bob"}}"#,
        ),
        (CreateBody::V2Entity, r#"{"id":"A","owner":"bob"}"#),
        (
            CreateBody::V2Entity,
            r#"{"id":"A","owner":{"value":["alice"]}}"#,
        ),
        (
            CreateBody::LdBatch,
            r#"[{"id":"A","owner":{"type":"Property","value":"bob"}}]"#,
        ),
        (
            CreateBody::Ngsi10Update,
            r#"{"contextElements":[{"entityId":{"id":"A"},"attributes":[{"name":"owner","value":"bob"}]}]}"#,
        ),
    ] {
        assert_eq!(
            inject(kind, body, false, &["A"]).unwrap_err().status(),
            403,
            "{body}"
        );
    }
}

#[test]
fn created_types_for_claims() {
    assert_eq!(
        wire::created_type(CreateBody::V2Entity, br#"{"id":"A","type":"Lamp"}"#, "A").as_deref(),
        Some("Lamp")
    );
    assert_eq!(
        wire::created_type(
            CreateBody::LdBatch,
            br#"[{"id":"B","type":["T1","T2"]}]"#,
            "B"
        )
        .as_deref(),
        Some("T1")
    );
    assert_eq!(
        wire::created_type(
            CreateBody::Ngsi10Update,
            br#"{"contextElements":[{"entityId":{"id":"S","type":"Sensor"}}]}"#,
            "S"
        )
        .as_deref(),
        Some("Sensor")
    );
    assert_eq!(
        wire::created_type(CreateBody::V2Entity, br#"{"id":"A"}"#, "A"),
        None
    );
}

#[test]
fn endpoints() {
    let e = Endpoint::of("GET", "/v2/entities?type=Lamp&options=keyValues").unwrap();
    assert_eq!(e.list.map(|l| l.0), Some(ListFormat::V2));
    assert!(e.key_values);
    assert!(Endpoint::of("GET", "/v2/entities?options=values")
        .unwrap()
        .list
        .is_none());
    assert_eq!(
        Endpoint::of("POST", "/v2/entities").unwrap().create_body,
        Some(CreateBody::V2Entity)
    );
    assert_eq!(
        Endpoint::of("POST", "/ngsi-ld/v1/entityOperations/upsert")
            .unwrap()
            .create_body,
        Some(CreateBody::LdBatch)
    );
    assert_eq!(
        Endpoint::of("POST", "/ngsi10/updateContext")
            .unwrap()
            .create_body,
        Some(CreateBody::Ngsi10Update)
    );
    assert_eq!(
        Endpoint::of("POST", "/ngsi10/queryContext")
            .unwrap()
            .list
            .map(|l| l.0),
        Some(ListFormat::Ngsi10)
    );
    assert!(Endpoint::of("GET", "/v2/entities/A")
        .unwrap()
        .list
        .is_none());
}

#[test]
fn list_filtering_keeps_order_strips_and_counts() {
    let body =
        br#"[{"id":"A","owner":{"value":"alice"},"t":1},{"id":"B","owner":"bob"},{"id":"C"}]"#;
    let (doc, listed) = wire::list_entities(ListFormat::V2, body, "owner", "delegations").unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].1, Ok(Some(Record::owned_by("alice"))));
    assert_eq!(listed[2].1, Ok(None));
    let (out, kept) =
        wire::filter_list(ListFormat::V2, doc, &[true, false, true], &["owner".into()]).unwrap();
    assert_eq!(kept, 2);
    assert_eq!(
        String::from_utf8(out.unwrap()).unwrap(),
        r#"[{"id":"A","t":1},{"id":"C"}]"#
    );
    assert!(wire::list_entities(
        ListFormat::V2,
        br#"{"type":"FeatureCollection"}"#,
        "owner",
        "d"
    )
    .is_err());
    assert!(
        wire::list_entities(ListFormat::V2, br#"[{"type":"T"}]"#, "owner", "d").is_err(),
        "no id"
    );
    assert!(
        wire::list_entities(ListFormat::V2, br#"[{"id":"A","owner":7}]"#, "owner", "d")
            .unwrap()
            .1[0]
            .1
            .is_err()
    );
    let ngsi10 = br#"{"contextResponses":[{"contextElement":{"entityId":{"id":"S1"},"attributes":[{"name":"owner","value":"a"}]}},{"contextElement":{"entityId":{"id":"S2"}}}]}"#;
    let (doc, listed) =
        wire::list_entities(ListFormat::Ngsi10, ngsi10, "owner", "delegations").unwrap();
    assert_eq!(
        listed.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
        ["S1", "S2"]
    );
    let (out, _) = wire::filter_list(ListFormat::Ngsi10, doc, &[false, true], &[]).unwrap();
    assert_eq!(
        String::from_utf8(out.unwrap()).unwrap(),
        r#"{"contextResponses":[{"contextElement":{"entityId":{"id":"S2"}}}]}"#
    );
    assert_eq!(wire::filtered_count(Some("3"), 3, 2).as_deref(), Some("2"));
    assert_eq!(wire::filtered_count(Some("30"), 3, 2), None);
    assert_eq!(wire::filtered_count(Some("x"), 3, 2), None);
}

#[test]
fn attrs_widening() {
    assert_eq!(
        wire::widen_attrs_path(
            "/v2/entities?type=L&attrs=t,h&limit=5",
            &["owner", "delegations"]
        ),
        Some((
            "/v2/entities?type=L&attrs=t,h,owner,delegations&limit=5".into(),
            vec!["owner".into(), "delegations".into()]
        ))
    );
    assert_eq!(
        wire::widen_attrs_path("/v2/entities?attrs=owner", &["owner", "delegations"]).map(|x| x.1),
        Some(vec!["delegations".to_string()])
    );
    assert_eq!(
        wire::widen_attrs_path("/v2/entities?attrs=*", &["owner"]),
        None
    );
    // The parameter is found however the broker would decode its name (`att%72s` is `attrs`).
    assert_eq!(
        wire::widen_attrs_path("/v2/entities?att%72s=t", &["owner"]).map(|x| x.1),
        Some(vec!["owner".to_string()])
    );
    assert_eq!(
        wire::widen_attrs_path("/v2/entities?type=L", &["owner"]),
        None
    );
    let (b, added) = wire::widen_attrs_body(br#"{"attrs":["t"]}"#, "attrs", &["owner"]).unwrap();
    assert_eq!(String::from_utf8(b).unwrap(), r#"{"attrs":["t","owner"]}"#);
    assert_eq!(added, vec!["owner".to_string()]);
    assert!(wire::widen_attrs_body(br#"{"attrs":[]}"#, "attrs", &["owner"]).is_none());
}

#[test]
fn access_struct_from_other_models_is_decided_too() {
    // A hand-built access (as another model would give) with a tenant.
    let own = broker();
    let req = RequestAccess {
        operation: "x".into(),
        accesses: vec![Access {
            action: Action::Read,
            entity: EntitySelector::Id("A".into()),
            entity_type: TypeSelector::Any,
            attributes: AttributeSelector::All,
            tenant: Tenant {
                service: "t1".into(),
                service_paths: vec!["/".into()],
            },
            endpoint: None,
        }],
    };
    let mut recs = HashMap::new();
    recs.insert(EntityKey::new("t1", "A"), Some(Record::owned_by("alice")));
    assert_eq!(status(&own, Some(&user("alice")), &req, false, &recs), 200);
}

#[test]
fn every_2xx_list_answer_is_filtered_and_no_status_is_refused() {
    use wire::ListAnswer;
    for s in [200, 201, 203, 204, 206, 299] {
        assert_eq!(wire::list_answer(Some(s)), ListAnswer::Filter, "{s}");
    }
    for s in [100, 199, 300, 304, 400, 404, 500, 503] {
        assert_eq!(wire::list_answer(Some(s)), ListAnswer::PassThrough, "{s}");
    }
    assert_eq!(wire::list_answer(None), ListAnswer::Unreadable);
}

/// A 200 lookup answer says something about the entity looked up only if it is that entity:
/// a list, another entity, or an object without id (random JSON from a broken broker) is an
/// error (503), never "exists, nobody owns it" (that let a create claim an owned entity).
/// Fails on the code before the id check: each of these parsed as `Ok(None)`/`Ok(Some)`.
#[test]
fn broker_lookup_answer_must_be_the_entity_looked_up() {
    let parse = |api, id, body: &str| {
        wire::parse_broker_lookup(api, id, 200, body.as_bytes(), "owner", "delegations")
    };
    for (api, body) in [
        (BrokerApi::V2, r#"{}"#),
        (BrokerApi::V2, r#"{"error": "x"}"#),
        (BrokerApi::V2, r#"{"id": "lamp-02", "owner": "mallory"}"#),
        (BrokerApi::V2, r#"{"id": 5}"#),
        (BrokerApi::V2, r#"{"id": "LAMP-01"}"#),
        (BrokerApi::V2, r#"{"entityId": {"id": "lamp-01"}}"#),
        (BrokerApi::Ld, r#"{"type": "Lamp"}"#),
        (BrokerApi::Ld, r#"{"id": "urn:other"}"#),
        (BrokerApi::Ld, r#"{"id": "lamp-01%20"}"#),
        (BrokerApi::Ngsi10, r#"{"id": "lamp-01"}"#),
        (BrokerApi::Ngsi10, r#"{"entityId": {"id": "lamp-02"}}"#),
        (BrokerApi::Ngsi10, r#"{"attributes": []}"#),
    ] {
        let got = parse(api, "lamp-01", body);
        assert!(got.is_err(), "{api:?} {body}: {got:?}");
    }
    // The entity itself, in each API's shape: known owner, or exists without one.
    assert_eq!(
        parse(
            BrokerApi::Ld,
            "lamp-01",
            r#"{"id": "lamp-01", "type": "Lamp"}"#
        ),
        Ok(None)
    );
    assert_eq!(
        parse(
            BrokerApi::Ld,
            "urn:a b",
            r#"{"id": "urn:a b", "type": "Lamp", "owner": "alice"}"#
        ),
        Ok(Some(Record::owned_by("alice")))
    );
    assert_eq!(
        parse(
            BrokerApi::Ngsi10,
            "lamp-01",
            r#"{"entityId": {"id": "lamp-01", "type": "Lamp", "isPattern": false}, "attributes": []}"#
        ),
        Ok(None)
    );
}

// ---- scope ----

fn scoped(scope: Value) -> Ownership {
    engine(json!({"sources": [{"kind": "broker", "cluster": "orion"}], "scope": scope}))
}

/// Whether `own` leaves the request alone (out of scope), as the filter asks it.
fn out(own: &Ownership, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> bool {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let req = classify(&NgsiRequest {
        broker: crate::ngsi::broker_for_path(path),
        method,
        path,
        headers: &headers,
        body: body.as_bytes(),
    })
    .unwrap();
    let input = ScopeInput {
        dialect: Endpoint::of(method, path).unwrap().dialect,
        ld_context: scope::carries_ld_context(&headers, path, body.as_bytes()),
    };
    own.out_of_scope(&req, input).is_some()
}

#[test]
fn scope_configuration_is_checked() {
    let refused = |scope: Value, needle: &str| {
        let cfg =
            config(json!({"sources": [{"kind": "broker", "cluster": "orion"}], "scope": scope}));
        let err = Ownership::new(cfg).err().unwrap();
        assert!(err.contains(needle), "{err}");
    };
    refused(
        json!({}),
        "must name entity_types, service_paths or services",
    );
    refused(
        json!({"entity_types": []}),
        "scope.entity_types must not be empty",
    );
    refused(
        json!({"service_paths": []}),
        "scope.service_paths must not be empty",
    );
    refused(json!({"services": []}), "scope.services must not be empty");
    refused(json!({"entity_types": [""]}), "not an entity type");
    refused(json!({"service_paths": ["devices"]}), "must start with '/'");
    refused(json!({"service_paths": ["/a/#/b"]}), "scope.service_paths");
    refused(json!({"service_paths": ["/a-b"]}), "alphanumerics");
    refused(json!({"services": ["City"]}), "lowercase");
    let fogflow = config(json!({"broker": "fogflow", "scope": {"services": ["city"]},
                                "sources": [{"kind": "broker", "cluster": "orion"}]}));
    let err = Ownership::new(fogflow).err().unwrap();
    assert!(
        err.contains("scope can't be used with broker \"fogflow\""),
        "{err}"
    );
    let unknown: Result<OwnershipConfig, _> = serde_json::from_value(json!({
        "sources": [{"kind": "broker", "cluster": "orion"}], "scope": {"types": ["Lamp"]}}));
    assert!(unknown.is_err());
    // Absent: every entity is in scope, as before.
    let own = broker();
    assert!(!out(&own, "GET", "/v2/entities?type=Room", &[], ""));
}

/// Fails on main (no `scope`): every request was decided by ownership.
#[test]
fn v2_requests_out_of_scope_by_type_only_when_every_type_is_provably_out() {
    let own = scoped(json!({"entity_types": ["Lamp"]}));
    assert!(out(&own, "GET", "/v2/entities?type=Room", &[], ""));
    assert!(out(&own, "GET", "/v2/entities/Room1?type=Room", &[], ""));
    assert!(out(
        &own,
        "PATCH",
        "/v2/entities/Room1/attrs?type=Room",
        &[],
        r#"{"t": {"value": 1}}"#
    ));
    assert!(out(
        &own,
        "GET",
        "/v2/entities?typePattern=%5ERoom%24",
        &[],
        ""
    ));
    assert!(out(
        &own,
        "POST",
        "/v2/entities",
        &[],
        r#"{"id": "Room1", "type": "Room"}"#
    ));
    // In scope: a scoped type, no type, a real pattern, a mix.
    assert!(!out(&own, "GET", "/v2/entities?type=Lamp", &[], ""));
    assert!(!out(&own, "GET", "/v2/entities", &[], ""));
    assert!(!out(&own, "GET", "/v2/entities/Lamp1", &[], ""));
    assert!(!out(&own, "GET", "/v2/entities?typePattern=Ro.*", &[], ""));
    assert!(!out(&own, "GET", "/v2/entities?type=Room,Lamp", &[], ""));
    assert!(!out(
        &own,
        "POST",
        "/v2/op/update",
        &[],
        r#"{"actionType": "append", "entities": [{"id": "R", "type": "Room"}, {"id": "L", "type": "Lamp"}]}"#
    ));
    assert!(!out(
        &own,
        "POST",
        "/v2/op/update",
        &[],
        r#"{"actionType": "append", "entities": [{"id": "R", "type": "Room"}, {"id": "X"}]}"#
    ));
    // NGSI10 (FogFlow) ignores types: always in scope.
    assert!(!out(
        &own,
        "POST",
        "/ngsi10/updateContext",
        &[],
        r#"{"updateAction": "UPDATE", "contextElements": [{"entityId": {"id": "R", "type": "Room"}, "attributes": []}]}"#
    ));
}

#[test]
fn v2_service_paths_and_services_scope_hierarchically() {
    let own = scoped(json!({"service_paths": ["/devices/#"], "services": ["smartcity"]}));
    let city = |path: &'static str| {
        [
            ("fiware-service", "smartcity"),
            ("fiware-servicepath", path),
        ]
    };
    assert!(out(&own, "GET", "/v2/entities", &city("/public"), ""));
    assert!(out(&own, "GET", "/v2/entities", &city("/public/#"), ""));
    assert!(out(&own, "GET", "/v2/entities", &city("/devicesx"), ""));
    assert!(!out(&own, "GET", "/v2/entities", &city("/devices"), ""));
    assert!(!out(
        &own,
        "GET",
        "/v2/entities",
        &city("/devices/lamps"),
        ""
    ));
    assert!(!out(&own, "GET", "/v2/entities", &city("/#"), ""));
    assert!(!out(
        &own,
        "GET",
        "/v2/entities",
        &city("/public,/devices/a"),
        ""
    ));
    // No service path on a read is the whole tree.
    assert!(!out(
        &own,
        "GET",
        "/v2/entities",
        &[("fiware-service", "smartcity")],
        ""
    ));
    // A write without one is `/`: out of `/devices/#`.
    assert!(out(
        &own,
        "PATCH",
        "/v2/entities/L/attrs",
        &[("fiware-service", "smartcity")],
        r#"{"on": {"value": true}}"#
    ));
    // Another tenant, or the default one, is out of scope whatever the path.
    assert!(out(
        &own,
        "GET",
        "/v2/entities",
        &[("fiware-service", "other")],
        ""
    ));
    assert!(out(&own, "GET", "/v2/entities", &[], ""));
    // NGSI-LD: tenants scope, service paths prove nothing.
    assert!(out(
        &own,
        "GET",
        "/ngsi-ld/v1/entities?type=Lamp",
        &[("ngsild-tenant", "other")],
        ""
    ));
    assert!(!out(
        &own,
        "GET",
        "/ngsi-ld/v1/entities?type=Lamp",
        &[
            ("ngsild-tenant", "smartcity"),
            ("fiware-servicepath", "/public")
        ],
        ""
    ));
    // NGSI10: always in scope.
    assert!(!out(
        &own,
        "GET",
        "/ngsi10/entity/L",
        &[("fiware-service", "other")],
        ""
    ));
}

#[test]
fn ngsi_ld_types_are_scoped_by_local_name_and_only_without_a_context() {
    let own = scoped(json!({"entity_types": ["Lamp"]}));
    assert!(out(&own, "GET", "/ngsi-ld/v1/entities?type=Room", &[], ""));
    assert!(out(
        &own,
        "GET",
        "/ngsi-ld/v1/entities?type=https%3A%2F%2Fx.org%2FRoom",
        &[],
        ""
    ));
    // Any spelling of a scoped local name is in scope.
    for t in [
        "Lamp",
        "ngsi-ld:Lamp",
        "https%3A%2F%2Fsmartdatamodels.org%2FLamp",
    ] {
        assert!(
            !out(
                &own,
                "GET",
                &format!("/ngsi-ld/v1/entities?type={t}"),
                &[],
                ""
            ),
            "{t}"
        );
    }
    // A context of its own may map `Room` to a scoped type.
    let link = [(
        "link",
        "<https://x.org/ctx.jsonld>; rel=\"http://www.w3.org/ns/json-ld#context\"",
    )];
    assert!(!out(
        &own,
        "GET",
        "/ngsi-ld/v1/entities?type=Room",
        &link,
        ""
    ));
    assert!(!out(
        &own,
        "POST",
        "/ngsi-ld/v1/entityOperations/query",
        &[],
        r#"{"type": "Query", "entities": [{"type": "Room"}], "@context": "https://x.org/ctx.jsonld"}"#
    ));
    // Operations by id: NGSI-LD brokers key entities by id alone, the type proves nothing.
    assert!(!out(
        &own,
        "GET",
        "/ngsi-ld/v1/entities/urn:R:1?type=Room",
        &[],
        ""
    ));
    assert!(!out(
        &own,
        "POST",
        "/ngsi-ld/v1/entities",
        &[],
        r#"{"id": "urn:R:1", "type": "Room"}"#
    ));
    assert!(!out(&own, "GET", "/ngsi-ld/v1/entities", &[], ""));
}

#[test]
fn listed_entities_out_of_scope_by_their_type() {
    let own = scoped(json!({"entity_types": ["Lamp", "https://x.org/Streetlight"]}));
    let listed = |f, v: Value, ctx| own.listed_out_of_scope(f, &v, ctx);
    assert!(listed(
        ListFormat::V2,
        json!({"id": "R", "type": "Room"}),
        false
    ));
    assert!(!listed(
        ListFormat::V2,
        json!({"id": "L", "type": "Lamp"}),
        false
    ));
    assert!(!listed(ListFormat::V2, json!({"id": "L"}), false));
    assert!(listed(
        ListFormat::Ld,
        json!({"id": "R", "type": "Room"}),
        false
    ));
    assert!(!listed(
        ListFormat::Ld,
        json!({"id": "R", "type": "Room"}),
        true
    ));
    assert!(!listed(
        ListFormat::Ld,
        json!({"id": "S", "type": "Streetlight"}),
        false
    ));
    assert!(!listed(
        ListFormat::Ld,
        json!({"id": "M", "type": ["Room", "Lamp"]}),
        false
    ));
    assert!(listed(
        ListFormat::Ld,
        json!({"id": "M", "type": ["Room", "Desk"]}),
        false
    ));
    assert!(!listed(
        ListFormat::Ld,
        json!({"id": "M", "type": []}),
        false
    ));
    assert!(!listed(
        ListFormat::Ngsi10,
        json!({"contextElement": {"entityId": {"id": "R", "type": "Room"}}}),
        false
    ));
    // Without entity_types nothing in a list is out by itself.
    let own = scoped(json!({"services": ["city"]}));
    assert!(!own.listed_out_of_scope(ListFormat::V2, &json!({"id": "R", "type": "Room"}), false));
}

#[test]
fn source_endpoints_are_checked_as_they_are_read() {
    use crate::config_error::{parse, ConfigError};
    // The defaults are valid endpoints.
    let registry = config(json!({"sources": [{"kind": "registry", "cluster": "owners"}]}));
    let SourceConfig::Registry(RegistrySource {
        lookup_path,
        claim_path,
        timeout_ms,
        ..
    }) = &registry.sources[0]
    else {
        panic!("not a registry");
    };
    for path in [lookup_path, claim_path] {
        assert!(crate::upstream::UpstreamPath::try_from(path.as_str().to_string()).is_ok());
    }
    assert_eq!(timeout_ms.millis(), 1000);
    // The path names the source, the message the field in it.
    for (source, message) in [
        (
            json!({"kind": "broker", "cluster": ""}),
            "cluster: cluster \"\" must be",
        ),
        (
            json!({"kind": "broker", "cluster": "orion", "authority": "orion:99999"}),
            "authority: authority \"orion:99999\" must be a host[:port]",
        ),
        (
            json!({"kind": "registry", "cluster": "owners", "claim_path": "claim"}),
            "claim_path: path \"claim\" must start with '/'",
        ),
        (
            json!({"kind": "registry", "cluster": "owners", "timeout_ms": 60001}),
            "timeout_ms: timeout_ms 60001 must be between 1 and 60000",
        ),
    ] {
        let json = json!({"sources": [{"kind": "static", "entities": []}, source]});
        let refused = parse::<OwnershipConfig>(json.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(&refused, ConfigError::At { path, message: m }
                if path == "sources[1]" && m.starts_with(message)),
            "{json}: {refused}"
        );
    }
}

#[test]
fn a_registry_source_may_authenticate_with_client_credentials() {
    let auth = |client_id: &str| {
        json!({"sources": [{"kind": "registry", "cluster": "owners",
            "auth": {"client_credentials": {
                "token_endpoint": {"cluster": "idp", "path": "/token"},
                "client_id": client_id, "client_secret": "s"}}}]})
    };
    let own = Ownership::new(config(auth("envoy"))).unwrap();
    let grant = own.source_auth(0).unwrap();
    assert_eq!(grant.client_id, "envoy");
    assert_eq!(grant.token_request().header(":path"), Some("/token"));
    let Err(refused) = Ownership::new(config(auth(""))) else {
        panic!("an empty client_id was accepted");
    };
    assert!(
        refused.starts_with("sources[0].auth.client_credentials.client_id"),
        "{refused}"
    );
    // Only the registry authenticates; a source without auth has none.
    assert!(
        engine(json!({"sources": [{"kind": "registry", "cluster": "owners"}]}))
            .source_auth(0)
            .is_none()
    );
}

#[test]
fn a_registry_sources_secret_may_come_from_the_environment() {
    let with_env = |env: &[(&str, &str)]| {
        let mut c = config(json!({"sources": [
            {"kind": "static", "entities": []},
            {"kind": "registry", "cluster": "owners",
             "auth": {"client_credentials": {
                 "token_endpoint": {"cluster": "idp", "path": "/token"},
                 "client_id": "envoy", "client_secret_env": "OWNERS_SECRET"}}}]}));
        let env = env.to_vec();
        c.read_environment(&move |name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        });
        Ownership::new(c)
    };
    let own = with_env(&[("OWNERS_SECRET", "s3cret")]).unwrap();
    let basic = own.source_auth(1).unwrap().token_request();
    // base64("envoy:s3cret")
    assert_eq!(
        basic.header("authorization"),
        Some("Basic ZW52b3k6czNjcmV0")
    );
    let Err(refused) = with_env(&[]) else {
        panic!("an unset variable was accepted");
    };
    assert!(
        refused.starts_with(
            "sources[1].auth.client_credentials.client_secret_env: the environment variable \
             OWNERS_SECRET is not set"
        ),
        "{refused}"
    );
}

#[test]
fn endpoint_of_a_canonical_path_is_endpoint_of_the_raw_path() {
    use crate::ngsi::canonical::canonical_path;
    for (method, path) in [
        ("GET", "/v2/entities?type=Lamp&options=keyValues"),
        ("GET", "/v2/entities?options=values"),
        ("GET", "/v2/entities/A?attrs=x"),
        ("POST", "/v2/entities"),
        ("POST", "/v2/op/query?options=unique"),
        ("POST", "/ngsi-ld/v1/entityOperations/upsert"),
        ("GET", "/ngsi-ld/v1/temporal/entities?type=T"),
        ("POST", "/ngsi10/queryContext"),
        ("GET", "/ngsi10/entity/A"),
    ] {
        let canon = canonical_path(path).unwrap();
        assert_eq!(
            Endpoint::of_canonical(method, &canon),
            Endpoint::of(method, path),
            "{method} {path}"
        );
    }
}
