use super::mosquitto::import_acl_file;
use super::topic::TopicFilter;
use super::*;
use crate::access::Tenant;
use proptest::prelude::*;
use serde_json::json;

/// Who, client id, topic, access, expected.
type TopicCase<'a, T> = (Option<&'a Identity>, &'a str, &'a str, TopicAccess, T);

fn user(sub: &str) -> Identity {
    Identity::new(IdentityKind::Jwt, sub)
}

fn device(id: &str) -> Identity {
    Identity::new(IdentityKind::DeviceKey, id)
}

fn acl(rules: serde_json::Value) -> Acl {
    Acl::from_json(&json!({ "rules": rules }).to_string()).unwrap()
}

fn access(action: Action, id: EntitySelector, ty: TypeSelector, path: &str) -> Access {
    Access {
        action,
        entity: id,
        entity_type: ty,
        attributes: AttributeSelector::All,
        tenant: Tenant {
            service: "city".into(),
            service_paths: vec![path.into()],
        },
        endpoint: None,
    }
}

fn read_id(id: &str, path: &str) -> Access {
    access(
        Action::Read,
        EntitySelector::Id(id.into()),
        TypeSelector::Type("Room".into()),
        path,
    )
}

fn allowed(a: &Acl, who: Option<&Identity>, accesses: &[Access]) -> bool {
    a.check_accesses(who, accesses).is_allowed()
}

fn ngsi_rule(
    name: &str,
    effect: &str,
    subjects: &[&str],
    actions: &[&str],
    res: serde_json::Value,
) -> serde_json::Value {
    json!({ "name": name, "effect": effect, "subjects": subjects, "actions": actions, "ngsi": res })
}

fn mqtt_rule(
    name: &str,
    effect: &str,
    subjects: &[&str],
    actions: &[&str],
    topic: &str,
) -> serde_json::Value {
    json!({ "name": name, "effect": effect, "subjects": subjects, "actions": actions, "mqtt": { "topic": topic } })
}

// ---------------------------------------------------------------- configuration

#[test]
fn config_example_loads() {
    let cfg = json!({ "rules": [
        { "name": "operators-read-rooms", "effect": "allow",
          "subjects": ["role:operator", "group:city-of-a"], "actions": ["read", "subscribe"],
          "ngsi": { "service": "city", "service_path": "/a/#", "entity_type": "Room",
                    "entity_id": "*", "attributes": ["temperature", "humidity"],
                    "endpoint_prefix": "https://hooks.example.com/ngsi/" } },
        { "name": "own-devices", "effect": "allow", "subjects": ["authenticated"],
          "actions": ["*"], "mqtt": { "topic": "devices/%u/#" } },
        { "name": "no-sys", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
          "mqtt": { "topic": "$SYS/#" } }
    ]});
    let a = Acl::from_json(&cfg.to_string()).unwrap();
    assert_eq!(a.len(), 3);
}

#[test]
fn config_errors_are_clear() {
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/"}, "extra": 1}]}),
            "unknown field",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "maybe", "subjects": ["anyone"], "actions": ["read"]}]}),
            "unknown variant",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["admin"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/"}}]}),
            "subject \"admin\"",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["user:"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/"}}]}),
            "empty value",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": [], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/"}}]}),
            "subjects must not be empty",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["fly"], "ngsi": {"service": "a", "service_path": "/"}}]}),
            "action \"fly\"",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"]}]}),
            "exactly one of",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "a/b"}}]}),
            "must start with '/'",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/a/"}}]}),
            "empty segment",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/a#"}}]}),
            "'#'",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/", "entity_type": "Ro*"}}]}),
            "entity_type",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/", "attributes": ["*", "t"]}}]}),
            "must be alone",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/", "entity_id": "Room%x"}}]}),
            "unknown placeholder",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": {"service": "a", "service_path": "/", "entity_id": "%c"}}]}),
            "only allowed in mqtt",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["subscribe"], "ngsi": {"service": "a", "service_path": "/", "endpoint_prefix": "https://hooks.example.com/ngsi"}}]}),
            "must end with '/'",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["subscribe"], "ngsi": {"service": "a", "service_path": "/", "endpoint_prefix": "ftp://h/"}}]}),
            "http or https",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["create"], "mqtt": {"topic": "a"}}]}),
            "does not apply to mqtt",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": "a/#/b"}}]}),
            "'#' must be a whole level",
        ),
        (
            json!({"rules": [{"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": "a/b+"}}]}),
            "'+' must be a whole level",
        ),
        (
            json!({"rules": [
            {"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": "a"}},
            {"name": "x", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": "b"}}]}),
            "duplicate rule name",
        ),
        (
            json!({"rules": [{"name": "default-deny", "effect": "deny", "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": "a"}}]}),
            "the name \"default-deny\" is reserved",
        ),
    ];
    for (cfg, want) in cases {
        let err = Acl::from_json(&cfg.to_string()).unwrap_err().to_string();
        assert!(err.contains(want), "{cfg}: got {err:?}, want {want:?}");
    }
}

#[test]
fn rule_errors_name_the_rule() {
    let err = Acl::from_json(
        &json!({"rules": [{"name": "bad-one", "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": ""}}]})
            .to_string(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("#1 \"bad-one\""), "{err}");
}

// ---------------------------------------------------------------- matching helpers

#[test]
fn glob_table() {
    let glob = |p: &str| {
        IdRule::compile(p)
            .unwrap()
            .instantiate(&Ctx {
                user: Some("u*"),
                client: None,
                tenant: None,
            })
            .unwrap()
            .map(|g| g.into_owned())
    };
    let cases = [
        ("Room1", "Room1", true),
        ("Room1", "Room10", false),
        ("Room1*", "Room1", true),
        ("Room1*", "Room10", true),
        ("Room1*", "Room2", false),
        ("Room1*", "Room", false),
        ("*Room", "BigRoom", true),
        ("urn:ngsi-ld:Room:*", "urn:ngsi-ld:Room:1", true),
        ("urn:ngsi-ld:Room:*", "urn:ngsi-ld:Room:1:secret", false),
        ("urn:ngsi-ld:*:1", "urn:ngsi-ld:Room:1", true),
        ("urn:*", "urn:ngsi-ld:Room:1", false),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "axxbyy", false),
        ("car-%u", "car-u*", true),
        ("car-%u", "car-uX", false),
    ];
    for (pat, id, want) in cases {
        let g = glob(pat).unwrap();
        assert_eq!(glob_match(&g, id), want, "{pat} vs {id}");
    }
}

