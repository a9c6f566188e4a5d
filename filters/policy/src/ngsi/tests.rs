//! Table-driven tests of the NGSI request models.

use super::*;
use crate::access::{Action::*, AttributeSelector, EntitySelector, Tenant, TypeSelector};

type Exp = (
    Action,
    EntitySelector,
    TypeSelector,
    AttributeSelector,
    Option<String>,
);

fn id(s: &str) -> EntitySelector {
    EntitySelector::Id(s.into())
}
fn pat(s: &str) -> EntitySelector {
    EntitySelector::IdPattern(s.into())
}
fn eany() -> EntitySelector {
    EntitySelector::Any
}
fn ty(s: &str) -> TypeSelector {
    TypeSelector::Type(s.into())
}
fn tpat(s: &str) -> TypeSelector {
    TypeSelector::Pattern(s.into())
}
fn tany() -> TypeSelector {
    TypeSelector::Any
}
fn only(a: &[&str]) -> AttributeSelector {
    AttributeSelector::Only(a.iter().map(|s| s.to_string()).collect())
}
fn all() -> AttributeSelector {
    AttributeSelector::All
}
fn e(a: Action, en: EntitySelector, t: TypeSelector, at: AttributeSelector) -> Exp {
    (a, en, t, at, None)
}
fn ep(a: Action, en: EntitySelector, t: TypeSelector, at: AttributeSelector, url: &str) -> Exp {
    (a, en, t, at, Some(url.into()))
}

fn run_on(
    broker: Broker,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<RequestAccess, DenyReason> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    classify(&NgsiRequest {
        broker,
        method,
        path,
        headers: &headers,
        body: body.as_bytes(),
    })
}

fn run(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<RequestAccess, DenyReason> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    classify(&NgsiRequest {
        broker: broker_for_path(path),
        method,
        path,
        headers: &headers,
        body: body.as_bytes(),
    })
}

fn shape(r: &RequestAccess) -> Vec<Exp> {
    r.accesses
        .iter()
        .map(|a| {
            (
                a.action,
                a.entity.clone(),
                a.entity_type.clone(),
                a.attributes.clone(),
                a.endpoint.clone(),
            )
        })
        .collect()
}

fn check_table(cases: Vec<(&str, &str, &str, Vec<Exp>)>) {
    for (method, path, body, expected) in cases {
        match run(method, path, &[], body) {
            Ok(r) => assert_eq!(shape(&r), expected, "{method} {path} {body}"),
            Err(err) => panic!("{method} {path} {body}: refused: {err}"),
        }
    }
}

fn status(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> u32 {
    match run(method, path, headers, body) {
        Ok(r) => panic!("{method} {path} {body}: expected a refusal, got {r:?}"),
        Err(e) => e.status(),
    }
}

fn check_refused(cases: &[(&str, &str, &str, u32)]) {
    for (method, path, body, want) in cases {
        assert_eq!(
            status(method, path, &[], body),
            *want,
            "{method} {path} {body}"
        );
    }
}

// ---------------------------------------------------------------- NGSI v2

#[test]
fn v2_entities() {
    check_table(vec![
        (
            "GET",
            "/v2/entities",
            "",
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "GET",
            "/v2/entities?id=A,B&type=Room&attrs=temp,pressure",
            "",
            vec![
                e(Read, id("A"), ty("Room"), only(&["temp", "pressure"])),
                e(Read, id("B"), ty("Room"), only(&["temp", "pressure"])),
            ],
        ),
        (
            "GET",
            "/v2/entities?idPattern=Room.*&typePattern=R.%2B&q=temp>20",
            "",
            vec![e(Read, pat("Room.*"), tpat("R.+"), all())],
        ),
        (
            "GET",
            "/v2/entities?idPattern=Room[0-9]%2B&attrs=*",
            "",
            vec![e(Read, pat("Room[0-9]+"), tany(), all())],
        ),
        (
            "GET",
            "/v2/entities?type=Room,Car&options=keyValues",
            "",
            vec![
                e(Read, eany(), ty("Room"), all()),
                e(Read, eany(), ty("Car"), all()),
            ],
        ),
        (
            "POST",
            "/v2/entities",
            r#"{"id":"Room1","type":"Room","temperature":{"value":23},"pressure":{"value":720}}"#,
            vec![e(
                Create,
                id("Room1"),
                ty("Room"),
                only(&["pressure", "temperature"]),
            )],
        ),
        (
            "POST",
            "/v2/entities?options=keyValues",
            r#"{"id":"Room1","temperature":23}"#,
            vec![e(Create, id("Room1"), ty("Thing"), only(&["temperature"]))],
        ),
        (
            "POST",
            "/v2/entities?options=upsert",
            r#"{"id":"Room1","type":"Room","t":1}"#,
            vec![
                e(Create, id("Room1"), ty("Room"), only(&["t"])),
                e(Write, id("Room1"), ty("Room"), only(&["t"])),
            ],
        ),
        (
            "GET",
            "/v2/entities/Room1",
            "",
            vec![e(Read, id("Room1"), tany(), all())],
        ),
        (
            "GET",
            "/v2/entities/Room1?type=Room&attrs=temperature",
            "",
            vec![e(Read, id("Room1"), ty("Room"), only(&["temperature"]))],
        ),
        (
            "DELETE",
            "/v2/entities/Room1?type=Room",
            "",
            vec![e(Delete, id("Room1"), ty("Room"), all())],
        ),
        (
            "GET",
            "/v2/entities/Room1/attrs",
            "",
            vec![e(Read, id("Room1"), tany(), all())],
        ),
        (
            "POST",
            "/v2/entities/Room1/attrs",
            r#"{"humidity":{"value":40}}"#,
            vec![e(Write, id("Room1"), tany(), only(&["humidity"]))],
        ),
        (
            "POST",
            "/v2/entities/Room1/attrs?options=append",
            r#"{"humidity":{"value":40}}"#,
            vec![e(Write, id("Room1"), tany(), only(&["humidity"]))],
        ),
        (
            "PATCH",
            "/v2/entities/Room1/attrs?type=Room",
            r#"{"temperature":{"value":24},"pressure":{"value":1}}"#,
            vec![e(
                Write,
                id("Room1"),
                ty("Room"),
                only(&["pressure", "temperature"]),
            )],
        ),
        (
            "PUT",
            "/v2/entities/Room1/attrs",
            r#"{"temperature":{"value":24}}"#,
            vec![e(Write, id("Room1"), tany(), all())],
        ),
        (
            "GET",
            "/v2/entities/Room1/attrs/temperature",
            "",
            vec![e(Read, id("Room1"), tany(), only(&["temperature"]))],
        ),
        (
            "PUT",
            "/v2/entities/Room1/attrs/temperature",
            r#"{"value":25}"#,
            vec![e(Write, id("Room1"), tany(), only(&["temperature"]))],
        ),
        (
            "DELETE",
            "/v2/entities/Room1/attrs/temperature",
            "",
            vec![e(Delete, id("Room1"), tany(), only(&["temperature"]))],
        ),
        (
            "GET",
            "/v2/entities/Room1/attrs/temperature/value",
            "",
            vec![e(Read, id("Room1"), tany(), only(&["temperature"]))],
        ),
        (
            "PUT",
            "/v2/entities/Room1/attrs/temperature/value?type=Room",
            "25",
            vec![e(Write, id("Room1"), ty("Room"), only(&["temperature"]))],
        ),
        // An encoded id is decoded exactly once.
        (
            "GET",
            "/v2/entities/urn%3Angsi%3ARoom%253A1",
            "",
            vec![e(Read, id("urn:ngsi:Room%3A1"), tany(), all())],
        ),
        ("GET", "/v2/types", "", vec![e(Read, eany(), tany(), all())]),
        (
            "GET",
            "/v2/types/Room",
            "",
            vec![e(Read, eany(), ty("Room"), all())],
        ),
    ]);
}

#[test]
fn v2_batch_operations() {
    check_table(vec![
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"append","entities":[{"id":"R1","type":"Room","t":{"value":1}},{"id":"R2","h":{"value":2}}]}"#,
            vec![
                e(Create, id("R1"), ty("Room"), only(&["t"])),
                e(Write, id("R1"), ty("Room"), only(&["t"])),
                e(Create, id("R2"), ty("Thing"), only(&["h"])),
                e(Write, id("R2"), tany(), only(&["h"])),
            ],
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"appendStrict","entities":[{"id":"R1","type":"Room","t":1}]}"#,
            vec![
                e(Create, id("R1"), ty("Room"), only(&["t"])),
                e(Write, id("R1"), ty("Room"), only(&["t"])),
            ],
        ),
        (
            "POST",
            "/v2/op/update?options=keyValues",
            r#"{"actionType":"update","entities":[{"id":"R1","type":"Room","t":1}]}"#,
            vec![e(Write, id("R1"), ty("Room"), only(&["t"]))],
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"replace","entities":[{"id":"R1","t":1}]}"#,
            vec![e(Write, id("R1"), tany(), all())],
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"delete","entities":[{"id":"R1","type":"Room"},{"id":"R2","t":{}}]}"#,
            vec![
                e(Delete, id("R1"), ty("Room"), all()),
                e(Delete, id("R2"), tany(), only(&["t"])),
            ],
        ),
        (
            "POST",
            "/v2/op/query",
            r#"{"entities":[{"idPattern":".*","type":"Room"},{"id":"Car1","typePattern":"C.*"}],"attrs":["temperature"],"expression":{"q":"temperature>40"}}"#,
            vec![
                e(Read, pat(".*"), ty("Room"), only(&["temperature"])),
                e(Read, id("Car1"), tpat("C.*"), only(&["temperature"])),
            ],
        ),
        (
            "POST",
            "/v2/op/query",
            r#"{"expression":{"q":"temperature>40"}}"#,
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "POST",
            "/v2/notify",
            r#"{"subscriptionId":"abc","data":[{"id":"R1","type":"Room","t":{"value":1}}]}"#,
            vec![
                e(Create, id("R1"), ty("Room"), only(&["t"])),
                e(Write, id("R1"), ty("Room"), only(&["t"])),
            ],
        ),
    ]);
}

