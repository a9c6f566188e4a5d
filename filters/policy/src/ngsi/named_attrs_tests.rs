//! Attribute names used by filters, sort keys and conditions (named_attrs.rs): each source,
//! then through `classify`, then the bounds.

use super::named_attrs::*;
use super::*;
use crate::access::AttributeSelector;
use proptest::prelude::*;

fn v2_q(expr: &str) -> Result<Vec<String>, DenyReason> {
    let mut out = NamedAttrs::default();
    v2_string_filter(expr, "q", &mut out)?;
    Ok(out.names().0.to_vec())
}

fn ld_q(expr: &str) -> Result<Vec<String>, DenyReason> {
    let mut out = NamedAttrs::default();
    ld_query(expr, "q", &mut out)?;
    Ok(out.names().0.to_vec())
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn is_bad(r: &Result<Vec<String>, DenyReason>) -> bool {
    matches!(r, Err(DenyReason::BadRequest(_)))
}

/// The attributes of the one access a request classifies to.
fn attrs_of(method: &str, path: &str, body: &str) -> AttributeSelector {
    let access = classify(&NgsiRequest {
        broker: broker_for_path(path),
        method,
        path,
        headers: &[],
        body: body.as_bytes(),
    })
    .unwrap_or_else(|e| panic!("{method} {path} refused: {e:?}"));
    assert_eq!(access.accesses.len(), 1, "{path}");
    access.accesses[0].attributes.clone()
}

fn refused(method: &str, path: &str, body: &str) -> String {
    match classify(&NgsiRequest {
        broker: broker_for_path(path),
        method,
        path,
        headers: &[],
        body: body.as_bytes(),
    }) {
        Err(DenyReason::BadRequest(msg)) => msg,
        other => panic!("{method} {path}: expected a 400, got {other:?}"),
    }
}

fn only(names: &[&str]) -> AttributeSelector {
    AttributeSelector::Only(names.iter().map(|s| s.to_string()).collect())
}

#[test]
fn v2_string_filter_names_each_statement_as_orion_parses_it() {
    let cases: &[(&str, &[&str])] = &[
        (
            "temperature>20;pressure==700..800",
            &["temperature", "pressure"],
        ),
        ("temperature", &["temperature"]),
        ("!temperature", &["temperature"]),
        (
            "a!=1;b>=2;c<=3;d<4;e~=x.*;f:5",
            &["a", "b", "c", "d", "e", "f"],
        ),
        // A dotted path reaches into the attribute's compound value (or, for mq, metadata).
        ("address.city=='Madrid'", &["address"]),
        ("pressure.accuracy<0.5", &["pressure"]),
        // Quotes name an attribute with a dot, and hide operators.
        ("'a.b'.c==1", &["a.b"]),
        ("'x>y'==1", &["x>y"]),
        // Orion drops a trailing ';' and strtok skips a leading one; spaces are trimmed.
        ("a==1;", &["a"]),
        (";a==1", &["a"]),
        ("  a == 1 ; b ", &["a", "b"]),
        // Repeats count once.
        ("a>1;a<5", &["a"]),
        // The value side never names an attribute.
        ("a==b;c==d,e", &["a", "c"]),
    ];
    for (expr, names) in cases {
        assert_eq!(v2_q(expr), Ok(strings(names)), "{expr}");
    }
}

#[test]
fn v2_string_filter_refuses_what_orion_refuses() {
    for expr in [";", "a;;b", "==1", "!", ">3", " ; ", "a; ;b"] {
        assert!(is_bad(&v2_q(expr)), "{expr:?}: {:?}", v2_q(expr));
    }
}

#[test]
fn ld_query_names_each_term() {
    let cases: &[(&str, &[&str])] = &[
        ("name==\"Tower\"", &["name"]),
        ("(a==1|b>2);c~=\"x;y|z)\"", &["a", "b", "c"]),
        ("((a==1);(b!~=\"q\"))|!c", &["a", "b", "c"]),
        (
            "temperature.observedAt>=2020-01-01T00:00:00Z",
            &["temperature"],
        ),
        ("address[city]==\"Berlin\"", &["address"]),
        ("a==\"say \\\"hi\\\";\"", &["a"]),
        ("a==1..5;b==\"x\",\"y\"", &["a", "b"]),
        ("a", &["a"]),
        (" a == 1 | b ", &["a", "b"]),
        // An expanded name counts as the grammar splits it and whole.
        ("https://x.org/temp>3", &["https://x", "https://x.org/temp"]),
    ];
    for (expr, names) in cases {
        assert_eq!(ld_q(expr), Ok(strings(names)), "{expr}");
    }
}

#[test]
fn ld_query_refuses_what_no_broker_parses() {
    for expr in [
        "(a==1",
        "a==1)",
        "a==",
        "==1",
        "a==\"open",
        "a=1",
        "a==1;",
        "a==1||b",
        "()",
        "!",
        "a(b)==1",
        "!a==1",
    ] {
        assert!(is_bad(&ld_q(expr)), "{expr:?}: {:?}", ld_q(expr));
    }
}

#[test]
fn ld_query_nesting_is_bounded() {
    let nested = |depth: usize| format!("{}a==1{}", "(".repeat(depth), ")".repeat(depth));
    assert_eq!(ld_q(&nested(MAX_QUERY_DEPTH)), Ok(vec!["a".to_string()]));
    let too_deep = ld_q(&nested(MAX_QUERY_DEPTH + 1));
    assert!(
        matches!(&too_deep, Err(DenyReason::BadRequest(m)) if m.contains("deeper than 16")),
        "{too_deep:?}"
    );
}

#[test]
fn v2_url_filters_and_sort_keys_join_the_read() {
    let cases: &[(&str, AttributeSelector)] = &[
        ("/v2/entities?attrs=temperature&q=pressure>3", only(&["temperature", "pressure"])),
        ("/v2/entities?attrs=temperature&q=temperature>3", only(&["temperature"])),
        ("/v2/entities?attrs=temperature&mq=pressure.accuracy<1", only(&["temperature", "pressure"])),
        (
            "/v2/entities?attrs=temperature&orderBy=!pressure,dateCreated,id,humidity.x",
            only(&["temperature", "pressure", "humidity"]),
        ),
        ("/v2/entities/Room1?attrs=temperature&q=pressure>3", only(&["temperature", "pressure"])),
        ("/v2/entities/Room1/attrs?attrs=temperature&q=!pressure", only(&["temperature", "pressure"])),
        // Percent-encoded as ngsijs sends it.
        ("/v2/entities?attrs=temperature&q=pressure%3E3", only(&["temperature", "pressure"])),
        // A raw `+` is a space to Orion (libmicrohttpd), `%2B` a plus.
        ("/v2/entities?attrs=temperature&q=pressure+>+3", only(&["temperature", "pressure"])),
        ("/v2/entities?attrs=temperature&q=pressure%2B>3", only(&["temperature", "pressure+"])),
        // The geo-location attribute is not named: every attribute.
        (
            "/v2/entities?attrs=temperature&georel=near;maxDistance:1000&geometry=point&coords=40.4,-3.7",
            AttributeSelector::All,
        ),
        // Without attrs the read is of every attribute already.
        ("/v2/entities?q=pressure>3", AttributeSelector::All),
    ];
    for (path, expected) in cases {
        assert_eq!(&attrs_of("GET", path, ""), expected, "{path}");
    }
}

#[test]
fn v2_bodies_join_expression_and_condition() {
    let op_query = r#"{"entities":[{"id":"Room1"}],"attrs":["temperature"],
        "expression":{"q":"pressure>3","mq":"humidity.accuracy<1"}}"#;
    assert_eq!(
        attrs_of("POST", "/v2/op/query?orderBy=co2", op_query),
        only(&["temperature", "co2", "pressure", "humidity"])
    );
    let geo = r#"{"entities":[{"id":"Room1"}],"attrs":["temperature"],
        "expression":{"georel":"near;maxDistance:10","geometry":"point","coords":"1,2"}}"#;
    assert_eq!(
        attrs_of("POST", "/v2/op/query", geo),
        AttributeSelector::All
    );
    let subscription = r#"{"subject":{"entities":[{"id":"Room1"}],
        "condition":{"attrs":["pressure"],"expression":{"q":"co2>500"}}},
        "notification":{"http":{"url":"http://n.local/"},"attrs":["temperature"]}}"#;
    assert_eq!(
        attrs_of("POST", "/v2/subscriptions", subscription),
        only(&["temperature", "pressure", "co2"])
    );
    let patch = r#"{"subject":{"condition":{"attrs":["pressure"]}},
        "notification":{"attrs":["temperature"]}}"#;
    // Changed by id: an access to every subscription first (see `ngsi::by_id`), then the body's.
    let access = classify(&NgsiRequest {
        broker: Broker::Orion,
        method: "PATCH",
        path: "/v2/subscriptions/abc",
        headers: &[],
        body: patch.as_bytes(),
    })
    .unwrap_or_else(|e| panic!("PATCH refused: {e:?}"));
    assert_eq!(access.accesses.len(), 2);
    assert_eq!(
        access.accesses[1].attributes,
        only(&["temperature", "pressure"])
    );
    for (path, body) in [
        ("/v2/op/query", r#"{"expression":{"q":3}}"#),
        ("/v2/op/query", r#"{"expression":"q"}"#),
        ("/v2/op/query", r#"{"expression":{"q":"a;;b"}}"#),
        (
            "/v2/subscriptions",
            r#"{"subject":{"entities":[{"id":"R"}],"condition":{"attrs":"pressure"}},
                "notification":{"http":{"url":"http://n.local/"}}}"#,
        ),
    ] {
        refused("POST", path, body);
    }
}

#[test]
fn ld_url_names_join_the_read() {
    let cases: &[(&str, AttributeSelector)] = &[
        ("/ngsi-ld/v1/entities?type=Room&attrs=temperature&q=pressure>3", only(&["temperature", "pressure"])),
        (
            "/ngsi-ld/v1/entities?type=Room&attrs=temperature&q=(pressure>3|co2<5);temperature>1",
            only(&["temperature", "pressure", "co2"]),
        ),
        ("/ngsi-ld/v1/entities?type=Room&attrs=temperature&pick=id,type,pressure", only(&["temperature", "pressure"])),
        ("/ngsi-ld/v1/entities?type=Room&attrs=temperature&omit=pressure", only(&["temperature", "pressure"])),
        (
            "/ngsi-ld/v1/entities?type=Room&attrs=temperature&georel=near;maxDistance==10&geometry=Point&coordinates=[1,2]",
            only(&["temperature", "location"]),
        ),
        (
            "/ngsi-ld/v1/entities?type=Room&attrs=temperature&georel=within&geometry=Polygon&coordinates=[]&geoproperty=area",
            only(&["temperature", "area"]),
        ),
        ("/ngsi-ld/v1/entities?type=Room&attrs=temperature&geometryProperty=area", only(&["temperature", "area"])),
        ("/ngsi-ld/v1/entities/urn:x?attrs=temperature&q=pressure>3", only(&["temperature", "pressure"])),
        ("/ngsi-ld/v1/temporal/entities?type=Room&attrs=temperature&q=pressure>3", only(&["temperature", "pressure"])),
    ];
    for (path, expected) in cases {
        assert_eq!(&attrs_of("GET", path, ""), expected, "{path}");
    }
    refused("GET", "/ngsi-ld/v1/entities?type=Room&q=(a==1", "");
}

#[test]
fn ld_bodies_join_q_geoq_and_watched_attributes() {
    let query = r#"{"type":"Query","entities":[{"type":"Room"}],"attrs":["temperature"],
        "q":"pressure>3","geoQ":{"geometry":"Point","coordinates":[1,2],"georel":"near;maxDistance==5"}}"#;
    assert_eq!(
        attrs_of("POST", "/ngsi-ld/v1/entityOperations/query", query),
        only(&["temperature", "pressure", "location"])
    );
    let subscription = r#"{"type":"Subscription","entities":[{"type":"Room"}],
        "watchedAttributes":["pressure"],"q":"co2>5",
        "notification":{"attributes":["temperature"],"endpoint":{"uri":"http://n.local/"}}}"#;
    assert_eq!(
        attrs_of("POST", "/ngsi-ld/v1/subscriptions", subscription),
        only(&["temperature", "co2", "pressure"])
    );
    refused(
        "POST",
        "/ngsi-ld/v1/entityOperations/query",
        r#"{"entities":[{"type":"Room"}],"q":"a=="}"#,
    );
}

