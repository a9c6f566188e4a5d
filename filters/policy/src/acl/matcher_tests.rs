//! The linear matcher of [`Acl::check_accesses`] against a straightforward reference: split
//! every access into units (one per service path × attribute) and, unit by unit, look for a
//! deny rule touching it, then an allow rule covering it, among the rules whose subjects match
//! the caller by a linear scan (the engine finds them through its subject index). Same
//! decisions, same reasons.

use super::*;
use crate::access::Tenant;
use proptest::prelude::*;
use serde_json::json;

fn forbidden(msg: String) -> Decision {
    Decision::Deny(DenyReason::Forbidden(msg))
}

/// The unit-by-unit decision (the engine's definition, quadratic in paths × attributes).
fn reference(acl: &Acl, identity: Option<&Identity>, accesses: &[Access]) -> Decision {
    if accesses.is_empty() {
        return forbidden("no rule allows anything: the request names nothing to allow".into());
    }
    let views = match accesses
        .iter()
        .map(AccessView::new)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) => v,
        Err(e) => return Decision::Deny(DenyReason::BadRequest(e)),
    };
    let mut units = Vec::new();
    for v in &views {
        for p in 0..v.paths.len() {
            for x in 0..v.attribute_items().count() {
                units.push((v, p, x));
            }
        }
    }
    let ctx = Ctx {
        user: identity.map(|i| i.subject.as_str()),
        client: None,
        tenant: identity.and_then(|i| i.tenant.as_deref()),
    };
    let rules: Vec<(&Rule, &NgsiRule, Filled)> = acl
        .rules
        .iter()
        .filter(|r| r.names(identity))
        .filter_map(|r| match &r.resource {
            Resource::Ngsi(n) => Some((r, n, fill(n, &ctx, r.effect == Effect::Deny))),
            Resource::Mqtt(_) => None,
        })
        .collect();
    let matches = |n: &NgsiRule, f: &Filled, v: &AccessView, p: usize, x: usize, deny: bool| {
        let attribute = v.attribute_items().nth(x).flatten();
        access_match(n, f, v, deny)
            && path_match(f, &v.paths[p].0, deny)
            && attribute_match(n, f, attribute, deny)
    };
    for &(v, p, x) in &units {
        for (r, n, f) in &rules {
            if r.effect == Effect::Deny
                && r.actions.contains(&v.action)
                && matches(n, f, v, p, x, true)
            {
                return forbidden(format!("denied by rule '{}': {}", r.name, v.unit(p, x)));
            }
        }
    }
    let mut deciders: Vec<&str> = Vec::new();
    for &(v, p, x) in &units {
        let allow = rules.iter().find(|(r, n, f)| {
            r.effect == Effect::Allow
                && r.actions.contains(&v.action)
                && matches(n, f, v, p, x, false)
        });
        match allow {
            Some((r, _, _)) if !deciders.contains(&r.name.as_str()) => deciders.push(&r.name),
            Some(_) => {}
            None => return forbidden(format!("no rule allows {}", v.unit(p, x))),
        }
    }
    Decision::Allow(format!("acl:{}", deciders.join(",")))
}

const ACTIONS: [Action; 3] = [Action::Read, Action::Write, Action::Create];

/// Every kind of subject, naming the callers of [`identity_strategy`] or not.
const SUBJECTS: [&str; 10] = [
    "authenticated",
    "anyone",
    "anonymous",
    "user:alice",
    "user:bob",
    "device:alice",
    "role:operator",
    "role:admin",
    "group:city",
    "group:other",
];

/// No caller, or alice or bob with various kinds, roles and groups.
fn identity_strategy() -> impl Strategy<Value = Option<Identity>> {
    prop::option::of(
        (
            prop::sample::select(vec!["alice", "bob"]),
            prop::sample::select(vec![IdentityKind::Jwt, IdentityKind::DeviceKey]),
            prop::sample::subsequence(vec!["operator", "admin", "viewer"], 0..=2),
            prop::sample::subsequence(vec!["city", "other"], 0..=2),
        )
            .prop_map(|(subject, kind, roles, groups)| {
                let mut id = Identity::new(kind, subject);
                id.roles = roles.into_iter().map(String::from).collect();
                id.groups = groups.into_iter().map(String::from).collect();
                id
            }),
    )
}

fn rule_strategy() -> impl Strategy<Value = serde_json::Value> {
    (
        prop::bool::ANY,
        prop::sample::subsequence(vec!["read", "write", "create"], 1..=3),
        prop::sample::select(vec!["city", "*", "other"]),
        prop::sample::select(vec!["/#", "/a/#", "/a", "/a/b", "/b/#", "/%u/#", "/a/%u"]),
        prop::sample::select(vec!["*", "E1", "E*", "%u", "E2"]),
        prop::sample::select(vec!["*", "Room"]),
        prop::sample::select(vec![
            vec!["*"],
            vec!["t"],
            vec!["p"],
            vec!["t", "p"],
            vec!["h", "t"],
        ]),
        prop::sample::subsequence(SUBJECTS.to_vec(), 1..=3),
    )
        .prop_map(|(allow, actions, service, path, id, ty, attrs, subjects)| {
            json!({
                "name": "",
                "effect": if allow { "allow" } else { "deny" },
                "subjects": subjects,
                "actions": actions,
                "ngsi": {
                    "service": service, "service_path": path, "entity_id": id,
                    "entity_type": ty, "attributes": attrs,
                }
            })
        })
}