#[test]
fn v2_subscriptions_and_registrations() {
    check_table(vec![
        (
            "POST",
            "/v2/subscriptions",
            r#"{"description":"x","subject":{"entities":[{"idPattern":".*","type":"Room"}],"condition":{"attrs":["temperature"]}},"notification":{"http":{"url":"http://localhost:1028/accumulate"},"attrs":["temperature","humidity"]},"expires":"2040-01-01T14:00:00.00Z"}"#,
            vec![ep(
                Subscribe,
                pat(".*"),
                ty("Room"),
                only(&["temperature", "humidity"]),
                "http://localhost:1028/accumulate",
            )],
        ),
        (
            "POST",
            "/v2/subscriptions",
            r#"{"subject":{"entities":[{"id":"R1"},{"id":"R2","type":"Room"}]},"notification":{"httpCustom":{"url":"http://h/x","headers":{"a":"b"}}}}"#,
            vec![
                ep(Subscribe, id("R1"), tany(), all(), "http://h/x"),
                ep(Subscribe, id("R2"), ty("Room"), all(), "http://h/x"),
            ],
        ),
        (
            "POST",
            "/v2/subscriptions",
            r#"{"subject":{"entities":[{"type":"Room"}]},"notification":{"mqtt":{"url":"mqtt://broker:1883","topic":"t"}}}"#,
            vec![ep(
                Subscribe,
                eany(),
                ty("Room"),
                all(),
                "mqtt://broker:1883",
            )],
        ),
        (
            "PATCH",
            "/v2/subscriptions/abc",
            r#"{"expires":"2041-01-01T00:00:00Z"}"#,
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "PATCH",
            "/v2/subscriptions/abc",
            r#"{"notification":{"http":{"url":"http://evil/"}}}"#,
            // Orion finds the subscription by id alone: the change needs every subscription
            // the id may name, and the new body.
            vec![
                e(Subscribe, eany(), tany(), all()),
                ep(Subscribe, eany(), tany(), all(), "http://evil/"),
            ],
        ),
        (
            "GET",
            "/v2/subscriptions",
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "GET",
            "/v2/subscriptions/abc",
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "DELETE",
            "/v2/subscriptions/abc",
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "POST",
            "/v2/registrations",
            r#"{"description":"d","dataProvided":{"entities":[{"id":"Room2","type":"Room"}],"attrs":["relativeHumidity"]},"provider":{"http":{"url":"http://localhost:1234"},"legacyForwarding":false}}"#,
            vec![ep(
                Register,
                id("Room2"),
                ty("Room"),
                only(&["relativeHumidity"]),
                "http://localhost:1234",
            )],
        ),
        (
            "GET",
            "/v2/registrations",
            "",
            vec![e(Register, eany(), tany(), all())],
        ),
        (
            "DELETE",
            "/v2/registrations/r1",
            "",
            vec![e(Register, eany(), tany(), all())],
        ),
    ]);
}

#[test]
fn version_touches_nothing() {
    let r = run("GET", "/version", &[], "").unwrap();
    assert!(r.accesses.is_empty());
    assert_eq!(r.operation, "ngsi-v2 GET /version");
}