#[test]
fn ngsi10_restrictions_and_conditions_join_the_access() {
    let scoped = |scope: &str| {
        format!(
            r#"{{"entities":[{{"id":"Room1","isPattern":"false","type":"Room"}}],
                "attributes":["temperature"],"restriction":{{"scopes":[{scope}]}}}}"#
        )
    };
    let cases: &[(&str, AttributeSelector)] = &[
        (
            r#"{"scopeType":"FIWARE::StringQuery","scopeValue":"pressure>3"}"#,
            only(&["temperature", "pressure"]),
        ),
        (
            r#"{"scopeType":"FIWARE::StringQuery::Metadata","scopeValue":"pressure.accuracy<1"}"#,
            only(&["temperature", "pressure"]),
        ),
        (
            r#"{"scopeType":"stringQuery","scopeValue":"owner=alice;site=x"}"#,
            only(&["temperature", "owner", "site"]),
        ),
        (
            r#"{"scopeType":"FIWARE::Filter::Existence","scopeValue":"entity::type"}"#,
            only(&["temperature"]),
        ),
        (
            r#"{"scopeType":"global","scopeValue":"global"}"#,
            only(&["temperature"]),
        ),
        (
            r#"{"scopeType":"FIWARE::Location","scopeValue":{"circle":{"centerLatitude":"1","centerLongitude":"2","radius":"3"}}}"#,
            AttributeSelector::All,
        ),
        (
            r#"{"scopeType":"somethingElse","scopeValue":"x"}"#,
            AttributeSelector::All,
        ),
    ];
    for (scope, expected) in cases {
        assert_eq!(
            &attrs_of("POST", "/v1/queryContext", &scoped(scope)),
            expected,
            "/v1/queryContext {scope}"
        );
        // FogFlow answers every attribute whatever the request names (`fogflow::widen`).
        assert_eq!(
            attrs_of("POST", "/ngsi10/queryContext", &scoped(scope)),
            AttributeSelector::All,
            "/ngsi10/queryContext {scope}"
        );
    }
    let subscribe = r#"{"entities":[{"id":"Room1","type":"Room"}],"attributes":["temperature"],
        "reference":"http://n.local/","notifyConditions":[{"type":"ONCHANGE","condValueList":["pressure"]},
        {"type":"ONCHANGE","condValues":["co2"]}]}"#;
    // Only FogFlow serves NGSI10 subscriptions, and it notifies every attribute.
    assert_eq!(
        attrs_of("POST", "/ngsi10/subscribeContext", subscribe),
        AttributeSelector::All
    );
    refused(
        "POST",
        "/v1/queryContext",
        &scoped(r#"{"scopeType":"FIWARE::StringQuery","scopeValue":"a;;b"}"#),
    );
}