fn access_strategy() -> impl Strategy<Value = Access> {
    (
        prop::sample::select(ACTIONS.to_vec()),
        prop::sample::select(vec!["E1", "E2", "alice", "^E1$", "E.*", ""]),
        prop::sample::select(vec!["Room", "Car", ""]),
        prop::option::of(prop::collection::vec(
            prop::sample::select(vec!["t", "p", "h", "x"]),
            0..5,
        )),
        prop::collection::vec(
            prop::sample::select(vec!["/", "/a", "/a/b", "/a/#", "/b", "/alice", "/#"]),
            1..5,
        ),
    )
        .prop_map(|(action, id, ty, attrs, paths)| Access {
            action,
            entity: match id {
                "" => EntitySelector::Any,
                s if s.contains(['^', '*']) => EntitySelector::IdPattern(s.into()),
                s => EntitySelector::Id(s.into()),
            },
            entity_type: match ty {
                "" => TypeSelector::Any,
                t => TypeSelector::Type(t.into()),
            },
            attributes: attrs.map_or(AttributeSelector::All, |a| {
                AttributeSelector::Only(a.into_iter().map(String::from).collect())
            }),
            tenant: Tenant {
                service: "city".into(),
                service_paths: paths.into_iter().map(String::from).collect(),
            },
            endpoint: None,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn linear_matcher_equals_the_unit_by_unit_reference(
        rules in prop::collection::vec(rule_strategy(), 0..6),
        accesses in prop::collection::vec(access_strategy(), 1..5),
        caller in identity_strategy(),
    ) {
        let rules: Vec<serde_json::Value> = rules
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                r["name"] = json!(format!("r{i}"));
                r
            })
            .collect();
        let acl = Acl::from_json(&json!({ "rules": rules }).to_string()).unwrap();
        prop_assert_eq!(
            acl.check_accesses(caller.as_ref(), &accesses),
            reference(&acl, caller.as_ref(), &accesses)
        );
    }
}

proptest! {
    /// The subject index finds exactly the rules a linear scan of every rule's subjects finds,
    /// in rule order (NGSI and MQTT rules alike look their rules up through it).
    #[test]
    fn subject_index_finds_exactly_the_rules_naming_the_caller(
        subjects in prop::collection::vec(prop::sample::subsequence(SUBJECTS.to_vec(), 1..=4), 0..8),
        caller in identity_strategy(),
    ) {
        let rules: Vec<serde_json::Value> = subjects
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"name": format!("r{i}"), "effect": "allow", "subjects": s,
                                 "actions": ["read"], "mqtt": {"topic": "a/#"}}))
            .collect();
        let acl = Acl::from_json(&json!({ "rules": rules }).to_string()).unwrap();
        let linear: Vec<usize> = acl
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.names(caller.as_ref()))
            .map(|(i, _)| i)
            .collect();
        prop_assert_eq!(acl.by_subject.rules_for(caller.as_ref()).to_vec(), linear);
    }
}

/// The attack of issue 11 in the engine's terms: 1000 accesses × 100 attributes × 10 paths
/// (a million units) decided by a policy that grants nothing, and by one that grants all.
#[test]
fn a_million_units_are_decided_without_enumerating_them() {
    let attrs: Vec<String> = (0..100).map(|i| format!("a{i}")).collect();
    let paths: Vec<String> = (0..10).map(|i| format!("/p{i}")).collect();
    let accesses: Vec<Access> = (0..1000)
        .map(|i| Access {
            action: Action::Read,
            entity: EntitySelector::Id(format!("E{i}")),
            entity_type: TypeSelector::Type("Room".into()),
            attributes: AttributeSelector::Only(attrs.clone()),
            tenant: Tenant {
                service: "city".into(),
                service_paths: paths.clone(),
            },
            endpoint: None,
        })
        .collect();
    let alice = Identity::new(IdentityKind::Jwt, "alice");
    let none = Acl::from_json(r#"{"rules": []}"#).unwrap();
    assert_eq!(
        none.check_accesses(Some(&alice), &accesses),
        forbidden(
            "no rule allows read on entity E0 of type Room, attribute a0, in service \"city\" \
             path /p0"
                .into()
        )
    );
    let all = Acl::from_json(
        &json!({"rules": [
            {"name": "rooms", "effect": "allow", "subjects": ["authenticated"],
             "actions": ["read"], "ngsi": {"service": "city", "service_path": "/#",
             "entity_type": "Room", "attributes": attrs}},
            {"name": "no-a99-on-p9", "effect": "deny", "subjects": ["authenticated"],
             "actions": ["read"], "ngsi": {"service": "city", "service_path": "/p9",
             "entity_id": "E999", "attributes": ["a99"]}}
        ]})
        .to_string(),
    )
    .unwrap();
    assert_eq!(
        all.check_accesses(Some(&alice), &accesses),
        forbidden(
            "denied by rule 'no-a99-on-p9': read on entity E999 of type Room, attribute a99, \
             in service \"city\" path /p9"
                .into()
        )
    );
    assert_eq!(
        all.check_accesses(Some(&alice), &accesses[..999]),
        Decision::Allow("acl:rooms".into())
    );
}