#[test]
fn v2_malformed_bodies_and_queries_are_bad_requests() {
    check_refused(&[
        ("POST", "/v2/entities", "{not json", 400),
        ("POST", "/v2/entities", r#"{"type":"Room"}"#, 400),
        ("POST", "/v2/entities", r#"{"id":7}"#, 400),
        ("POST", "/v2/entities", r#"{"id":""}"#, 400),
        ("POST", "/v2/entities", r#"[{"id":"A"}]"#, 400),
        ("POST", "/v2/entities/R1/attrs", "[]", 400),
        ("PUT", "/v2/entities/R1/attrs", "", 400),
        ("POST", "/v2/op/update", r#"{"actionType":"append"}"#, 400),
        ("POST", "/v2/op/update", r#"{"entities":[{"id":"A"}]}"#, 400),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"upsert","entities":[{"id":"A"}]}"#,
            400,
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"update","entities":[{"type":"A"}]}"#,
            400,
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"update","entities":[]}"#,
            400,
        ),
        (
            "POST",
            "/v2/op/query",
            r#"{"entities":[{"id":"A","idPattern":".*"}]}"#,
            400,
        ),
        ("POST", "/v2/op/query", r#"{"attrs":"temperature"}"#, 400),
        (
            "POST",
            "/v2/subscriptions",
            r#"{"subject":{"entities":[{"id":"A"}]}}"#,
            400,
        ),
        (
            "POST",
            "/v2/subscriptions",
            r#"{"subject":{"entities":[]},"notification":{"http":{"url":"http://x"}}}"#,
            400,
        ),
        (
            "POST",
            "/v2/subscriptions",
            r#"{"subject":{"entities":[{"id":"A"}]},"notification":{"attrs":[]}}"#,
            400,
        ),
        (
            "POST",
            "/v2/subscriptions",
            r#"{"subject":{"entities":[{"id":"A"}]},"notification":{"http":{"url":"http://x"},"mqtt":{"url":"mqtt://y"}}}"#,
            400,
        ),
        (
            "POST",
            "/v2/registrations",
            r#"{"dataProvided":{"entities":[{"id":"A"}]}}"#,
            400,
        ),
        (
            "POST",
            "/v2/registrations",
            r#"{"dataProvided":{"entities":[{"id":"A"}]},"provider":{"http":{}}}"#,
            400,
        ),
        ("POST", "/v2/notify", r#"{"subscriptionId":"x"}"#, 400),
        ("GET", "/v2/entities?id=A&idPattern=.*", "", 400),
        ("GET", "/v2/entities?type=A&typePattern=.*", "", 400),
        ("GET", "/v2/entities?id=A&id=B", "", 400),
        ("GET", "/v2/entities?id=A,,B", "", 400),
        ("GET", "/v2/entities?type=", "", 400),
        ("GET", "/v2/entities/R1?type=A&type=B", "", 400),
    ]);
}

#[test]
fn duplicate_json_keys_are_refused() {
    check_refused(&[
        (
            "POST",
            "/v2/entities",
            r#"{"id":"Mine","id":"Yours","type":"T"}"#,
            400,
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"update","actionType":"delete","entities":[{"id":"A"}]}"#,
            400,
        ),
        (
            "POST",
            "/v2/op/update",
            r#"{"actionType":"update","entities":[{"id":"A","t":1,"t":2}]}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"A","id":"B"}}],"updateAction":"UPDATE"}"#,
            400,
        ),
    ]);
    // Numbers, nulls and nesting still parse.
    let r = run(
        "POST",
        "/v2/entities",
        &[],
        r#"{"id":"A","type":"T","x":{"value":[1,-2,3.5,null,true,{"a":{}}]}}"#,
    )
    .unwrap();
    assert_eq!(shape(&r), vec![e(Create, id("A"), ty("T"), only(&["x"]))]);
}

#[test]
fn batch_limit() {
    let many: Vec<String> = (0..=MAX_BATCH_ENTITIES)
        .map(|i| format!(r#"{{"id":"E{i}","t":1}}"#))
        .collect();
    let body = format!(
        r#"{{"actionType":"update","entities":[{}]}}"#,
        many.join(",")
    );
    assert_eq!(status("POST", "/v2/op/update", &[], &body), 400);
    let ok: Vec<String> = (0..MAX_BATCH_ENTITIES)
        .map(|i| format!(r#"{{"id":"E{i}","t":1}}"#))
        .collect();
    let body = format!(r#"{{"actionType":"update","entities":[{}]}}"#, ok.join(","));
    assert_eq!(
        run("POST", "/v2/op/update", &[], &body)
            .unwrap()
            .accesses
            .len(),
        MAX_BATCH_ENTITIES
    );
    // append expands to 2 accesses per entity: 600 entities are 1200 accesses → refused.
    let half: Vec<String> = (0..600).map(|i| format!(r#"{{"id":"E{i}"}}"#)).collect();
    let body = format!(
        r#"{{"actionType":"append","entities":[{}]}}"#,
        half.join(",")
    );
    assert_eq!(status("POST", "/v2/op/update", &[], &body), 400);
    // A query-string cross product is capped too.
    let ids: Vec<String> = (0..40).map(|i| format!("E{i}")).collect();
    let types: Vec<String> = (0..30).map(|i| format!("T{i}")).collect();
    let path = format!("/v2/entities?id={}&type={}", ids.join(","), types.join(","));
    assert_eq!(status("GET", &path, &[], ""), 400);
}

/// The description of a refusal, for tests that check it names the list and the limit.
fn refusal(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    match run(method, path, headers, body) {
        Ok(r) => panic!("{method} {path}: expected a refusal, got {r:?}"),
        Err(DenyReason::BadRequest(d)) => d,
        Err(other) => panic!("{method} {path}: expected a 400, got {other:?}"),
    }
}

fn names(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix}{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn url_lists_are_capped_and_name_the_list() {
    let path = format!("/v2/entities?attrs={}", names("a", MAX_LIST_ITEMS + 1));
    let d = refusal("GET", &path, &[], "");
    assert!(d.contains("\"attrs\"") && d.contains("1000 allowed"), "{d}");
    let path = format!(
        "/ngsi-ld/v1/entities?id={}",
        names("urn:x:", MAX_LIST_ITEMS + 1)
    );
    let d = refusal("GET", &path, &[], "");
    assert!(d.contains("\"id\"") && d.contains("1000 allowed"), "{d}");
    // At the cap it is a request like any other.
    let path = format!("/v2/entities/E?attrs={}", names("a", MAX_LIST_ITEMS));
    assert_eq!(run("GET", &path, &[], "").unwrap().accesses.len(), 1);
}

#[test]
fn repeated_names_are_dropped() {
    let r = run(
        "GET",
        "/v2/entities?id=A,B,A&attrs=t,p,t,t",
        &[("fiware-servicepath", "/a,/b,/a/,/a")],
        "",
    )
    .unwrap();
    assert_eq!(
        shape(&r),
        vec![
            e(Read, id("A"), tany(), only(&["t", "p"])),
            e(Read, id("B"), tany(), only(&["t", "p"])),
        ]
    );
    assert_eq!(r.accesses[0].tenant.service_paths, vec!["/a", "/b"]);
    let body = r#"{"entities":[{"id":"A"}],"attrs":["x","y","x"]}"#;
    let r = run("POST", "/v2/op/query", &[], body).unwrap();
    assert_eq!(shape(&r), vec![e(Read, id("A"), tany(), only(&["x", "y"]))]);
}

#[test]
fn the_product_of_ids_and_attributes_is_capped_before_it_is_built() {
    // The attack: 1000 ids × 1000 attributes would be a million names.
    let path = format!(
        "/v2/entities?id={}&type=Room&attrs={}",
        names("E", 1000),
        names("a", 1000)
    );
    let d = refusal("GET", &path, &[], "");
    assert!(d.contains("1000 entities × 1000 attributes"), "{d}");
    assert!(d.contains("100000 entity-attribute pairs"), "{d}");
    // 1000 × 100 is at the cap and allowed.
    let path = format!(
        "/v2/entities?id={}&type=Room&attrs={}",
        names("E", 1000),
        names("a", 100)
    );
    assert_eq!(run("GET", &path, &[], "").unwrap().accesses.len(), 1000);
    // Subscriptions and registrations: entities × attrs, and NGSI-LD entity type arrays.
    let ents: Vec<String> = (0..1000).map(|i| format!(r#"{{"id":"E{i}"}}"#)).collect();
    let attrs: Vec<String> = (0..101).map(|i| format!(r#""a{i}""#)).collect();
    let body = format!(
        r#"{{"subject":{{"entities":[{}]}},"notification":{{"http":{{"url":"http://n/"}},"attrs":[{}]}}}}"#,
        ents.join(","),
        attrs.join(",")
    );
    assert_eq!(status("POST", "/v2/subscriptions", &[], &body), 400);
    let types: Vec<String> = (0..=MAX_LIST_ITEMS).map(|i| format!(r#""T{i}""#)).collect();
    let body = format!(r#"[{{"id":"urn:a","type":[{}]}}]"#, types.join(","));
    let d = refusal("POST", "/ngsi-ld/v1/entityOperations/update", &[], &body);
    assert!(
        d.contains("entity.type") && d.contains("1000 allowed"),
        "{d}"
    );
}

// ---------------------------------------------------------------- NGSI-LD

#[test]
fn ld_entities() {
    let p = "/ngsi-ld/v1";
    check_table(vec![
        (
            "GET",
            &format!("{p}/entities?type=Building&attrs=name,address"),
            "",
            vec![e(Read, eany(), ty("Building"), only(&["name", "address"]))],
        ),
        (
            "GET",
            &format!("{p}/entities?id=urn:ngsi-ld:B:1,urn:ngsi-ld:B:2&type=Building"),
            "",
            vec![
                e(Read, id("urn:ngsi-ld:B:1"), ty("Building"), all()),
                e(Read, id("urn:ngsi-ld:B:2"), ty("Building"), all()),
            ],
        ),
        (
            "GET",
            &format!("{p}/entities?idPattern=urn:ngsi-ld:B:.*&type=Building&q=height>10"),
            "",
            vec![e(Read, pat("urn:ngsi-ld:B:.*"), ty("Building"), all())],
        ),
        (
            "GET",
            &format!("{p}/entities?type=(Building;Store)|Shop"),
            "",
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "POST",
            &format!("{p}/entities"),
            r#"{"id":"urn:ngsi-ld:B:1","type":"Building","name":{"type":"Property","value":"x"},"@context":"https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"}"#,
            vec![e(
                Create,
                id("urn:ngsi-ld:B:1"),
                ty("Building"),
                only(&["name"]),
            )],
        ),
        (
            "POST",
            &format!("{p}/entities/"),
            r#"{"id":"urn:x","type":["A","B"],"p":{"value":1}}"#,
            vec![
                e(Create, id("urn:x"), ty("A"), only(&["p"])),
                e(Create, id("urn:x"), ty("B"), only(&["p"])),
            ],
        ),
        (
            "GET",
            &format!("{p}/entities/urn:ngsi-ld:B:1?attrs=name"),
            "",
            vec![e(Read, id("urn:ngsi-ld:B:1"), tany(), only(&["name"]))],
        ),
        (
            "GET",
            &format!("{p}/entities/urn%3Angsi-ld%3AB%3A1"),
            "",
            vec![e(Read, id("urn:ngsi-ld:B:1"), tany(), all())],
        ),
        (
            "DELETE",
            &format!("{p}/entities/urn:x"),
            "",
            vec![e(Delete, id("urn:x"), tany(), all())],
        ),
        (
            "PATCH",
            &format!("{p}/entities/urn:x"),
            r#"{"p":{"value":2}}"#,
            vec![e(Write, id("urn:x"), tany(), only(&["p"]))],
        ),
        (
            "PUT",
            &format!("{p}/entities/urn:x"),
            r#"{"id":"urn:x","type":"A","p":{"value":2}}"#,
            vec![e(Write, id("urn:x"), tany(), all())],
        ),
        (
            "POST",
            &format!("{p}/entities/urn:x/attrs?options=noOverwrite"),
            r#"{"q":{"value":2}}"#,
            vec![e(Write, id("urn:x"), tany(), only(&["q"]))],
        ),
        (
            "PATCH",
            &format!("{p}/entities/urn:x/attrs"),
            r#"{"p":{"value":3},"@context":[]}"#,
            vec![e(Write, id("urn:x"), tany(), only(&["p"]))],
        ),
        (
            "PATCH",
            &format!("{p}/entities/urn:x/attrs/p"),
            r#"{"value":4}"#,
            vec![e(Write, id("urn:x"), tany(), only(&["p"]))],
        ),
        (
            "DELETE",
            &format!("{p}/entities/urn:x/attrs/p"),
            "",
            vec![e(Delete, id("urn:x"), tany(), only(&["p"]))],
        ),
        (
            "GET",
            &format!("{p}/types"),
            "",
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "GET",
            &format!("{p}/types/Building"),
            "",
            vec![e(Read, eany(), ty("Building"), all())],
        ),
        (
            "GET",
            &format!("{p}/attributes"),
            "",
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "GET",
            &format!("{p}/attributes/name"),
            "",
            vec![e(Read, eany(), tany(), only(&["name"]))],
        ),
    ]);
}

#[test]
fn ld_entity_operations_and_temporal() {
    let p = "/ngsi-ld/v1";
    check_table(vec![
        (
            "POST",
            &format!("{p}/entityOperations/create"),
            r#"[{"id":"urn:a","type":"T","p":{}},{"id":"urn:b","type":"T"}]"#,
            vec![
                e(Create, id("urn:a"), ty("T"), only(&["p"])),
                e(Create, id("urn:b"), ty("T"), only(&[])),
            ],
        ),
        (
            "POST",
            &format!("{p}/entityOperations/upsert"),
            r#"[{"id":"urn:a","type":"T","p":{}}]"#,
            vec![
                e(Create, id("urn:a"), ty("T"), only(&["p"])),
                e(Write, id("urn:a"), ty("T"), only(&["p"])),
            ],
        ),
        (
            "POST",
            &format!("{p}/entityOperations/upsert?options=replace"),
            r#"[{"id":"urn:a","type":"T","p":{}}]"#,
            vec![
                e(Create, id("urn:a"), ty("T"), only(&["p"])),
                e(Write, id("urn:a"), ty("T"), all()),
            ],
        ),
        (
            "POST",
            &format!("{p}/entityOperations/update"),
            r#"[{"id":"urn:a","p":{}}]"#,
            vec![e(Write, id("urn:a"), tany(), only(&["p"]))],
        ),
        (
            "POST",
            &format!("{p}/entityOperations/delete"),
            r#"["urn:a","urn:b"]"#,
            vec![
                e(Delete, id("urn:a"), tany(), all()),
                e(Delete, id("urn:b"), tany(), all()),
            ],
        ),
        (
            "POST",
            &format!("{p}/entityOperations/query"),
            r#"{"type":"Query","entities":[{"type":"Building"},{"idPattern":"urn:b.*","type":"Store"}],"attrs":["name"]}"#,
            vec![
                e(Read, eany(), ty("Building"), only(&["name"])),
                e(Read, pat("urn:b.*"), ty("Store"), only(&["name"])),
            ],
        ),
        (
            "GET",
            &format!("{p}/temporal/entities?type=T&attrs=p"),
            "",
            vec![e(Read, eany(), ty("T"), only(&["p"]))],
        ),
        (
            "POST",
            &format!("{p}/temporal/entities"),
            r#"{"id":"urn:a","type":"T","p":[{"type":"Property","value":1,"observedAt":"2020-01-01T00:00:00Z"}]}"#,
            vec![
                e(Create, id("urn:a"), ty("T"), only(&["p"])),
                e(Write, id("urn:a"), ty("T"), only(&["p"])),
            ],
        ),
        (
            "GET",
            &format!("{p}/temporal/entities/urn:a"),
            "",
            vec![e(Read, id("urn:a"), tany(), all())],
        ),
        (
            "DELETE",
            &format!("{p}/temporal/entities/urn:a"),
            "",
            vec![e(Delete, id("urn:a"), tany(), all())],
        ),
        (
            "POST",
            &format!("{p}/temporal/entities/urn:a/attrs"),
            r#"{"p":[]}"#,
            vec![e(Write, id("urn:a"), tany(), only(&["p"]))],
        ),
        (
            "DELETE",
            &format!("{p}/temporal/entities/urn:a/attrs/p"),
            "",
            vec![e(Delete, id("urn:a"), tany(), only(&["p"]))],
        ),
        (
            "PATCH",
            &format!("{p}/temporal/entities/urn:a/attrs/p/inst1"),
            r#"{"value":1}"#,
            vec![e(Write, id("urn:a"), tany(), only(&["p"]))],
        ),
        (
            "POST",
            &format!("{p}/temporal/entityOperations/query"),
            r#"{"type":"Query","entities":[{"type":"T"}]}"#,
            vec![e(Read, eany(), ty("T"), all())],
        ),
    ]);
}

#[test]
fn ld_subscriptions_and_registrations() {
    let p = "/ngsi-ld/v1";
    check_table(vec![
        (
            "POST",
            &format!("{p}/subscriptions"),
            r#"{"id":"urn:sub:1","type":"Subscription","entities":[{"type":"Building"}],"watchedAttributes":["name"],"notification":{"attributes":["name"],"format":"keyValues","endpoint":{"uri":"http://my.endpoint.org/notify","accept":"application/json"}}}"#,
            vec![ep(
                Subscribe,
                eany(),
                ty("Building"),
                only(&["name"]),
                "http://my.endpoint.org/notify",
            )],
        ),
        (
            "POST",
            &format!("{p}/subscriptions/"),
            r#"{"type":"Subscription","watchedAttributes":["speed"],"notification":{"endpoint":{"uri":"mqtt://m:1883/t"}}}"#,
            vec![ep(Subscribe, eany(), tany(), all(), "mqtt://m:1883/t")],
        ),
        (
            "PATCH",
            &format!("{p}/subscriptions/urn:sub:1"),
            r#"{"notification":{"endpoint":{"uri":"http://other/"}}}"#,
            vec![
                e(Subscribe, eany(), tany(), all()),
                ep(Subscribe, eany(), tany(), all(), "http://other/"),
            ],
        ),
        (
            "GET",
            &format!("{p}/subscriptions"),
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "GET",
            &format!("{p}/subscriptions/urn:sub:1"),
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "DELETE",
            &format!("{p}/subscriptions/urn:sub:1"),
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "POST",
            &format!("{p}/csourceRegistrations"),
            r#"{"type":"ContextSourceRegistration","information":[{"entities":[{"id":"urn:a","type":"T"}],"propertyNames":["p"],"relationshipNames":["r"]}],"endpoint":"http://provider:9090"}"#,
            vec![ep(
                Register,
                id("urn:a"),
                ty("T"),
                only(&["p", "r"]),
                "http://provider:9090",
            )],
        ),
        (
            "GET",
            &format!("{p}/csourceRegistrations"),
            "",
            vec![e(Register, eany(), tany(), all())],
        ),
        (
            "PATCH",
            &format!("{p}/csourceRegistrations/urn:r"),
            r#"{"endpoint":"http://x"}"#,
            vec![ep(Register, eany(), tany(), all(), "http://x")],
        ),
        (
            "PATCH",
            &format!("{p}/csourceRegistrations/urn:r"),
            r#"{"expiresAt":"2040-01-01T00:00:00Z"}"#,
            vec![e(Register, eany(), tany(), all())],
        ),
        (
            "DELETE",
            &format!("{p}/csourceRegistrations/urn:r"),
            "",
            vec![e(Register, eany(), tany(), all())],
        ),
    ]);
}

#[test]
fn ld_malformed_and_unknown() {
    let p = "/ngsi-ld/v1";
    let cases: Vec<(&str, String, &str, u32)> = vec![
        ("POST", format!("{p}/entities"), r#"{"id":"urn:a"}"#, 400),
        ("POST", format!("{p}/entities"), r#"{"type":"T"}"#, 400),
        (
            "POST",
            format!("{p}/entities"),
            r#"{"id":"urn:a","type":[]}"#,
            400,
        ),
        (
            "POST",
            format!("{p}/entities"),
            r#"{"id":"urn:a","type":[1]}"#,
            400,
        ),
        (
            "POST",
            format!("{p}/entityOperations/create"),
            r#"{"id":"urn:a","type":"T"}"#,
            400,
        ),
        ("POST", format!("{p}/entityOperations/create"), "[]", 400),
        (
            "POST",
            format!("{p}/entityOperations/upsert"),
            r#"[{"id":"urn:a"}]"#,
            400,
        ),
        (
            "POST",
            format!("{p}/entityOperations/delete"),
            r#"[{"id":"urn:a"}]"#,
            400,
        ),
        ("POST", format!("{p}/entityOperations/purge"), "[]", 403),
        (
            "POST",
            format!("{p}/entityOperations/purge"),
            r#"["urn:a"]"#,
            403,
        ),
        (
            "POST",
            format!("{p}/subscriptions"),
            r#"{"entities":[{"type":"T"}]}"#,
            400,
        ),
        (
            "POST",
            format!("{p}/subscriptions"),
            r#"{"notification":{"endpoint":{"uri":"http://x"}}}"#,
            400,
        ),
        (
            "POST",
            format!("{p}/subscriptions"),
            r#"{"entities":[{"type":"T"}],"notification":{}}"#,
            400,
        ),
        (
            "POST",
            format!("{p}/csourceRegistrations"),
            r#"{"information":[{"entities":[{"type":"T"}]}]}"#,
            400,
        ),
        (
            "POST",
            format!("{p}/csourceRegistrations"),
            r#"{"information":[],"endpoint":"http://x"}"#,
            400,
        ),
        (
            "GET",
            format!("{p}/entities?id=urn:a&idPattern=.*"),
            "",
            400,
        ),
        ("PUT", format!("{p}/entities"), "", 403),
        ("GET", format!("{p}/jsonldContexts"), "", 403),
        ("GET", "/ngsi-ld/v2/entities".to_string(), "", 403),
        ("GET", "/NGSI-LD/v1/entities".to_string(), "", 403),
    ];
    for (m, path, body, want) in cases {
        assert_eq!(status(m, &path, &[], body), want, "{m} {path} {body}");
    }
}

// ---------------------------------------------------------------- FogFlow

/// The two requests of the FogFlow security chapter (`shared/seeds/fogflow-security.txt`),
/// verbatim. The seed's text lost the JSON braces, so verbatim they are not JSON: 400.
const SEED_UPDATE_VERBATIM: &str = r#"
   "contextElements": [
      "entityId": {
         "id": "Temperature100",
         "type": "Temperature",
         "isPattern": false
      "attributes": [
         "name": "temp",
         "type": "float",
         "value": 34
      "domainMetadata": [
         "name": "location",
         "type": "point",
         "value": {
           "latitude": 49.406393,
           "longitude": 8.684208
    "updateAction": "UPDATE"
"#;

const SEED_REGISTER_VERBATIM: &str = r#"
     "contextRegistrations": [
             "entities": [
                     "type": "Lamp",
                     "isPattern": "false",
                     "id": "Lamp.0020"
             "attributes": [
                     "name": "on",
                     "type": "command"
                     "name": "off",
                     "type": "command"
             "providingApplication": ""
   "duration": "P1Y"
"#;

/// The same requests with the braces restored (as in FogFlow's own docs and
/// `application/orion/update.sh`).
const SEED_UPDATE: &str = r#"{
   "contextElements": [{
      "entityId": {"id": "Temperature100", "type": "Temperature", "isPattern": false},
      "attributes": [{"name": "temp", "type": "float", "value": 34}],
      "domainMetadata": [{"name": "location", "type": "point",
                          "value": {"latitude": 49.406393, "longitude": 8.684208}}]
   }],
   "updateAction": "UPDATE"
}"#;

const SEED_REGISTER: &str = r#"{
     "contextRegistrations": [{
             "entities": [{"type": "Lamp", "isPattern": "false", "id": "Lamp.0020"}],
             "attributes": [{"name": "on", "type": "command"}, {"name": "off", "type": "command"}],
             "providingApplication": ""
     }],
   "duration": "P1Y"
}"#;

#[test]
fn fogflow_seed_requests() {
    let h = [("x-auth-token", "t"), ("content-type", "application/json")];
    assert_eq!(
        status("POST", "/ngsi10/updateContext", &h, SEED_UPDATE_VERBATIM),
        400
    );
    assert_eq!(
        status("POST", "/NGSI9/registerContext", &h, SEED_REGISTER_VERBATIM),
        400
    );

    let r = run("POST", "/ngsi10/updateContext", &h, SEED_UPDATE).unwrap();
    assert_eq!(r.operation, "fogflow POST /ngsi10/updateContext");
    assert_eq!(
        shape(&r),
        vec![
            e(Create, id("Temperature100"), tany(), only(&["temp"])),
            e(Write, id("Temperature100"), tany(), only(&["temp"])),
        ]
    );
    // FogFlow has no tenants: the one space, whatever headers say.
    assert_eq!(
        r.accesses[0].tenant,
        Tenant {
            service: String::new(),
            service_paths: vec!["/#".into()]
        }
    );

    let h = [
        ("content-type", "application/json"),
        ("fiware-service", "openiot"),
        ("x-auth-token", "t"),
        ("fiware-servicepath", "/"),
    ];
    // FogFlow's broker no longer routes the upper-case /NGSI9 (its IoT Discovery serves
    // /ngsi9): refused as not served, whatever the body.
    let refused = run("POST", "/NGSI9/registerContext", &h, SEED_REGISTER).unwrap_err();
    assert!(refused.to_string().contains(NOT_SERVED), "{refused}");
    let r = run("POST", "/ngsi9/registerContext", &h, SEED_REGISTER).unwrap();
    assert_eq!(
        shape(&r),
        vec![e(Register, id("Lamp.0020"), tany(), only(&["on", "off"]))]
    );
    assert_eq!(
        r.accesses[0].tenant,
        Tenant {
            service: String::new(),
            service_paths: vec!["/#".into()]
        }
    );
}

#[test]
fn fogflow_endpoints() {
    check_table(vec![
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.1","type":"Temperature","isPattern":false},"attributes":[{"name":"temperature","type":"float","value":73},{"name":"pressure","type":"float","value":44}]}],"updateAction":"APPEND"}"#,
            vec![
                // FogFlow keys entities by id alone: the type in the body reaches nothing.
                e(
                    Create,
                    id("D.1"),
                    tany(),
                    only(&["temperature", "pressure"]),
                ),
                e(Write, id("D.1"), tany(), only(&["temperature", "pressure"])),
            ],
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.1"}},{"entityId":{"id":"D.2","type":"T"},"attributes":[{"name":"a"}]}],"updateAction":"DELETE"}"#,
            vec![
                // FogFlow's DELETE removes the whole entity, whatever attributes are listed.
                e(Delete, id("D.1"), tany(), all()),
                e(Delete, id("D.2"), tany(), all()),
            ],
        ),
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.1","type":"T"},"attributes":[{"name":"a"}]}],"updateAction":"UPDATE"}"#,
            vec![
                e(Create, id("D.1"), ty("T"), only(&["a"])),
                e(Write, id("D.1"), ty("T"), only(&["a"])),
            ],
        ),
        // Orion's NGSIv1 form (id/type/isPattern in the element), as ngsijs' v1 API sends it.
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"id":"Room1","isPattern":"false","type":"Room","attributes":[{"name":"temperature","type":"float","value":"23"}]}],"updateAction":"UPDATE"}"#,
            vec![
                e(Create, id("Room1"), ty("Room"), only(&["temperature"])),
                e(Write, id("Room1"), ty("Room"), only(&["temperature"])),
            ],
        ),
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"id":"Room1","attributes":[{"name":"humidity"}]},{"id":"Room2","type":"Room"}],"updateAction":"DELETE"}"#,
            vec![
                e(Delete, id("Room1"), tany(), only(&["humidity"])),
                e(Delete, id("Room2"), ty("Room"), all()),
            ],
        ),
        (
            "POST",
            "/ngsi10/queryContext",
            r#"{"entities":[{"type":"Temperature","isPattern":true}]}"#,
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "POST",
            "/ngsi10/queryContext",
            r#"{"entities":[{"id":"Device.*","isPattern":true},{"id":"D.1","type":"T","isPattern":false}],"attributes":["temperature"]}"#,
            vec![
                // Reads on FogFlow reach every attribute.
                e(Read, pat("Device.*"), tany(), all()),
                e(Read, id("D.1"), tany(), all()),
            ],
        ),
        (
            "POST",
            "/ngsi10/subscribeContext",
            r#"{"entities":[{"type":"AirQualityObserved","isPattern":true}],"reference":"http://host.docker.internal:9090"}"#,
            vec![ep(
                Subscribe,
                eany(),
                tany(),
                all(),
                "http://host.docker.internal:9090",
            )],
        ),
        (
            "POST",
            "/ngsi10/unsubscribeContext",
            r#"{"subscriptionId":"s1"}"#,
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "POST",
            "/ngsi10/notifyContext",
            r#"{"subscriptionId":"s1","contextResponses":[{"contextElement":{"entityId":{"id":"D.1","type":"T"},"attributes":[{"name":"a","value":1}]},"statusCode":{"code":200}}]}"#,
            vec![
                e(Create, id("D.1"), tany(), only(&["a"])),
                e(Write, id("D.1"), tany(), only(&["a"])),
            ],
        ),
        (
            "GET",
            "/ngsi10/entity",
            "",
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "GET",
            "/ngsi10/entity/D.1",
            "",
            vec![e(Read, id("D.1"), tany(), all())],
        ),
        (
            "GET",
            "/ngsi10/entity/D.1/temperature",
            "",
            vec![e(Read, id("D.1"), tany(), all())],
        ),
        (
            "DELETE",
            "/ngsi10/entity/D.1",
            "",
            vec![e(Delete, id("D.1"), tany(), all())],
        ),
        (
            "GET",
            "/ngsi10/subscription",
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "DELETE",
            "/ngsi10/subscription/s1",
            "",
            vec![e(Subscribe, eany(), tany(), all())],
        ),
        (
            "POST",
            "/ngsi9/registerContext",
            r#"{"contextRegistrations":[{"entities":[{"id":"S.1","type":"Sensor"}],"attributes":[{"name":"t","type":"float"}],"providingApplication":"http://edge:8070/ngsi10"}]}"#,
            vec![ep(
                Register,
                id("S.1"),
                tany(),
                only(&["t"]),
                "http://edge:8070/ngsi10",
            )],
        ),
        (
            "GET",
            "/ngsi9/registration/r1",
            "",
            vec![e(Register, eany(), tany(), all())],
        ),
        (
            "DELETE",
            "/ngsi9/registration/r1",
            "",
            vec![e(Register, eany(), tany(), all())],
        ),
        (
            "POST",
            "/ngsi9/discoverContextAvailability",
            r#"{"entities":[{"type":"Sensor","isPattern":true}],"attributes":["t"]}"#,
            vec![e(Read, eany(), tany(), all())],
        ),
        (
            "POST",
            "/ngsi9/subscribeContextAvailability",
            r#"{"entities":[{"type":"Sensor","isPattern":true}],"reference":"http://master:1060"}"#,
            vec![ep(Subscribe, eany(), tany(), all(), "http://master:1060")],
        ),
    ]);
}

#[test]
fn fogflow_malformed_and_unrouted() {
    check_refused(&[
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.*","isPattern":true}}],"updateAction":"UPDATE"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.1"}}],"updateAction":"update"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.1"}}],"updateAction":"REPLACE"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"attributes":[]}],"updateAction":"UPDATE"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"type":"T"}}],"updateAction":"UPDATE"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"D.1","isPattern":"maybe"}}],"updateAction":"UPDATE"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"updateAction":"UPDATE"}"#,
            400,
        ),
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[],"updateAction":"UPDATE"}"#,
            400,
        ),
        ("POST", "/ngsi10/queryContext", r#"{"entities":[]}"#, 400),
        ("POST", "/ngsi10/queryContext", "", 400),
        (
            "POST",
            "/ngsi10/subscribeContext",
            r#"{"entities":[{"type":"T","isPattern":true}]}"#,
            400,
        ),
        ("POST", "/ngsi10/unsubscribeContext", "{}", 400),
        (
            "POST",
            "/NGSI9/registerContext",
            r#"{"contextRegistrations":[]}"#,
            400,
        ),
        // Not routed by FogFlow (case matters; discovery is lower-case only).
        (
            "POST",
            "/NGSI9/discoverContextAvailability",
            r#"{"entities":[{"type":"T","isPattern":true}]}"#,
            400,
        ),
        ("POST", "/NGSI10/updateContext", SEED_UPDATE, 403),
        // Orion's NGSIv1 element form: only on /v1/updateContext, never mixed with entityId,
        // never a pattern.
        (
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"id":"Room1","type":"Room"}],"updateAction":"APPEND"}"#,
            400,
        ),
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"id":"Room1","entityId":{"id":"Room2"}}],"updateAction":"APPEND"}"#,
            400,
        ),
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"type":"Room","entityId":{"id":"Room2"}}],"updateAction":"APPEND"}"#,
            400,
        ),
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"id":"Room.*","isPattern":"true"}],"updateAction":"UPDATE"}"#,
            400,
        ),
        (
            "POST",
            "/v1/updateContext",
            r#"{"contextElements":[{"attributes":[{"name":"a"}]}],"updateAction":"UPDATE"}"#,
            400,
        ),
        // Not routes of FogFlow's router (case, method): not served.
        ("POST", "/ngsi10/UpdateContext", SEED_UPDATE, 400),
        ("GET", "/ngsi10/updateContext", "", 400),
        ("POST", "/ngsi10/entity", "{}", 400),
    ]);
}