#[test]
fn orion_v1_query_context_is_a_read() {
    let body = r#"{"entities":[{"id":"Room1","isPattern":"false","type":"Room"}],"attributes":["temperature"]}"#;
    let access = classify(&NgsiRequest {
        broker: Broker::Orion,
        method: "POST",
        path: "/v1/queryContext?details=off",
        headers: &[],
        body: body.as_bytes(),
    })
    .expect("classified");
    assert_eq!(access.operation, "fogflow POST /v1/queryContext");
    assert_eq!(access.accesses.len(), 1);
    let a = &access.accesses[0];
    assert_eq!(a.action, crate::access::Action::Read);
    assert_eq!(a.entity, crate::access::EntitySelector::Id("Room1".into()));
    assert_eq!(a.attributes, only(&["temperature"]));
}

#[test]
fn expressions_and_names_are_bounded() {
    let long = format!("a=={}", "1".repeat(MAX_EXPRESSION_BYTES));
    let msg = refused("GET", &format!("/v2/entities?attrs=t&q={long}"), "");
    assert!(msg.contains("8192"), "{msg}");
    let msg = refused("GET", &format!("/ngsi-ld/v1/entities?type=T&q={long}"), "");
    assert!(msg.contains("8192"), "{msg}");
    let names = |n: usize| {
        (0..n)
            .map(|i| format!("a{i}"))
            .collect::<Vec<_>>()
            .join(";")
    };
    assert_eq!(
        v2_q(&names(MAX_NAMED_ATTRIBUTES)).map(|v| v.len()),
        Ok(1000)
    );
    let over = v2_q(&names(MAX_NAMED_ATTRIBUTES + 1));
    assert!(
        matches!(&over, Err(DenyReason::BadRequest(m)) if m.contains("more than 1000 attributes")),
        "{over:?}"
    );
    // The cap counts distinct names over all the sources of one request.
    let half: Vec<String> = (0..600).map(|i| format!("\"b{i}\"")).collect();
    let body = format!(
        r#"{{"subject":{{"entities":[{{"id":"R"}}],"condition":{{"attrs":[{}],"expression":{{"q":"{}"}}}}}},
            "notification":{{"http":{{"url":"http://n.local/"}},"attrs":["t"]}}}}"#,
        half.join(","),
        (0..600)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(";")
    );
    let msg = refused("POST", "/v2/subscriptions", &body);
    assert!(msg.contains("more than 1000 attributes"), "{msg}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any text: a decision (names or a 400), never a panic, never more names than the cap,
    /// and every name non-empty.
    #[test]
    fn parsers_never_panic_on_any_text(expr in "\\PC{0,200}") {
        for names in [v2_q(&expr), ld_q(&expr)].into_iter().flatten() {
            prop_assert!(names.len() <= MAX_NAMED_ATTRIBUTES);
            // Blank as the brokers' parsers see it (space, tab): other Unicode spaces are
            // characters of a (strange) name, which rules then match literally.
            prop_assert!(names.iter().all(|n| !n.trim_matches([' ', '\t']).is_empty()));
        }
    }

    /// Text made of the grammar's own characters, where the parsers' branches are.
    #[test]
    fn parsers_never_panic_on_grammar_soup(expr in "[a-c.\\[\\]();|!=<>~:'\"\\\\ ,0-9]{0,120}") {
        for names in [v2_q(&expr), ld_q(&expr)].into_iter().flatten() {
            // Blank as the brokers' parsers see it (space, tab): other Unicode spaces are
            // characters of a (strange) name, which rules then match literally.
            prop_assert!(names.iter().all(|n| !n.trim_matches([' ', '\t']).is_empty()));
        }
    }

    /// Every attribute of a well-formed LD query is found, whatever the nesting.
    #[test]
    fn ld_query_finds_every_term(
        terms in proptest::collection::vec(("[a-z]{1,8}", prop_oneof![Just("=="), Just(">"), Just("!~=")]), 1..8),
        group in any::<bool>(),
    ) {
        let joined = terms
            .iter()
            .map(|(a, op)| format!("{a}{op}\"v;|)\""))
            .collect::<Vec<_>>()
            .join("|");
        let expr = if group { format!("({joined})") } else { joined };
        let names = ld_q(&expr).map_err(|e| TestCaseError::fail(format!("{expr}: {e:?}")))?;
        for (a, _) in &terms {
            prop_assert!(names.contains(a), "{} missing from {:?}", a, names);
        }
    }
}
