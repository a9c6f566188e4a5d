//! Tests of what the device-ownership stage used to decide itself: the source calls and
//! what their answers mean, claims, create bodies, failure precedence and list answers.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::config::BrokerApi;
use super::wire::{Dialect, Endpoint, ListFormat};
use super::*;
use crate::ngsi::{classify, NgsiRequest};
use crate::upstream::HttpCall;

fn engine(v: Value) -> Ownership {
    Ownership::new(serde_json::from_value(v).unwrap()).unwrap()
}

fn broker() -> Ownership {
    engine(
        json!({"sources": [{"kind": "broker", "cluster": "orion", "authority": "orion:1026",
                                "timeout_ms": 700}]}),
    )
}

fn registry() -> Ownership {
    engine(json!({"sources": [{"kind": "registry", "cluster": "owners"}]}))
}

fn alice() -> Identity {
    Identity::new(IdentityKind::Jwt, "alice")
}

fn header<'a>(call: &'a HttpCall, name: &str) -> Option<&'a str> {
    call.header(name)
}

fn access(method: &str, path: &str, body: &str) -> RequestAccess {
    let headers = vec![("fiware-servicepath".to_string(), "/rooms".to_string())];
    classify(&NgsiRequest {
        broker: crate::ngsi::broker_for_path(path),
        method,
        path,
        headers: &headers,
        body: body.as_bytes(),
    })
    .unwrap()
}

fn creates(ids: &[&str]) -> Verdict {
    Verdict {
        decision: Decision::Allow("new entity".into()),
        new_entities: ids.iter().map(|id| EntityKey::new("city", *id)).collect(),
        invalidate: Vec::new(),
        filter_list: false,
    }
}

#[test]
fn lookup_api_follows_the_request_unless_configured() {
    let own = broker();
    assert_eq!(own.lookup_api(Dialect::V2), BrokerApi::V2);
    assert_eq!(own.lookup_api(Dialect::Ld), BrokerApi::Ld);
    assert_eq!(own.lookup_api(Dialect::Ngsi10), BrokerApi::Ngsi10);
    let fixed =
        engine(json!({"sources": [{"kind": "broker", "cluster": "orion", "api": "ngsi-ld"}]}));
    assert_eq!(fixed.lookup_api(Dialect::V2), BrokerApi::Ld);
    // Without a broker source the request's dialect decides.
    assert_eq!(registry().lookup_api(Dialect::Ld), BrokerApi::Ld);
}