// ---------------------------------------------------------------- canonical form

#[test]
fn canonicalisation() {
    check_refused(&[
        // Encoded separators and dot segments, raw or encoded.
        ("GET", "/v2/entities/Room1%2Fattrs", "", 400),
        ("GET", "/v2/entities/Room1%2fattrs", "", 400),
        ("GET", "/v2/entities/%2e%2e/types", "", 400),
        ("GET", "/v2/entities/../types", "", 400),
        ("GET", "/v2/./entities", "", 400),
        ("GET", "/v2/%2E/entities", "", 400),
        ("GET", "/v2/entities/a%5Cb", "", 400),
        ("GET", "/v2\\entities", "", 400),
        // Duplicate slashes are refused, not merged.
        ("GET", "//v2/entities", "", 400),
        ("GET", "/v2//entities", "", 400),
        ("GET", "/v2/entities//", "", 400),
        // Malformed escapes, fragments, relative paths, control characters.
        ("GET", "/v2/entities/a%zz", "", 400),
        ("GET", "/v2/entities/a%4", "", 400),
        ("GET", "/v2/entities/a%ff", "", 400),
        ("GET", "/v2/entities#x", "", 400),
        ("GET", "v2/entities", "", 400),
        ("GET", "", "", 400),
        ("GET", "/v2/entities/a%00b", "", 400),
        ("GET", "/v2/entities?id=a%0Ab", "", 400),
        // Case: Orion's paths are case-sensitive.
        ("GET", "/V2/entities", "", 403),
        ("GET", "/v2/Entities", "", 403),
        ("GET", "/v2/entities/R1/Attrs", "", 403),
        ("GET", "/VERSION", "", 403),
        // Unclassified endpoints and methods.
        ("GET", "/", "", 403),
        ("GET", "/statistics", "", 403),
        ("PUT", "/admin/log?level=DEBUG", "", 403),
        ("GET", "/v1/contextEntities/R1", "", 403),
        ("GET", "/v2", "", 403),
        ("PATCH", "/v2/entities", "{}", 403),
        ("DELETE", "/v2/entities", "", 403),
        ("POST", "/v2/entities/R1", "{}", 403),
        ("PATCH", "/v2/entities/R1/attrs/t", "{}", 403),
        ("GET", "/v2/entities/R1/attrs/t/value/x", "", 403),
        ("POST", "/v2/op/delete", "{}", 403),
        ("PUT", "/v2/subscriptions/s1", "{}", 403),
        ("HEAD", "/v2/entities", "", 403),
        ("OPTIONS", "/v2/entities", "", 403),
        ("get", "/v2/entities", "", 403),
    ]);
    // A single trailing slash is dropped.
    let r = run("GET", "/v2/entities/", &[], "").unwrap();
    assert_eq!(r.operation, "ngsi-v2 GET /v2/entities");
    // Decoded exactly once: %252F is the literal id "a%2Fb", not a separator.
    let r = run("GET", "/v2/entities/a%252Fb/attrs", &[], "").unwrap();
    assert_eq!(shape(&r), vec![e(Read, id("a%2Fb"), tany(), all())]);
    // Encoded ordinary characters are the same endpoint.
    let r = run("GET", "/v2/%65ntities?%69d=R%31", &[], "").unwrap();
    assert_eq!(shape(&r), vec![e(Read, id("R1"), tany(), all())]);
    // A raw `+` in a query is a space, as every broker's HTTP layer decodes it (libmicrohttpd's
    // MHD_unescape_plus in Orion): `id=Room+1` is the entity `Room 1`, names included.
    let r = run("GET", "/v2/entities?id=Room+1", &[], "").unwrap();
    assert_eq!(shape(&r), vec![e(Read, id("Room 1"), tany(), all())]);
    let r = run("GET", "/v2/entities?i%64=Room%2B1&type+=X", &[], "").unwrap();
    assert_eq!(shape(&r), vec![e(Read, id("Room+1"), tany(), all())]);
    let r = run("GET", "/v2/entities?idPattern=R%2B", &[], "").unwrap();
    assert_eq!(shape(&r), vec![e(Read, pat("R+"), tany(), all())]);
    let err = run("GET", "/V2/entities", &[], "").unwrap_err();
    assert!(err.description().starts_with(UNCLASSIFIED), "{err}");
}