#[test]
fn service_path_table() {
    let p = |s: &str| ServicePath::parse(s).unwrap();
    let covers = [
        ("/#", "/", true),
        ("/#", "/a/b/#", true),
        ("/a/#", "/a", true),
        ("/a/#", "/a/b", true),
        ("/a/#", "/a/#", true),
        ("/a/#", "/a/b/#", true),
        ("/a/#", "/ab", false),
        ("/a/#", "/#", false),
        ("/a/#", "/", false),
        ("/a", "/a", true),
        ("/a", "/a/#", false),
        ("/a", "/a/b", false),
        ("/", "/", true),
        ("/", "/#", false),
    ];
    for (r, q, want) in covers {
        assert_eq!(p(r).covers(&p(q)), want, "{r} covers {q}");
    }
    let intersects = [
        ("/a", "/#", true),
        ("/a/b", "/a/#", true),
        ("/a/#", "/a/b/#", true),
        ("/a/b/#", "/a/#", true),
        ("/a/#", "/ab/#", false),
        ("/a", "/ab", false),
        ("/a/#", "/b", false),
    ];
    for (r, q, want) in intersects {
        assert_eq!(p(r).intersects(&p(q)), want, "{r} intersects {q}");
    }
    for bad in ["", "a", "//", "/a//b", "/a/", "/a#", "/#/a"] {
        assert!(ServicePath::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn literal_regex_table() {
    let cases = [
        ("^Room1$", Some("Room1")),
        ("^urn:ngsi-ld:Room:1$", Some("urn:ngsi-ld:Room:1")),
        ("^Room\\.1$", Some("Room.1")),
        ("^Room[0-9]*$", None),
        ("Room1", None),
        ("^Room1", None),
        ("^Room.*$", None),
        ("^Room1$|^Room2$", None),
        ("^$", None),
        ("^Room\\d$", None),
        // Escapes that are one character under every engine.
        (
            "^a\\.b\\[c\\]\\(d\\)\\*\\+\\?\\{\\}\\|\\^\\$\\\\$",
            Some("a.b[c](d)*+?{}|^$\\"),
        ),
        // glibc regcomp (Orion's subscription cache) reads these as anchors, PCRE as literals:
        // not one name under every engine.
        ("^Room\\<1$", None),
        ("^Room1\\>$", None),
        ("^Room1\\'$", None),
        ("^\\`Room1$", None),
        // Other punctuation escapes are not needed for a literal and are not trusted.
        ("^Room\\/1$", None),
        ("^Room\\-1$", None),
        ("^Room\\ 1$", None),
    ];
    for (re, want) in cases {
        assert_eq!(literal_regex(re).as_deref(), want, "{re}");
    }
}

/// A pattern with a glibc anchor escape reaches the entity a deny rule names (Orion matches
/// `^urn:ngsi-ld:Room:vault1\'$` against `urn:ngsi-ld:Room:vault1`): it is a pattern, so it
/// needs an allow rule for every id and is touched by the deny rule. On main it was read as
/// the literal id `urn:ngsi-ld:Room:vault1'` and allowed.
#[test]
fn anchor_escaped_patterns_are_patterns_against_a_deny_rule() {
    let a = acl(json!([
        ngsi_rule(
            "rooms",
            "allow",
            &["user:alice"],
            &["read", "subscribe"],
            json!({"service": "city", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:*"})
        ),
        ngsi_rule(
            "no-vault",
            "deny",
            &["anyone"],
            &["*"],
            json!({"service": "city", "service_path": "/#", "entity_id": "urn:ngsi-ld:Room:vault1"})
        ),
    ]));
    let alice = user("alice");
    for re in [
        "^urn:ngsi-ld:Room:vault1\\'$",
        "^urn:ngsi-ld:Room:\\<vault1$",
        "^urn:ngsi-ld:Room:vault1\\>$",
        "^\\`urn:ngsi-ld:Room:vault1$",
    ] {
        for action in [Action::Read, Action::Subscribe] {
            let x = access(
                action,
                EntitySelector::IdPattern(re.into()),
                TypeSelector::Type("Room".into()),
                "/a",
            );
            assert!(!allowed(&a, Some(&alice), &[x]), "{re} {action:?}");
        }
    }
    // A real literal of an allowed room still counts as that one room.
    let ok = access(
        Action::Read,
        EntitySelector::IdPattern("^urn:ngsi-ld:Room:1$".into()),
        TypeSelector::Type("Room".into()),
        "/a",
    );
    assert!(allowed(&a, Some(&alice), &[ok]));
}

// ---------------------------------------------------------------- MQTT matching

fn tf(s: &str) -> TopicFilter {
    TopicFilter::parse(s, true).unwrap()
}

#[test]
fn mosquitto_topic_matching_table() {
    // From the MQTT spec / mosquitto docs and topic_matches_sub's behaviour.
    let cases = [
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        ),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("sport/#", "sport", true),
        ("#", "sport/tennis", true),
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("#", "$SYS/broker/load", false),
        ("+/broker/load", "$SYS/broker/load", false),
        ("$SYS/#", "$SYS/broker/load", true),
        ("$SYS/broker/+", "$SYS/broker/load", true),
        ("a/+/c", "a/$b/c", true),
        ("a/b", "a/B", false),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
    ];
    for (filter, topic, want) in cases {
        assert_eq!(tf(filter).matches_topic(topic), want, "{filter} vs {topic}");
    }
}

#[test]
fn filter_containment_table() {
    let cases = [
        ("a/#", "a/+/b", true),
        ("a/#", "a/#", true),
        ("a/#", "a", true),
        ("a/+", "a/#", false),
        ("a/+", "a/+", true),
        ("a/b", "a/+", false),
        ("#", "+/x", true),
        ("#", "#", true),
        ("+/#", "#", false),
        ("#", "$SYS/#", false),
        ("+/#", "$SYS/x", false),
        ("$SYS/#", "$SYS/+/x", true),
        ("a/+/c", "a/+/c", true),
        ("a/+/c", "a/b/#", false),
    ];
    for (r, q, want) in cases {
        assert_eq!(tf(r).covers(&tf(q)), want, "{r} covers {q}");
    }
    let inter = [
        ("a/b", "a/+", true),
        ("a/b", "a/#", true),
        ("a", "a/#", true),
        ("a/b/c", "a/+", false),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "#", false),
        ("$SYS/#", "$SYS/x", true),
        ("+/b", "a/+", true),
        ("a/b", "a/c", false),
    ];
    for (r, q, want) in inter {
        assert_eq!(tf(r).intersects(&tf(q)), want, "{r} intersects {q}");
        assert_eq!(tf(q).intersects(&tf(r)), want, "{q} intersects {r}");
    }
}

#[test]
fn invalid_topics_are_bad_requests() {
    let a = acl(json!([mqtt_rule("all", "allow", &["anyone"], &["*"], "#")]));
    for (topic, access) in [
        ("", TopicAccess::Read),
        ("a/#/b", TopicAccess::Read),
        ("a/b#", TopicAccess::Read),
        ("a+/b", TopicAccess::Read),
        ("a/+", TopicAccess::Write),
        ("a/#", TopicAccess::Write),
        ("a\0b", TopicAccess::Write),
    ] {
        let d = a.check_topic(None, "c", topic, access);
        assert!(
            matches!(d, Decision::Deny(DenyReason::BadRequest(_))),
            "{topic:?}: {d:?}"
        );
    }
}

#[test]
fn mqtt_decisions() {
    let a = acl(json!([
        mqtt_rule("own", "allow", &["authenticated"], &["*"], "devices/%u/#"),
        mqtt_rule(
            "client",
            "allow",
            &["anyone"],
            &["write"],
            "$SYS/broker/connection/%c/state"
        ),
        mqtt_rule("public", "allow", &["anyone"], &["read"], "public/#"),
        mqtt_rule("no-secret", "deny", &["anyone"], &["*"], "devices/+/secret"),
        mqtt_rule("monitor", "allow", &["role:ops"], &["read"], "$SYS/#"),
    ]));
    let lamp = device("lamp1");
    let mut ops = user("olga");
    ops.roles = vec!["ops".into()];
    let r = TopicAccess::Read;
    let w = TopicAccess::Write;
    let cases: Vec<TopicCase<Option<&str>>> = vec![
        (
            Some(&lamp),
            "c1",
            "devices/lamp1/lamp/changed",
            w,
            Some("acl:own"),
        ),
        (
            Some(&lamp),
            "c1",
            "devices/lamp1/lamp/#",
            r,
            Some("acl:own"),
        ),
        (Some(&lamp), "c1", "devices/lamp1", r, Some("acl:own")),
        (Some(&lamp), "c1", "devices/lamp2/lamp/changed", w, None),
        (Some(&lamp), "c1", "devices/+/lamp/changed", r, None),
        (Some(&lamp), "c1", "devices/#", r, None),
        (Some(&lamp), "c1", "devices/lamp1/secret", r, None),
        (Some(&lamp), "c1", "devices/lamp1/x", w, Some("acl:own")),
        (None, "c1", "devices/lamp1/x", w, None),
        (
            None,
            "c1",
            "$SYS/broker/connection/c1/state",
            w,
            Some("acl:client"),
        ),
        (None, "c1", "$SYS/broker/connection/c2/state", w, None),
        (None, "c1", "public/x", r, Some("acl:public")),
        (None, "c1", "public/x", w, None),
        (None, "c1", "#", r, None),
        (Some(&ops), "c1", "$SYS/broker/load", r, Some("acl:monitor")),
        (Some(&ops), "c1", "$SYS/#", r, Some("acl:monitor")),
        (Some(&ops), "c1", "#", r, None),
    ];
    for (who, client, topic, access, want) in cases {
        let d = a.check_topic(who, client, topic, access);
        match want {
            Some(rule) => assert_eq!(d, Decision::Allow(rule.into()), "{topic} {access:?}"),
            None => assert!(!d.is_allowed(), "{topic} {access:?}: {d:?}"),
        }
    }
    // The subtree read touches the deny rule.
    let d = a.check_topic(Some(&lamp), "c1", "devices/lamp1/#", r);
    assert_eq!(
        d,
        Decision::Deny(DenyReason::Forbidden(
            "denied by rule 'no-secret': read on \"devices/lamp1/#\"".into()
        ))
    );
}

#[test]
fn mqtt_placeholder_values_never_act_as_wildcards() {
    let a = acl(json!([
        mqtt_rule(
            "own",
            "allow",
            &["authenticated"],
            &["*"],
            "devices/%u/data"
        ),
        mqtt_rule("cid", "allow", &["anyone"], &["*"], "clients/%c/#"),
    ]));
    for bad in ["+", "#", "a/b", "", "$SYS", "x+"] {
        let who = user(bad);
        for topic in [
            "devices/+/data",
            "devices/#",
            "devices/a/b/data",
            "devices/x/data",
        ] {
            assert!(
                !a.check_topic(Some(&who), "c", topic, TopicAccess::Read)
                    .is_allowed(),
                "{bad} {topic}"
            );
        }
        assert!(!a
            .check_topic(None, bad, "clients/x/y", TopicAccess::Read)
            .is_allowed());
        assert!(!a
            .check_topic(None, bad, "clients/#", TopicAccess::Read)
            .is_allowed());
    }
    assert!(a
        .check_topic(
            Some(&user("bob")),
            "c",
            "devices/bob/data",
            TopicAccess::Write
        )
        .is_allowed());
}

#[test]
fn unsafe_placeholder_in_deny_rule_denies() {
    let a = acl(json!([
        mqtt_rule("all", "allow", &["anyone"], &["*"], "#"),
        mqtt_rule("no-own-secret", "deny", &["anyone"], &["*"], "secret/%u"),
    ]));
    assert!(a
        .check_topic(Some(&user("bob")), "c", "x/y", TopicAccess::Read)
        .is_allowed());
    assert!(!a
        .check_topic(Some(&user("bob")), "c", "secret/bob", TopicAccess::Read)
        .is_allowed());
    // A username that cannot be substituted safely: the deny touches the whole subtree.
    for bad in ["b/ob", "+", "#", "$x"] {
        let who = user(bad);
        assert!(a
            .check_topic(Some(&who), "c", "x/y", TopicAccess::Read)
            .is_allowed());
        assert!(!a
            .check_topic(Some(&who), "c", "secret/x", TopicAccess::Read)
            .is_allowed());
        assert!(!a
            .check_topic(Some(&who), "c", "secret/b/ob", TopicAccess::Read)
            .is_allowed());
    }
    assert!(!a
        .check_topic(None, "c", "secret/x", TopicAccess::Read)
        .is_allowed());
    assert!(a
        .check_topic(None, "c", "x", TopicAccess::Read)
        .is_allowed());
    // At the first level: it touches everything, `$` topics included.
    let a = acl(json!([
        mqtt_rule("all", "allow", &["anyone"], &["*"], "#"),
        mqtt_rule("sys", "allow", &["anyone"], &["*"], "$SYS/#"),
        mqtt_rule("no-own", "deny", &["anyone"], &["*"], "%u/secret"),
    ]));
    assert!(a
        .check_topic(Some(&user("bob")), "c", "$SYS/x", TopicAccess::Read)
        .is_allowed());
    assert!(!a
        .check_topic(Some(&user("$SYS")), "c", "$SYS/x", TopicAccess::Read)
        .is_allowed());
    assert!(!a
        .check_topic(Some(&user("a/b")), "c", "x", TopicAccess::Read)
        .is_allowed());
}

#[test]
fn ngsi_unsafe_placeholder_in_deny_rule_touches_the_subtree() {
    let a = acl(json!([
        ngsi_rule(
            "all",
            "allow",
            &["anyone"],
            &["*"],
            json!({"service": "*", "service_path": "/#"})
        ),
        ngsi_rule(
            "no-home",
            "deny",
            &["anyone"],
            &["*"],
            json!({"service": "*", "service_path": "/home/%u/#", "entity_id": "car-%u"})
        ),
    ]));
    let bob = user("bob");
    assert!(!allowed(&a, Some(&bob), &[read_id("car-bob", "/home/bob")]));
    assert!(allowed(
        &a,
        Some(&bob),
        &[read_id("car-alice", "/home/bob")]
    ));
    assert!(allowed(
        &a,
        Some(&bob),
        &[read_id("car-bob", "/home/alice")]
    ));
    let odd = user("a/b");
    // The id substitutes literally; the path cannot, so it touches all of `/home/#`.
    assert!(!allowed(&a, Some(&odd), &[read_id("car-a/b", "/home/x")]));
    assert!(allowed(&a, Some(&odd), &[read_id("anything", "/home/x")]));
    assert!(allowed(&a, Some(&odd), &[read_id("anything", "/work")]));
    assert!(!allowed(&a, None, &[read_id("x", "/home/y/z")]));
    assert!(allowed(&a, None, &[read_id("x", "/homes")]));
}

// ---------------------------------------------------------------- NGSI decisions

fn ngsi_acl() -> Acl {
    acl(json!([
        ngsi_rule(
            "rooms-read",
            "allow",
            &["role:viewer"],
            &["read"],
            json!({"service": "city", "service_path": "/a/#", "entity_type": "Room", "entity_id": "Room1*"})
        ),
        ngsi_rule(
            "all-rooms",
            "allow",
            &["role:admin"],
            &["*"],
            json!({"service": "city", "service_path": "/#", "entity_type": "Room"})
        ),
        ngsi_rule(
            "temp-write",
            "allow",
            &["user:bob"],
            &["write"],
            json!({"service": "city", "service_path": "/a", "entity_type": "Room", "entity_id": "*", "attributes": ["temperature"]})
        ),
        ngsi_rule(
            "hum-write",
            "allow",
            &["user:bob"],
            &["write"],
            json!({"service": "city", "service_path": "/a", "entity_type": "Room", "entity_id": "*", "attributes": ["humidity"]})
        ),
        ngsi_rule(
            "no-vault",
            "deny",
            &["anyone"],
            &["*"],
            json!({"service": "city", "service_path": "/a/vault/#"})
        ),
        ngsi_rule(
            "own-car",
            "allow",
            &["authenticated"],
            &["read", "write"],
            json!({"service": "*", "service_path": "/cars/%u/#", "entity_id": "car-%u", "entity_type": "Car"})
        ),
        ngsi_rule(
            "hooks",
            "allow",
            &["role:viewer"],
            &["subscribe"],
            json!({"service": "city", "service_path": "/#", "entity_type": "Room", "endpoint_prefix": "https://hooks.example.com/ngsi/"})
        ),
    ]))
}

#[test]
fn ngsi_decisions_table() {
    let a = ngsi_acl();
    let mut viewer = user("vera");
    viewer.roles = vec!["viewer".into()];
    let mut admin = user("ann");
    admin.roles = vec!["admin".into()];
    let bob = user("bob");
    let id = |s: &str| EntitySelector::Id(s.into());
    let ty = |s: &str| TypeSelector::Type(s.into());
    let cases: Vec<(&Identity, Access, Option<&str>)> = vec![
        (&viewer, read_id("Room1", "/a"), Some("acl:rooms-read")),
        (&viewer, read_id("Room12", "/a/b"), Some("acl:rooms-read")),
        (&viewer, read_id("Room2", "/a"), None),
        (&viewer, read_id("Room1", "/ab"), None),
        (&viewer, read_id("Room1", "/a/b/#"), Some("acl:rooms-read")),
        // `/a/#` could reach the denied `/a/vault`.
        (&viewer, read_id("Room1", "/a/#"), None),
        (&viewer, read_id("Room1", "/#"), None),
        (&viewer, read_id("Room1", "/a/vault"), None),
        (
            &viewer,
            access(Action::Read, EntitySelector::Any, ty("Room"), "/a"),
            None,
        ),
        (
            &viewer,
            access(
                Action::Read,
                EntitySelector::IdPattern("^Room1.*".into()),
                ty("Room"),
                "/a",
            ),
            None,
        ),
        (
            &viewer,
            access(
                Action::Read,
                EntitySelector::IdPattern("^Room1$".into()),
                ty("Room"),
                "/a",
            ),
            Some("acl:rooms-read"),
        ),
        (
            &viewer,
            access(Action::Read, id("Room1"), TypeSelector::Any, "/a"),
            None,
        ),
        (
            &viewer,
            access(
                Action::Read,
                id("Room1"),
                TypeSelector::Pattern("^Room$".into()),
                "/a",
            ),
            Some("acl:rooms-read"),
        ),
        (
            &viewer,
            access(Action::Write, id("Room1"), ty("Room"), "/a"),
            None,
        ),
        (
            &admin,
            access(Action::Read, EntitySelector::Any, ty("Room"), "/#"),
            None,
        ), // touches the vault
        (
            &admin,
            access(Action::Delete, EntitySelector::Any, ty("Room"), "/b/#"),
            Some("acl:all-rooms"),
        ),
        (
            &admin,
            access(Action::Read, EntitySelector::Any, TypeSelector::Any, "/b"),
            None,
        ),
        (
            &admin,
            access(
                Action::Read,
                EntitySelector::IdPattern(".*".into()),
                TypeSelector::Pattern("Ro.*".into()),
                "/b",
            ),
            None,
        ),
        (
            &bob,
            access(Action::Read, id("car-bob"), ty("Car"), "/cars/bob"),
            Some("acl:own-car"),
        ),
        (
            &bob,
            access(Action::Read, id("car-bob"), ty("Car"), "/cars/bob/x/#"),
            Some("acl:own-car"),
        ),
        (
            &bob,
            access(Action::Read, id("car-bobby"), ty("Car"), "/cars/bob"),
            None,
        ),
        (
            &bob,
            access(Action::Read, id("car-bob"), ty("Car"), "/cars/bobby"),
            None,
        ),
        (
            &bob,
            access(Action::Read, id("car-bob"), ty("Car"), "/cars/#"),
            None,
        ),
        (
            &bob,
            access(Action::Read, id("car-bob"), ty("Car"), "/a"),
            None,
        ),
    ];
    for (who, acc, want) in cases {
        let d = a.check_accesses(Some(who), std::slice::from_ref(&acc));
        match want {
            Some(rule) => assert_eq!(d, Decision::Allow(rule.into()), "{} {acc:?}", who.subject),
            None => assert!(!d.is_allowed(), "{} {acc:?}: {d:?}", who.subject),
        }
    }
}

#[test]
fn attributes_split_across_rules_and_all_needs_star() {
    let a = ngsi_acl();
    let bob = user("bob");
    let mut w = access(
        Action::Write,
        EntitySelector::Id("Room9".into()),
        TypeSelector::Type("Room".into()),
        "/a",
    );
    w.attributes = AttributeSelector::Only(vec!["temperature".into(), "humidity".into()]);
    assert_eq!(
        a.check_accesses(Some(&bob), &[w.clone()]),
        Decision::Allow("acl:temp-write,hum-write".into())
    );
    w.attributes = AttributeSelector::Only(vec!["temperature".into(), "owner".into()]);
    assert!(!allowed(&a, Some(&bob), &[w.clone()]));
    w.attributes = AttributeSelector::All;
    assert!(!allowed(&a, Some(&bob), &[w.clone()]));
    w.attributes = AttributeSelector::Only(vec![]);
    assert!(!allowed(&a, Some(&bob), &[w]));
}

#[test]
fn every_access_and_every_path_must_be_allowed() {
    let a = ngsi_acl();
    let mut viewer = user("vera");
    viewer.roles = vec!["viewer".into()];
    assert!(allowed(
        &a,
        Some(&viewer),
        &[read_id("Room1", "/a"), read_id("Room13", "/a/x")]
    ));
    assert!(!allowed(
        &a,
        Some(&viewer),
        &[read_id("Room1", "/a"), read_id("Room2", "/a")]
    ));
    let mut two = read_id("Room1", "/a");
    two.tenant.service_paths = vec!["/a/x".into(), "/b".into()];
    assert!(!allowed(&a, Some(&viewer), &[two]));
    assert!(
        !allowed(&a, Some(&viewer), &[]),
        "an empty request is not allowed"
    );
    let mut none = read_id("Room1", "/a");
    none.tenant.service_paths = vec![];
    assert!(matches!(
        a.check_accesses(Some(&viewer), &[none]),
        Decision::Deny(DenyReason::BadRequest(_))
    ));
}

#[test]
fn service_is_compared_lowercase_and_exactly() {
    let a = ngsi_acl();
    let mut viewer = user("vera");
    viewer.roles = vec!["viewer".into()];
    let mut acc = read_id("Room1", "/a");
    acc.tenant.service = "City".into();
    assert!(allowed(&a, Some(&viewer), std::slice::from_ref(&acc)));
    acc.tenant.service = "city2".into();
    assert!(!allowed(&a, Some(&viewer), &[acc.clone()]));
    acc.tenant.service = String::new();
    assert!(!allowed(&a, Some(&viewer), &[acc]));
}

#[test]
fn endpoint_prefix_is_checked_by_parts() {
    let a = ngsi_acl();
    let mut viewer = user("vera");
    viewer.roles = vec!["viewer".into()];
    let sub = |ep: Option<&str>| {
        let mut s = access(
            Action::Subscribe,
            EntitySelector::Id("Room1".into()),
            TypeSelector::Type("Room".into()),
            "/b",
        );
        s.endpoint = ep.map(String::from);
        s
    };
    let cases = [
        (Some("https://hooks.example.com/ngsi/x"), true),
        (Some("https://hooks.example.com:443/ngsi/x"), true),
        (Some("https://HOOKS.example.com/ngsi/x"), true),
        (Some("https://hooks.example.com/ngsi"), false),
        (Some("https://hooks.example.com/ngsix/"), false),
        (Some("https://hooks.example.com/ngsi/../admin"), false),
        (Some("https://hooks.example.com/ngsi/%2e%2e/admin"), false),
        (Some("https://hooks.example.com.evil.net/ngsi/x"), false),
        (Some("https://hooks.example.com@evil.net/ngsi/x"), false),
        (Some("https://u@hooks.example.com/ngsi/x"), false),
        (Some("http://hooks.example.com/ngsi/x"), false),
        (Some("https://hooks.example.com:8443/ngsi/x"), false),
        (Some("not a url"), false),
        (None, false),
    ];
    for (ep, want) in cases {
        assert_eq!(allowed(&a, Some(&viewer), &[sub(ep)]), want, "{ep:?}");
    }
}

#[test]
fn subjects_table() {
    let mut g = user("gina");
    g.groups = vec!["city-of-a".into()];
    let d = device("lamp1");
    let u = user("lamp1");
    let mut cert = device("lamp1");
    cert.kind = IdentityKind::ClientCertificate;
    let cases: Vec<(&str, Option<&Identity>, bool)> = vec![
        ("anyone", None, true),
        ("anyone", Some(&g), true),
        ("authenticated", None, false),
        ("authenticated", Some(&g), true),
        ("anonymous", None, true),
        ("anonymous", Some(&g), false),
        ("group:city-of-a", Some(&g), true),
        ("group:city", Some(&g), false),
        ("user:gina", Some(&g), true),
        ("user:gin", Some(&g), false),
        ("device:lamp1", Some(&d), true),
        ("device:lamp1", Some(&u), false),
        ("device:lamp1", Some(&cert), true),
        ("user:lamp1", Some(&d), true),
        ("role:admin", Some(&g), false),
    ];
    for (s, who, want) in cases {
        let a = acl(json!([mqtt_rule("r", "allow", &[s], &["read"], "t")]));
        assert_eq!(
            a.check_topic(who, "c", "t", TopicAccess::Read).is_allowed(),
            want,
            "{s} {who:?}"
        );
    }
}

#[test]
fn default_deny_explains() {
    let a = Acl::default();
    let d = a.check_accesses(Some(&user("x")), &[read_id("Room1", "/a")]);
    let Decision::Deny(DenyReason::Forbidden(msg)) = d else {
        panic!("{d:?}")
    };
    assert!(
        msg.starts_with("no rule allows read on entity Room1 of type Room"),
        "{msg}"
    );
    assert!(!a
        .check_topic(None, "c", "a", TopicAccess::Read)
        .is_allowed());
}

// ---------------------------------------------------------------- importer

const LAMPI_ACL: &str = "\
# LAMPI cloud broker ACL
# anonymous clients may only read the public status

topic read lamp/public/#

user django
topic readwrite devices/#
topic deny devices/+/lamp/connection/+/secret

user b827eb74663e
topic write devices/b827eb74663e/lamp/changed
topic read devices/b827eb74663e/lamp/set_config
topic devices/b827eb74663e/lamp/connection/+/state

# every device, by its certificate CN (use_identity_as_username)
pattern read devices/%u/lamp/set_config
pattern write devices/%u/lamp/changed
pattern write $SYS/broker/connection/%c/state
pattern deny devices/%u/lamp/firmware
";

#[test]
fn imports_the_lampi_acl() {
    let cfg = import_acl_file(LAMPI_ACL).unwrap();
    assert_eq!(cfg.rules.len(), 10);
    assert_eq!(cfg.rules[0].name, "acl_file:4");
    assert_eq!(cfg.rules[0].subjects, vec!["anonymous"]);
    assert_eq!(cfg.rules[2].effect, Effect::Deny);
    assert_eq!(cfg.rules[2].subjects, vec!["user:django"]);
    assert_eq!(cfg.rules[5].actions, vec!["read", "write"]);
    assert_eq!(cfg.rules[6].subjects, vec!["anyone"]);
    let a = Acl::from_config(&cfg).unwrap();

    let lamp = device("b827eb74663e");
    let other = device("b827ebffffff");
    let django = user("django");
    let r = TopicAccess::Read;
    let w = TopicAccess::Write;
    let cases: Vec<TopicCase<bool>> = vec![
        (None, "web", "lamp/public/state", r, true),
        (None, "web", "lamp/public/state", w, false),
        (None, "web", "devices/b827eb74663e/lamp/changed", r, false),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827eb74663e/lamp/changed",
            w,
            true,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827eb74663e/lamp/changed",
            r,
            false,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827eb74663e/lamp/set_config",
            r,
            true,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827eb74663e/lamp/connection/lampi/state",
            w,
            true,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827eb74663e/lamp/connection/+/state",
            r,
            true,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827eb74663e/lamp/firmware",
            w,
            false,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "devices/b827ebffffff/lamp/set_config",
            r,
            false,
        ),
        (
            Some(&lamp),
            "b827eb74663e_broker",
            "lamp/public/state",
            r,
            false,
        ),
        (
            Some(&other),
            "x",
            "devices/b827ebffffff/lamp/set_config",
            r,
            true,
        ),
        (
            Some(&other),
            "x",
            "devices/b827ebffffff/lamp/changed",
            w,
            true,
        ),
        (
            Some(&other),
            "x",
            "devices/b827eb74663e/lamp/changed",
            w,
            false,
        ),
        (
            Some(&other),
            "x",
            "devices/b827ebffffff/lamp/connection/a/state",
            w,
            false,
        ),
        (Some(&other), "x", "$SYS/broker/connection/x/state", w, true),
        (
            Some(&other),
            "x",
            "$SYS/broker/connection/y/state",
            w,
            false,
        ),
        (
            Some(&django),
            "web",
            "devices/b827eb74663e/lamp/set_config",
            w,
            true,
        ),
        (Some(&django), "web", "devices/#", r, false), // touches the secret and firmware denies
        (
            Some(&django),
            "web",
            "devices/b827eb74663e/lamp/connection/x/secret",
            r,
            false,
        ),
        (
            Some(&django),
            "web",
            "devices/b827eb74663e/lamp/connection/x/state",
            r,
            true,
        ),
        (Some(&django), "web", "$SYS/broker/load", r, false),
        (Some(&django), "web", "#", r, false),
    ];
    for (who, client, topic, access, want) in cases {
        let d = a.check_topic(who, client, topic, access);
        assert_eq!(d.is_allowed(), want, "{who:?} {topic} {access:?}: {d:?}");
    }
}

#[test]
fn importer_topic_lines_are_literal() {
    let cfg = import_acl_file("user bob\ntopic read a/%u/b\n").unwrap();
    let a = Acl::from_config(&cfg).unwrap();
    let bob = user("bob");
    assert!(a
        .check_topic(Some(&bob), "c", "a/%u/b", TopicAccess::Read)
        .is_allowed());
    assert!(!a
        .check_topic(Some(&bob), "c", "a/bob/b", TopicAccess::Read)
        .is_allowed());
}

#[test]
fn importer_errors_carry_line_numbers() {
    let cases = [
        ("topic read a\nfoo bar\n", 2, "unknown keyword"),
        ("\n\nuser\n", 3, "user needs a username"),
        ("topic\n", 1, "missing topic"),
        ("# c\ntopic readonly a/b\n", 2, "not an access"),
        ("topic read a/#/b\n", 1, "'#' must be a whole level"),
        (
            "pattern write sensor/dev-%u/data\n",
            1,
            "only text of their level",
        ),
        ("pattern write a/%x\n", 1, "unknown placeholder"),
        ("topic a b\n", 1, "not an access"),
    ];
    for (text, line, want) in cases {
        let e = import_acl_file(text).unwrap_err();
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert!(e.to_string().contains(want), "{text:?}: {e}");
        assert!(
            e.to_string().starts_with(&format!("acl_file line {line}:")),
            "{e}"
        );
    }
    // A topic containing a space, with an explicit access, is fine.
    assert!(import_acl_file("topic read a b/c\n").is_ok());
    // As in Mosquitto, a lone word after `topic` is the topic (with readwrite access).
    let cfg = import_acl_file("topic read\n").unwrap();
    assert_eq!(
        cfg.rules[0].mqtt,
        Some(MqttResource {
            topic: "read".into()
        })
    );
    assert_eq!(cfg.rules[0].actions, vec!["read", "write"]);
}

// ---------------------------------------------------------------- properties

fn seg() -> impl Strategy<Value = String> {
    "[a-c]{1,3}"
}

/// The glob's definition, character by character (the engine's former matcher).
fn glob_by_definition(pattern: &str, id: &str) -> bool {
    let s: Vec<char> = id.chars().collect();
    let n = s.len();
    let mut dp = vec![false; n + 1];
    dp[0] = true;
    for c in pattern.chars() {
        let mut nd = vec![false; n + 1];
        for j in 0..=n {
            nd[j] = if c == '*' {
                dp[j] || (j > 0 && nd[j - 1] && s[j - 1] != ':')
            } else {
                j > 0 && dp[j - 1] && s[j - 1] == c
            };
        }
        dp = nd;
    }
    dp[n]
}

fn nasty() -> impl Strategy<Value = String> {
    "[a-b*+#/$:]{0,4}"
}

proptest! {
    /// A glob `P*` never matches an id that does not start with `P`, and `P` never anything
    /// but itself.
    #[test]
    fn glob_prefix_never_grants_a_sibling(prefix in "[A-Za-z0-9]{1,6}", id in "[A-Za-z0-9:]{0,8}") {
        let star: Vec<GlobTok> = GlobTok::literal(&prefix).chain([GlobTok::Star]).collect();
        let exact: Vec<GlobTok> = GlobTok::literal(&prefix).collect();
        if glob_match(&star, &id) {
            prop_assert!(id.starts_with(&prefix) && !id[prefix.len()..].contains(':'));
        }
        prop_assert_eq!(glob_match(&exact, &id), id == prefix);
    }

    /// The allocation-free glob decides exactly as the definition: a dynamic programme over
    /// characters where `*` takes any run without `:`.
    #[test]
    fn glob_match_equals_the_character_definition(
        pattern in "[ab:*é]{0,7}",
        id in "[ab:é]{0,9}",
    ) {
        let toks: Vec<GlobTok> = GlobTok::pattern(&pattern).collect();
        prop_assert_eq!(glob_match(&toks, &id), glob_by_definition(&pattern, &id));
    }

    /// `/a/#` covers exactly the paths whose segments start with `a`'s.
    #[test]
    fn service_subtree_never_grants_a_sibling(rule in prop::collection::vec(seg(), 0..3), req in prop::collection::vec(seg(), 0..4), sub in any::<bool>()) {
        let r = ServicePath { segments: rule.clone(), subtree: true };
        let q = ServicePath { segments: req.clone(), subtree: sub };
        prop_assert_eq!(r.covers(&q), req.starts_with(&rule));
        let text = format!("/{}", req.join("/"));
        let parsed = ServicePath::parse(&text).unwrap();
        if !text.starts_with(&format!("/{}", rule.join("/"))) {
            prop_assert!(!r.covers(&parsed));
        }
    }

    /// Filter containment agrees with matching on concrete topics, and intersection is
    /// implied by a common matching topic.
    #[test]
    fn topic_covers_is_sound(r in "([ab$+]|[ab]{2})(/([ab+]|[ab]{2})){0,3}(/#)?", q in "([ab$+]|[ab]{2})(/([ab+]|[ab]{2})){0,3}(/#)?", t in "[ab$]{1,2}(/[ab]{1,2}){0,4}") {
        let (r, q) = (tf(&r), tf(&q));
        if r.covers(&q) && q.matches_topic(&t) {
            prop_assert!(r.matches_topic(&t));
        }
        if r.matches_topic(&t) && q.matches_topic(&t) {
            prop_assert!(r.intersects(&q));
        }
    }

    /// A placeholder never widens: whatever the subject or client id, a `%u`/`%c` rule grants
    /// only topics whose level is literally that value (and nothing for unsafe values).
    #[test]
    fn mqtt_placeholder_never_widens(name in nasty(), cid in nasty(), topic in "[a-b*+#$/]{1,6}(/[a-b*+#$]{0,3}){0,3}") {
        let a = acl(json!([
            mqtt_rule("u", "allow", &["authenticated"], &["*"], "devices/%u/data"),
            mqtt_rule("c", "allow", &["anyone"], &["*"], "clients/%c"),
        ]));
        let who = user(&name);
        for access in [TopicAccess::Read, TopicAccess::Write] {
            let full = format!("devices/{topic}");
            if a.check_topic(Some(&who), &cid, &full, access).is_allowed() {
                prop_assert!(super::topic::value_ok(&name) || super::topic::value_ok(&cid));
                let (own, client) = (format!("devices/{name}/data"), format!("clients/{cid}"));
                prop_assert!(full == own || full == client);
            }
            let c = format!("clients/{topic}");
            if a.check_topic(Some(&who), &cid, &c, access).is_allowed() {
                prop_assert!(super::topic::value_ok(&cid));
                prop_assert_eq!(c, format!("clients/{cid}"));
            }
        }
    }

    /// A placeholder in an entity id or service path never widens.
    #[test]
    fn ngsi_placeholder_never_widens(name in nasty(), id in "[a-b*:]{0,5}", path in "[a-b*#]{1,3}(/[a-b#]{1,2}){0,2}") {
        let a = acl(json!([
            ngsi_rule("own", "allow", &["authenticated"], &["read"],
                json!({"service": "city", "service_path": "/u/%u/#", "entity_id": "car-%u"})),
        ]));
        let who = user(&name);
        let mut acc = read_id(&format!("car-{id}"), &format!("/u/{path}"));
        if ServicePath::parse(&acc.tenant.service_paths[0]).is_err() {
            acc.tenant.service_paths = vec![format!("/u/{name}")];
        }
        if a.check_accesses(Some(&who), std::slice::from_ref(&acc)).is_allowed() {
            prop_assert_eq!(id, name.clone());
            let p = ServicePath::parse(&acc.tenant.service_paths[0]).unwrap();
            prop_assert_eq!(p.segments.get(1), Some(&name));
            prop_assert!(path_value_ok(&name));
        }
        // Wide selectors are never granted by a non-`*` id rule.
        let mut wide = acc.clone();
        wide.entity = EntitySelector::Any;
        prop_assert!(!a.check_accesses(Some(&who), &[wide]).is_allowed());
    }

    /// Deny beats allow, whatever the order of the rules.
    #[test]
    fn deny_beats_allow_in_any_order(perm in Just([0usize, 1, 2, 3]).prop_shuffle(), topic in "[ab]{1,2}(/[ab]{1,2}){0,2}") {
        let rules = [
            mqtt_rule("allow-all", "allow", &["anyone"], &["*"], "#"),
            mqtt_rule("allow-a", "allow", &["anyone"], &["*"], "a/#"),
            mqtt_rule("deny-a-b", "deny", &["anyone"], &["*"], "a/b/#"),
            ngsi_rule("n", "allow", &["anyone"], &["*"], json!({"service": "*", "service_path": "/#"})),
        ];
        let ordered: Vec<_> = perm.iter().map(|i| rules[*i].clone()).collect();
        let a = acl(serde_json::Value::Array(ordered));
        let d = a.check_topic(None, "c", &topic, TopicAccess::Write);
        let denied_topic = topic == "a/b" || topic.starts_with("a/b/");
        prop_assert_eq!(d.is_allowed(), !denied_topic, "{} {:?}", topic, d);

        let nrules = [
            ngsi_rule("allow", "allow", &["anyone"], &["*"], json!({"service": "*", "service_path": "/#"})),
            ngsi_rule("deny", "deny", &["anyone"], &["read"], json!({"service": "city", "service_path": "/a/#", "entity_id": "Room1*"})),
        ];
        let n = if perm[0] % 2 == 0 { vec![nrules[0].clone(), nrules[1].clone()] } else { vec![nrules[1].clone(), nrules[0].clone()] };
        let a = acl(serde_json::Value::Array(n));
        let p = format!("/{topic}");
        let d = a.check_accesses(None, &[read_id("Room1x", &p)]);
        prop_assert_eq!(d.is_allowed(), !(p == "/a" || p.starts_with("/a/")));
    }
}

#[test]
fn huge_inputs_do_not_overflow_or_match() {
    let a = acl(json!([
        mqtt_rule("deep", "allow", &["anyone"], &["*"], "a/#"),
        mqtt_rule("no-x", "deny", &["anyone"], &["*"], "a/+/+/x/#"),
        ngsi_rule(
            "rooms",
            "allow",
            &["anyone"],
            &["read"],
            json!({"service": "*", "service_path": "/#", "entity_id": "Room*"})
        ),
    ]));
    let deep = format!("a{}", "/b".repeat(30_000));
    assert!(a
        .check_topic(None, "c", &deep, TopicAccess::Write)
        .is_allowed());
    let deep_filter = format!("a{}/#", "/+".repeat(30_000));
    assert!(!a
        .check_topic(None, "c", &deep_filter, TopicAccess::Read)
        .is_allowed());
    let long_id = format!("Room{}", "1".repeat(5000));
    assert!(!allowed(&a, None, &[read_id(&long_id, "/")]));
    assert!(allowed(&a, None, &[read_id("Room1", "/")]));
}

#[test]
fn check_request_uses_every_access() {
    let a = acl(json!([ngsi_rule(
        "rooms",
        "allow",
        &["anyone"],
        &["read"],
        json!({"service": "*", "service_path": "/#", "entity_id": "Room*"})
    )]));
    let req = crate::access::RequestAccess {
        operation: "ngsi-v2 POST /v2/op/query".into(),
        accesses: vec![read_id("Room1", "/"), read_id("Car1", "/")],
    };
    let d = a.check_request(None, &req);
    assert!(
        matches!(&d, Decision::Deny(DenyReason::Forbidden(m)) if m.contains("entity Car1")),
        "{d:?}"
    );
}

#[test]
fn callers_tenant_placeholder() {
    let a = acl(json!([
        ngsi_rule(
            "own-tenant",
            "allow",
            &["authenticated"],
            &["read"],
            json!({"service": "%t", "service_path": "/#"})
        ),
        ngsi_rule(
            "tenant-path",
            "allow",
            &["authenticated"],
            &["write"],
            json!({"service": "*", "service_path": "/%t/#"})
        ),
    ]));
    let read = |who: &Identity, service: &str| {
        let mut x = access(
            Action::Read,
            EntitySelector::Id("R1".into()),
            TypeSelector::Any,
            "/#",
        );
        x.tenant.service = service.into();
        a.check_accesses(Some(who), &[x]).is_allowed()
    };
    let mut alice = user("alice");
    assert!(
        !read(&alice, "city"),
        "no tenant claim: the rule grants nothing"
    );
    alice.tenant = Some("City".into());
    assert!(
        read(&alice, "city"),
        "the claim is compared as Orion compares services"
    );
    assert!(!read(&alice, "town"));
    alice.tenant = Some("city/x".into());
    assert!(
        !read(&alice, "city/x"),
        "a claim that is not a service name refuses the rule"
    );
    // %t in a service path: a literal segment, never a separator or a wildcard.
    let write = |who: &Identity, path: &str| {
        let x = access(
            Action::Write,
            EntitySelector::Id("R1".into()),
            TypeSelector::Any,
            path,
        );
        a.check_accesses(Some(who), &[x]).is_allowed()
    };
    let mut bob = user("bob");
    bob.tenant = Some("north".into());
    assert!(write(&bob, "/north/a"));
    assert!(!write(&bob, "/south/a"));
    bob.tenant = Some("#".into());
    assert!(!write(&bob, "/north/a") && !write(&bob, "/x"));
    // A deny rule whose caller has no tenant claim covers every tenant (when in doubt, deny).
    let d = acl(json!([
        ngsi_rule(
            "all",
            "allow",
            &["anyone"],
            &["read"],
            json!({"service": "*", "service_path": "/#"})
        ),
        ngsi_rule(
            "not-own",
            "deny",
            &["anyone"],
            &["read"],
            json!({"service": "%t", "service_path": "/#"})
        ),
    ]));
    let x = access(
        Action::Read,
        EntitySelector::Id("R1".into()),
        TypeSelector::Any,
        "/#",
    );
    assert!(!d
        .check_accesses(Some(&user("carol")), std::slice::from_ref(&x))
        .is_allowed());
    let mut dave = user("dave");
    dave.tenant = Some("elsewhere".into());
    assert!(d.check_accesses(Some(&dave), &[x]).is_allowed());
}