#[test]
fn broker_lookup_calls_read_the_owner_attributes() {
    let own = broker();
    let lookup = Lookup {
        key: EntityKey::new("city", "Lamp 1"),
        source: 0,
        api: BrokerApi::V2,
    };
    let call = own.lookup_call(&lookup).unwrap();
    assert_eq!(call.cluster, "orion");
    assert_eq!(call.timeout_ms, 700);
    assert_eq!(call.body(), None);
    assert_eq!(header(&call, ":method"), Some("GET"));
    assert_eq!(header(&call, ":authority"), Some("orion:1026"));
    assert_eq!(
        header(&call, ":path"),
        Some("/v2/entities/Lamp%201?attrs=owner,delegations&options=keyValues")
    );
    assert_eq!(header(&call, "fiware-service"), Some("city"));
    assert_eq!(header(&call, "fiware-servicepath"), Some("/#"));
    // The answer: the entity itself, with or without owner; anything else is an error.
    let answer = own.lookup_answer(&lookup, 200, br#"{"id": "Lamp 1", "owner": "alice"}"#);
    assert_eq!(answer, Ok(Some(Record::owned_by("alice"))));
    assert_eq!(own.lookup_answer(&lookup, 404, b""), Ok(None));
    assert!(own
        .lookup_answer(&lookup, 200, br#"{"id": "Lamp 2", "owner": "alice"}"#)
        .is_err());
    assert!(own.lookup_answer(&lookup, 500, b"").is_err());
    // A static source has no call.
    let statics = engine(json!({"sources": [{"kind": "static", "entities": []}]}));
    assert_eq!(statics.lookup_call(&lookup), None);
    assert!(statics.lookup_answer(&lookup, 200, b"{}").is_err());
}

#[test]
fn registry_lookup_calls_post_the_key() {
    let own = registry();
    let lookup = Lookup {
        key: EntityKey::new("city", "Lamp1"),
        source: 0,
        api: BrokerApi::Auto,
    };
    let call = own.lookup_call(&lookup).unwrap();
    assert_eq!(call.cluster, "owners");
    assert_eq!(header(&call, ":method"), Some("POST"));
    // The authority defaults to the cluster name.
    assert_eq!(header(&call, ":authority"), Some("owners"));
    let body: Value = serde_json::from_slice(call.body().unwrap()).unwrap();
    assert_eq!(body, json!({"entity_id": "Lamp1", "service": "city"}));
    assert_eq!(
        own.lookup_answer(&lookup, 200, br#"{"owner": "bob", "public": true}"#)
            .unwrap()
            .map(|r| (r.owner, r.public)),
        Some(("bob".to_string(), true))
    );
    assert_eq!(own.lookup_answer(&lookup, 404, b""), Ok(None));
    assert!(own.lookup_answer(&lookup, 0, b"").is_err());
}

#[test]
fn claims_name_the_caller_type_and_service_path() {
    let own = registry();
    let body = r#"{"id": "Lamp1", "type": "Lamp", "on": {"value": true}}"#;
    let req = access("POST", "/v2/entities", body);
    let endpoint = Endpoint::of("POST", "/v2/entities").unwrap();
    let calls = own.claim_calls(
        &creates(&["Lamp1"]),
        Some(&alice()),
        &req,
        &endpoint,
        body.as_bytes(),
    );
    assert_eq!(calls.len(), 1);
    let (key, call) = &calls[0];
    assert_eq!(*key, EntityKey::new("city", "Lamp1"));
    assert_eq!(header(call, ":path"), Some("/ownership/claim"));
    let claim: Value = serde_json::from_slice(call.body().unwrap()).unwrap();
    assert_eq!(claim["owner"], "alice");
    assert_eq!(claim["entity_type"], "Lamp");
    assert_eq!(claim["service_path"], "/rooms");
    // No registry: nothing to claim (the broker records the owner in the body).
    let none = broker().claim_calls(
        &creates(&["Lamp1"]),
        Some(&alice()),
        &req,
        &endpoint,
        body.as_bytes(),
    );
    assert!(none.is_empty());
}

#[test]
fn create_bodies_get_the_owner_with_a_broker_source_only() {
    let body = br#"{"id": "Lamp1", "type": "Lamp"}"#;
    let endpoint = Endpoint::of("POST", "/v2/entities").unwrap();
    let new = broker()
        .create_body(&creates(&["Lamp1"]), Some(&alice()), &endpoint, body)
        .unwrap()
        .unwrap();
    let new: Value = serde_json::from_slice(&new).unwrap();
    assert_eq!(new["owner"]["value"], "alice");
    // The registry records the owner by the claim: the body goes as it is (but is checked).
    let reg = registry();
    assert_eq!(
        reg.create_body(&creates(&["Lamp1"]), Some(&alice()), &endpoint, body),
        Ok(None)
    );
    let other = br#"{"id": "Lamp1", "type": "Lamp", "owner": {"value": "mallory"}}"#;
    assert!(matches!(
        reg.create_body(&creates(&["Lamp1"]), Some(&alice()), &endpoint, other),
        Err(DenyReason::Forbidden(_))
    ));
    // Nobody to own it: refused.
    assert!(matches!(
        broker().create_body(&creates(&["Lamp1"]), None, &endpoint, body),
        Err(DenyReason::Forbidden(_))
    ));
    // Nothing new: nothing to do.
    assert_eq!(
        broker().create_body(&creates(&[]), None, &endpoint, body),
        Ok(None)
    );
}

#[test]
fn a_definite_refusal_outranks_an_unavailable_source() {
    let forbidden = || DenyReason::Forbidden("claimed".into());
    let unavailable = || DenyReason::Unavailable("down".into());
    assert_eq!(graver(None, unavailable()), unavailable());
    assert_eq!(graver(Some(unavailable()), forbidden()), forbidden());
    assert_eq!(graver(Some(forbidden()), unavailable()), forbidden());
    let first = DenyReason::Unavailable("first".into());
    assert_eq!(graver(Some(first.clone()), unavailable()), first);
}

#[test]
fn list_plans_widen_the_restriction_with_a_broker_source() {
    let own = broker();
    let path = "/v2/entities?type=Lamp&attrs=on";
    let plan = own
        .list_plan(&Endpoint::of("GET", path).unwrap(), path, b"")
        .unwrap();
    assert_eq!(plan.format, ListFormat::V2);
    assert_eq!(
        plan.new_path.as_deref(),
        Some("/v2/entities?type=Lamp&attrs=on,owner,delegations")
    );
    assert_eq!(plan.strip, vec!["owner", "delegations"]);
    let body = br#"{"entities": [{"idPattern": ".*"}], "attrs": ["on"]}"#;
    let ep = Endpoint::of("POST", "/v2/op/query").unwrap();
    let plan = own.list_plan(&ep, "/v2/op/query", body).unwrap();
    let widened: Value = serde_json::from_slice(plan.new_body.as_deref().unwrap()).unwrap();
    assert_eq!(widened["attrs"], json!(["on", "owner", "delegations"]));
    // A registry answers for listed entities: the request goes as it is.
    let plan = registry()
        .list_plan(&Endpoint::of("GET", path).unwrap(), path, b"")
        .unwrap();
    assert_eq!((plan.new_path, plan.strip), (None, Vec::<String>::new()));
    // Not a list endpoint.
    let one = "/v2/entities/Lamp1";
    assert_eq!(
        own.list_plan(&Endpoint::of("GET", one).unwrap(), one, b""),
        None
    );
}

#[test]
fn list_answers_keep_what_the_caller_reads() {
    let mut own = broker();
    let body = br#"[{"id": "L1", "owner": "alice"}, {"id": "L2", "owner": "bob"},
                    {"id": "L3"}]"#;
    let list = ListFilter::parse(&own, ListFormat::V2, vec!["owner".into()], body, false).unwrap();
    let mut records = HashMap::new();
    // The broker source reads every owner from the answer itself: no lookup.
    assert_eq!(list.lookups(&mut own, "", &mut records, 0), Ok(Vec::new()));
    assert_eq!(records.len(), 3);
    let filtered = list.finish(Some(&alice()), "", &records).unwrap();
    assert_eq!((filtered.kept, filtered.total), (1, 3));
    let v: Value = serde_json::from_slice(filtered.body.as_deref().unwrap()).unwrap();
    assert_eq!(v, json!([{"id": "L1"}]));
    assert!(ListFilter::parse(&own, ListFormat::V2, Vec::new(), b"nope", false).is_err());
}

#[test]
fn list_answers_from_a_registry_need_bounded_lookups() {
    let mut own = engine(json!({"max_list_lookups": 2,
                                "sources": [{"kind": "registry", "cluster": "owners"}]}));
    let body = br#"[{"id": "L1"}, {"id": "L2"}, {"id": "L1"}]"#;
    let list = ListFilter::parse(&own, ListFormat::V2, Vec::new(), body, false).unwrap();
    let mut records = HashMap::new();
    let needed = list.lookups(&mut own, "city", &mut records, 0).unwrap();
    // Each entity once, from the registry (source 0).
    assert_eq!(
        needed,
        vec![
            (EntityKey::new("city", "L1"), 0),
            (EntityKey::new("city", "L2"), 0)
        ]
    );
    // Once looked up (L2 unknown), the answer keeps the caller's entity (twice listed).
    records.insert(
        EntityKey::new("city", "L1"),
        Some(Record::owned_by("alice")),
    );
    records.insert(EntityKey::new("city", "L2"), None);
    assert_eq!(
        list.lookups(&mut own, "city", &mut records, 0),
        Ok(Vec::new())
    );
    let filtered = list.finish(Some(&alice()), "city", &records).unwrap();
    assert_eq!((filtered.kept, filtered.total), (2, 3));
    // Over max_list_lookups: an error (the answer is refused).
    let three = br#"[{"id": "A"}, {"id": "B"}, {"id": "C"}]"#;
    let list = ListFilter::parse(&own, ListFormat::V2, Vec::new(), three, false).unwrap();
    let err = list
        .lookups(&mut own, "city", &mut HashMap::new(), 0)
        .unwrap_err();
    assert!(err.contains("max_list_lookups 2"), "{err}");
}

#[test]
fn an_answer_filtering_leaves_as_it_is_is_not_rewritten() {
    let mut own = broker();
    let mine = br#"[ {"id": "L1", "owner": "alice"},  {"id": "L2", "owner": "alice"} ]"#;
    let list = ListFilter::parse(&own, ListFormat::V2, Vec::new(), mine, false).unwrap();
    let mut records = HashMap::new();
    list.lookups(&mut own, "", &mut records, 0).unwrap();
    let filtered = list.finish(Some(&alice()), "", &records).unwrap();
    // Every entity kept, nothing to strip: no new body, and no header to change.
    assert_eq!(
        (filtered.body.as_deref(), filtered.kept, filtered.total),
        (None, 2, 2)
    );
    let headers = |name: &str| -> Option<&'static [u8]> {
        match name {
            "content-length" => Some(b"64"),
            "fiware-total-count" => Some(b"2"),
            _ => None,
        }
    };
    assert_eq!(filtered.header_edits(headers), Vec::new());
    // The empty answer too.
    let list = ListFilter::parse(&own, ListFormat::V2, Vec::new(), b"[]", false).unwrap();
    let filtered = list.finish(Some(&alice()), "", &HashMap::new()).unwrap();
    assert_eq!((filtered.body, filtered.kept, filtered.total), (None, 0, 0));
    // A page that does not hold every match: the total is unknown even if this page is
    // untouched (later pages may hold others' entities), so the count goes, the body stays.
    let list = ListFilter::parse(&own, ListFormat::V2, Vec::new(), mine, false).unwrap();
    let filtered = list.finish(Some(&alice()), "", &records).unwrap();
    let paged = |name: &str| -> Option<&'static [u8]> {
        (name == "fiware-total-count").then_some(b"40".as_slice())
    };
    assert_eq!(filtered.body, None);
    assert_eq!(
        filtered.header_edits(paged),
        vec![("fiware-total-count", None)]
    );
    // Attributes added to the request (widened) and found in the answer: rewritten.
    let list = ListFilter::parse(&own, ListFormat::V2, vec!["owner".into()], mine, false).unwrap();
    let filtered = list.finish(Some(&alice()), "", &records).unwrap();
    let body = filtered.body.clone().unwrap();
    assert_eq!(body, br#"[{"id":"L1"},{"id":"L2"}]"#);
    assert_eq!(
        filtered.header_edits(headers),
        vec![("content-length", Some(body.len().to_string()))]
    );
    // Added attributes the answer does not hold: nothing to strip, nothing rewritten.
    let bare = br#"[{"id": "L1"}]"#;
    let list = ListFilter::parse(&own, ListFormat::V2, vec!["owner".into()], bare, false).unwrap();
    let records = HashMap::from([(EntityKey::new("", "L1"), Some(Record::owned_by("alice")))]);
    let filtered = list.finish(Some(&alice()), "", &records).unwrap();
    assert_eq!((filtered.body, filtered.kept), (None, 1));
}

#[test]
fn a_filtered_answer_gets_its_length_and_counts_corrected() {
    let mut own = broker();
    let body = br#"[{"id": "L1", "owner": "alice"}, {"id": "L2", "owner": "bob"}]"#;
    let list = ListFilter::parse(&own, ListFormat::V2, Vec::new(), body, false).unwrap();
    let mut records = HashMap::new();
    list.lookups(&mut own, "", &mut records, 0).unwrap();
    let filtered = list.finish(Some(&alice()), "", &records).unwrap();
    let new = filtered.body.clone().unwrap();
    let headers = |name: &str| -> Option<&'static [u8]> {
        match name {
            "content-length" => Some(b"62"),
            "ngsild-results-count" => Some(b"2"),
            "fiware-total-count" => Some(b"\xff"),
            _ => None,
        }
    };
    assert_eq!(
        filtered.header_edits(headers),
        vec![
            // Not text: dropped.
            ("fiware-total-count", None),
            ("ngsild-results-count", Some("1".into())),
            ("content-length", Some(new.len().to_string())),
        ]
    );
    // Without a content-length (chunked) none is added.
    assert_eq!(
        filtered.header_edits(|_| None),
        Vec::<(&str, Option<String>)>::new()
    );
}