// ---------------------------------------------------------------- tenants

fn tenant_of(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Tenant, u32> {
    match run(method, path, headers, body) {
        Ok(r) => Ok(r.accesses[0].tenant.clone()),
        Err(e) => Err(e.status()),
    }
}

fn t(service: &str, paths: &[&str]) -> Result<Tenant, u32> {
    Ok(Tenant {
        service: service.into(),
        service_paths: paths.iter().map(|s| s.to_string()).collect(),
    })
}

/// Method, path, body.
type Req<'a> = (&'a str, &'a str, &'a str);
/// Request, headers, expected tenant or status.
type TenantCase<'a> = (Req<'a>, Vec<(&'a str, &'a str)>, Result<Tenant, u32>);

#[test]
fn tenant_headers() {
    let read = ("GET", "/v2/entities", "");
    let write = ("POST", "/v2/entities", r#"{"id":"A","type":"T"}"#);
    let sub = (
        "POST",
        "/v2/subscriptions",
        r#"{"subject":{"entities":[{"id":"A"}]},"notification":{"http":{"url":"http://x"}}}"#,
    );
    let reg = (
        "POST",
        "/v2/registrations",
        r#"{"dataProvided":{"entities":[{"id":"A"}]},"provider":{"http":{"url":"http://p"}}}"#,
    );
    let long = "a".repeat(51);
    let cases: Vec<TenantCase> = vec![
        // Defaults: a read covers the whole tree, a write the root.
        (read, vec![], t("", &["/#"])),
        (write, vec![], t("", &["/"])),
        (sub, vec![], t("", &["/#"])),
        (reg, vec![], t("", &["/"])),
        (read, vec![("fiware-servicepath", "")], t("", &["/#"])),
        // Service lowercased; characters Orion refuses are refused.
        (
            read,
            vec![("fiware-service", "SmartCity_1")],
            t("smartcity_1", &["/#"]),
        ),
        (read, vec![("fiware-service", "smart-city")], Err(400)),
        (read, vec![("fiware-service", "a b")], Err(400)),
        (
            read,
            vec![("fiware-service", "ciudad")],
            t("ciudad", &["/#"]),
        ),
        (read, vec![("fiware-service", &long)], Err(400)),
        (
            read,
            vec![("fiware-service", "a"), ("fiware-service", "a")],
            Err(400),
        ),
        (
            read,
            vec![("Fiware-Service", "a"), ("fiware-service", "b")],
            Err(400),
        ),
        // Service paths.
        (
            read,
            vec![("fiware-servicepath", "/Madrid/Gardens")],
            t("", &["/Madrid/Gardens"]),
        ),
        (
            read,
            vec![("fiware-servicepath", "/Madrid/#")],
            t("", &["/Madrid/#"]),
        ),
        (
            read,
            vec![("fiware-servicepath", "/Madrid/Gardens, /Madrid/Parks")],
            t("", &["/Madrid/Gardens", "/Madrid/Parks"]),
        ),
        (read, vec![("fiware-servicepath", "/#")], t("", &["/#"])),
        (read, vec![("fiware-servicepath", "/")], t("", &["/"])),
        (read, vec![("fiware-servicepath", "Madrid")], Err(400)),
        (
            read,
            vec![("fiware-servicepath", "/Madrid/")],
            t("", &["/Madrid"]),
        ),
        (
            read,
            vec![("fiware-servicepath", " /Madrid// , /Parks/# ")],
            t("", &["/Madrid", "/Parks/#"]),
        ),
        (write, vec![("fiware-servicepath", "/Madrid/#/")], Err(400)),
        (
            read,
            vec![("fiware-servicepath", "/Madrid//Parks")],
            Err(400),
        ),
        (
            read,
            vec![("fiware-servicepath", "/Madrid/#/Parks")],
            Err(400),
        ),
        (read, vec![("fiware-servicepath", "/Ma-drid")], Err(400)),
        (
            read,
            vec![("fiware-servicepath", "/a/b/c/d/e/f/g/h/i/j")],
            t("", &["/a/b/c/d/e/f/g/h/i/j"]),
        ),
        (
            read,
            vec![("fiware-servicepath", "/a/b/c/d/e/f/g/h/i/j/k")],
            Err(400),
        ),
        (
            read,
            vec![("fiware-servicepath", "/a/b/c/d/e/f/g/h/i/j/#")],
            t("", &["/a/b/c/d/e/f/g/h/i/j/#"]),
        ),
        (
            read,
            vec![("fiware-servicepath", "/1,/2,/3,/4,/5,/6,/7,/8,/9,/10,/11")],
            Err(400),
        ),
        (read, vec![("fiware-servicepath", "/a,")], Err(400)),
        (
            read,
            vec![("fiware-servicepath", "/a"), ("fiware-servicepath", "/b")],
            Err(400),
        ),
        (
            write,
            vec![("fiware-servicepath", "/Madrid/Gardens")],
            t("", &["/Madrid/Gardens"]),
        ),
        (write, vec![("fiware-servicepath", "/Madrid/#")], Err(400)),
        (write, vec![("fiware-servicepath", "/#")], Err(400)),
        (write, vec![("fiware-servicepath", "/a,/b")], Err(400)),
        (
            sub,
            vec![("fiware-servicepath", "/Madrid/#")],
            t("", &["/Madrid/#"]),
        ),
        (sub, vec![("fiware-servicepath", "/a,/b")], Err(400)),
        (reg, vec![("fiware-servicepath", "/#")], Err(400)),
    ];
    for ((m, p, b), h, want) in cases {
        assert_eq!(tenant_of(m, p, &h, b), want, "{m} {p} {h:?}");
    }
}

#[test]
fn ngsi_ld_tenant() {
    let p = "/ngsi-ld/v1/entities?type=T";
    assert_eq!(
        tenant_of("GET", p, &[("ngsild-tenant", "Tenant1")], ""),
        Err(400),
        "NGSI-LD brokers may treat tenant case differently from the rules"
    );
    assert_eq!(
        tenant_of("GET", p, &[("ngsild-tenant", "tenant1")], ""),
        t("tenant1", &["/#"])
    );
    assert_eq!(
        tenant_of("GET", p, &[("fiware-service", "t1")], ""),
        t("t1", &["/#"])
    );
    assert_eq!(
        tenant_of(
            "GET",
            p,
            &[("ngsild-tenant", "t1"), ("fiware-service", "T1")],
            ""
        ),
        Err(400)
    );
    assert_eq!(
        tenant_of(
            "GET",
            p,
            &[("ngsild-tenant", "t1"), ("fiware-service", "t2")],
            ""
        ),
        Err(400)
    );
    assert_eq!(
        tenant_of(
            "GET",
            p,
            &[("ngsild-tenant", "t1"), ("ngsild-tenant", "t1")],
            ""
        ),
        Err(400)
    );
    assert_eq!(
        tenant_of("GET", p, &[("ngsild-tenant", "urn:t")], ""),
        Err(400)
    );
    // v2 ignores the NGSI-LD header.
    assert_eq!(
        tenant_of("GET", "/v2/entities", &[("ngsild-tenant", "t1")], ""),
        t("", &["/#"])
    );
}

#[test]
fn every_access_carries_the_tenant() {
    let h = [("fiware-service", "city"), ("fiware-servicepath", "/parks")];
    let r = run(
        "POST",
        "/v2/op/update",
        &h,
        r#"{"actionType":"append","entities":[{"id":"A"},{"id":"B"}]}"#,
    )
    .unwrap();
    assert_eq!(r.accesses.len(), 4);
    assert!(r.accesses.iter().all(|a| a.tenant
        == Tenant {
            service: "city".into(),
            service_paths: vec!["/parks".into()]
        }));
}

// ---------------------------------------------------------------- client fixtures

/// Shapes of what common clients send (from the ngsijs and FIWARE tutorial docs): batch
/// upserts with keyValues, list queries with `options=count` and paging.
#[test]
fn client_fixtures() {
    let h = [
        ("fiware-service", "openiot"),
        ("fiware-servicepath", "/"),
        ("content-type", "application/json"),
    ];
    let r = run(
        "GET",
        "/v2/entities?type=Store&options=count,keyValues&limit=20&offset=0&attrs=name",
        &h,
        "",
    )
    .unwrap();
    assert_eq!(
        shape(&r),
        vec![e(Read, eany(), ty("Store"), only(&["name"]))]
    );
    let r = run("POST", "/v2/op/update?options=keyValues", &h, r#"{"actionType":"append","entities":[{"id":"urn:ngsi-ld:Product:001","type":"Product","name":"Beer","price":99}]}"#).unwrap();
    assert_eq!(
        shape(&r),
        vec![
            e(
                Create,
                id("urn:ngsi-ld:Product:001"),
                ty("Product"),
                only(&["name", "price"])
            ),
            e(
                Write,
                id("urn:ngsi-ld:Product:001"),
                ty("Product"),
                only(&["name", "price"])
            ),
        ]
    );
}

// ---------------------------------------------------------------- properties

mod properties {
    use super::super::canonical::canonical_path;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the path, a canonical form never carries a separator, a dot segment or an
        /// empty segment: what the ACL sees is one unambiguous resource.
        #[test]
        fn canonical_segments_are_clean(path in "(/|%2[eEfF]|%5[cC]|\\.|[a-zA-Z0-9]|%25|/v2|/entities|\\?|&|=|#){0,24}") {
            if let Ok(c) = canonical_path(&path) {
                for s in &c.segments {
                    prop_assert!(!s.is_empty() && s != "." && s != "..");
                    prop_assert!(!s.contains('/') && !s.contains('\\'));
                }
            }
        }

        /// classify never panics, and anything it accepts names a known dialect.
        #[test]
        fn classify_total(method in "(GET|POST|PATCH|PUT|DELETE)", path in "/(v2|ngsi-ld/v1|ngsi10|NGSI9)(/[a-zA-Z%0-9.:]{0,8}){0,4}(\\?[a-z=,&]{0,12})?", body in "\\PC{0,64}") {
            if let Ok(r) = run(&method, &path, &[], &body) {
                prop_assert!(r.operation.starts_with("ngsi-v2 ") || r.operation.starts_with("ngsi-ld ") || r.operation.starts_with("fogflow "));
            }
        }
    }
}

// ---------------------------------------------------------------- the broker setting

/// Each broker serves its own API only: another's is refused (400, not served), whatever the
/// rules would say; paths outside every NGSI API stay unclassified (403).
#[test]
fn each_broker_serves_its_own_routes() {
    use Broker::*;
    let update = r#"{"contextElements":[{"entityId":{"id":"D.1"},"attributes":[{"name":"a"}]}],"updateAction":"UPDATE"}"#;
    let served = [
        (Orion, "GET", "/version", ""),
        (Orion, "GET", "/v2/entities", ""),
        (
            Orion,
            "PATCH",
            "/v2/entities/R1/attrs",
            r#"{"a":{"value":1}}"#,
        ),
        (Orion, "POST", "/v1/updateContext", update),
        (NgsiLd, "GET", "/version", ""),
        (NgsiLd, "GET", "/ngsi-ld/v1/entities?type=Room", ""),
        (FogFlow, "GET", "/version", ""),
        (FogFlow, "POST", "/ngsi10/updateContext", update),
        (FogFlow, "GET", "/ngsi10/entity/D.1", ""),
        (FogFlow, "GET", "/v2/entities/D.1", ""),
        (FogFlow, "GET", "/ngsi-ld/v1/entities/", ""),
        (FogFlow, "DELETE", "/ngsi-ld/v1/subscriptions/s1", ""),
        (
            FogFlow,
            "POST",
            "/ngsi9/discoverContextAvailability",
            r#"{"entities":[{"id":"D.1"}]}"#,
        ),
    ];
    for (broker, method, path, body) in served {
        let r = run_on(broker, method, path, &[], body);
        assert!(r.is_ok(), "{broker:?} {method} {path}: {r:?}");
    }
    let not_served = [
        (Orion, "POST", "/ngsi10/updateContext", update),
        (Orion, "GET", "/ngsi-ld/v1/entities?type=Room", ""),
        (Orion, "POST", "/ngsi9/registerContext", "{}"),
        (NgsiLd, "GET", "/v2/entities", ""),
        (NgsiLd, "POST", "/v1/updateContext", update),
        (NgsiLd, "POST", "/ngsi10/queryContext", "{}"),
        // FogFlow's broker routes only some of NGSI v2 and NGSI-LD.
        (
            FogFlow,
            "PATCH",
            "/v2/entities/D.1/attrs",
            r#"{"a":{"value":1}}"#,
        ),
        (FogFlow, "GET", "/v2/entities/D.1/attrs/a", ""),
        (FogFlow, "POST", "/v2/op/update", "{}"),
        (FogFlow, "POST", "/v2/subscriptions", "{}"),
        (FogFlow, "PATCH", "/ngsi-ld/v1/entities/D.1/attrs", "{}"),
        (FogFlow, "PATCH", "/ngsi-ld/v1/subscriptions/s1", "{}"),
        (FogFlow, "POST", "/ngsi-ld/v1/entityOperations/delete", "[]"),
        (FogFlow, "POST", "/v1/updateContext", update),
        // Gone from FogFlow's broker (commit ac5aa4c0); never Orion's or an LD broker's.
        (FogFlow, "POST", "/NGSI9/registerContext", "{}"),
        (Orion, "GET", "/NGSI9/registration/r1", ""),
    ];
    for (broker, method, path, body) in not_served {
        match run_on(broker, method, path, &[], body) {
            Err(e) => {
                assert_eq!(e.status(), 400, "{broker:?} {method} {path}: {e}");
                assert!(e.description().starts_with(NOT_SERVED), "{e}");
                assert!(e.description().contains(broker.name()), "{e}");
            }
            Ok(r) => panic!("{broker:?} {method} {path}: classified {r:?}"),
        }
    }
    // Outside every NGSI API: unclassified, as before (Orion's admin routes among them).
    for broker in [Orion, NgsiLd, FogFlow] {
        let e = run_on(broker, "GET", "/statistics", &[], "").unwrap_err();
        assert!(e.description().starts_with(UNCLASSIFIED), "{e}");
    }
}

/// FogFlow keys entities by id alone, returns every attribute, deletes whole entities and has
/// no tenants: the accesses say so. On main the same requests were typed, attribute-limited
/// and tenant-scoped, so a rule limited to a type or some attributes was bypassed.
#[test]
fn fogflow_accesses_are_what_fogflow_does() {
    let h = [
        ("fiware-service", "openiot"),
        ("fiware-servicepath", "/rooms"),
    ];
    let shape_on = |method: &str, path: &str, body: &str| {
        shape(&run_on(Broker::FogFlow, method, path, &h, body).unwrap())
    };
    // `?type=` and `?attrs=` are ignored by FogFlow's GET by id.
    assert_eq!(
        shape_on(
            "GET",
            "/ngsi-ld/v1/entities/urn:a?type=Public&attrs=name",
            ""
        ),
        vec![e(Read, id("urn:a"), tany(), all())]
    );
    assert_eq!(
        shape_on("GET", "/v2/entities/urn:a?type=Public&attrs=name", ""),
        vec![e(Read, id("urn:a"), tany(), all())]
    );
    // The type in an update body is ignored: the update reaches the entity of any type.
    assert_eq!(
        shape_on(
            "POST",
            "/ngsi10/updateContext",
            r#"{"contextElements":[{"entityId":{"id":"urn:a","type":"Public"},"attributes":[{"name":"name"}]}],"updateAction":"UPDATE"}"#
        ),
        vec![
            e(Create, id("urn:a"), tany(), only(&["name"])),
            e(Write, id("urn:a"), tany(), only(&["name"])),
        ]
    );
    // A create overwrites an existing id: it is a write too.
    assert_eq!(
        shape_on(
            "POST",
            "/ngsi-ld/v1/entities",
            r#"{"id":"urn:a","type":"Public","name":{"type":"Property","value":1}}"#
        ),
        vec![
            e(Create, id("urn:a"), tany(), only(&["name"])),
            e(Write, id("urn:a"), tany(), only(&["name"])),
        ]
    );
    // One space, whatever the tenant headers say.
    let r = run_on(Broker::FogFlow, "GET", "/ngsi10/entity/urn:a", &h, "").unwrap();
    assert_eq!(r.accesses[0].tenant, fogflow::tenant());
    // The same request for Orion keeps its type, attributes and tenant.
    let r = run_on(
        Broker::Orion,
        "GET",
        "/v2/entities/urn:a?type=Public&attrs=name",
        &h,
        "",
    )
    .unwrap();
    assert_eq!(
        shape(&r),
        vec![e(Read, id("urn:a"), ty("Public"), only(&["name"]))]
    );
    assert_eq!(r.accesses[0].tenant.service, "openiot");
}

/// U+2028/U+2029 end a line for Java and JavaScript regex engines (`^id$` would match
/// `id\u{2028}`): no name may hold them.
#[test]
fn line_separators_are_refused_in_names() {
    for (method, path, body) in [
        ("GET", "/v2/entities/R1%E2%80%A8", ""),
        ("GET", "/v2/entities?id=R1%E2%80%A9", ""),
        (
            "POST",
            "/v2/entities",
            "{\"id\":\"R1\\u2028\",\"type\":\"Room\"}",
        ),
    ] {
        assert_eq!(
            status(method, path, &[], body),
            400,
            "{method} {path} {body}"
        );
    }
}