fn static_owners() -> Ownership {
    engine(
        json!({"admin_roles": ["admin"], "sources": [{"kind": "static", "entities": [
            {"id": "A", "owner": "alice"},
            {"id": "B", "owner": "bob", "delegations": [{"user": "alice", "access": "read"}]},
            {"id": "P", "owner": "bob", "public": true},
            {"id": "C", "owner": "carol"},
            {"id": "T", "service": "city", "owner": "alice"}
        ]}]}),
    )
}

/// `evaluate`'s verdict for a list request, then `settle_list`'s.
fn settled(own: &mut Ownership, who: Option<&Identity>, req: &RequestAccess) -> Verdict {
    let Eval::Done(verdict) = own.evaluate(who, req, true, &HashMap::new()) else {
        panic!("a list request needs no record");
    };
    own.settle_list(verdict, who, req, 0)
}

fn list_of(path: &str, service: Option<&str>) -> RequestAccess {
    let headers: Vec<(String, String)> = service
        .map(|s| vec![("fiware-service".to_string(), s.to_string())])
        .unwrap_or_default();
    classify(&NgsiRequest {
        broker: crate::ngsi::broker_for_path(path),
        method: "GET",
        path,
        headers: &headers,
        body: b"",
    })
    .unwrap()
}

#[test]
fn a_list_of_ids_the_caller_may_each_read_is_not_filtered() {
    let mut own = static_owners();
    let alice = alice();
    // Owner, read delegate, public: every entity the query can return is readable.
    let v = settled(
        &mut own,
        Some(&alice),
        &list_of("/v2/entities?id=A,B,P", None),
    );
    assert!(v.decision.is_allowed() && !v.filter_list, "{v:?}");
    assert!(
        matches!(&v.decision, Decision::Allow(by) if by.contains("owner, public, read delegate")),
        "{v:?}"
    );
    // One id she may not read (C), nobody owns (X), or another tenant's (T is city's):
    // filtered as before.
    for (path, service) in [
        ("/v2/entities?id=A,C", None),
        ("/v2/entities?id=A,X", None),
        ("/v2/entities?id=T", None),
        ("/v2/entities?id=A", Some("other")),
    ] {
        let v = settled(&mut own, Some(&alice), &list_of(path, service));
        assert!(v.decision.is_allowed() && v.filter_list, "{path}: {v:?}");
    }
    let v = settled(
        &mut own,
        Some(&alice),
        &list_of("/v2/entities?id=T", Some("city")),
    );
    assert!(!v.filter_list, "{v:?}");
    // No ids, or a pattern: anything may come back.
    for path in [
        "/v2/entities?type=Room",
        "/v2/entities?idPattern=A.*",
        "/v2/entities",
    ] {
        let v = settled(&mut own, Some(&alice), &list_of(path, None));
        assert!(v.filter_list, "{path}: {v:?}");
    }
    // Without identity only public entities are read in full.
    let v = settled(&mut own, None, &list_of("/v2/entities?id=P", None));
    assert!(!v.filter_list, "{v:?}");
    let v = settled(&mut own, None, &list_of("/v2/entities?id=P,A", None));
    assert!(v.filter_list, "{v:?}");
    // NGSI-LD and a POST query name their ids the same way.
    let v = settled(
        &mut own,
        Some(&alice),
        &list_of("/ngsi-ld/v1/entities?id=A,B", None),
    );
    assert!(!v.filter_list, "{v:?}");
    // A denial, or a verdict that filters nothing, is left as it is.
    let deny = Verdict::deny(forbidden("no"));
    let req = list_of("/v2/entities?id=A", None);
    assert_eq!(own.settle_list(deny.clone(), Some(&alice), &req, 0), deny);
    let plain = Verdict::allow("admin");
    assert_eq!(own.settle_list(plain.clone(), Some(&alice), &req, 0), plain);
}

#[test]
fn a_list_of_ids_is_read_in_full_by_cached_answers_never_by_a_callout() {
    let mut own = registry();
    let alice = alice();
    let req = list_of("/v2/entities?id=L1,L2", Some("city"));
    // Nothing known: the registry would have to be asked: filtered (no lookup now).
    assert!(settled(&mut own, Some(&alice), &req).filter_list);
    // Her own L1 cached, L2 cached as nobody's: still filtered.
    own.remember(
        &EntityKey::new("city", "L1"),
        &Some(Record::owned_by("alice")),
        0,
    );
    own.remember(&EntityKey::new("city", "L2"), &None, 0);
    assert!(settled(&mut own, Some(&alice), &req).filter_list);
    // Both hers: read in full until the cached answers expire (ttl 60 s by default).
    own.remember(
        &EntityKey::new("city", "L2"),
        &Some(Record::owned_by("alice")),
        0,
    );
    assert!(!settled(&mut own, Some(&alice), &req).filter_list);
    let Eval::Done(v) = own.evaluate(Some(&alice), &req, true, &HashMap::new()) else {
        panic!()
    };
    assert!(
        own.settle_list(v, Some(&alice), &req, 61).filter_list,
        "expired"
    );
}
