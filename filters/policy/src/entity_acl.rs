//! The entity-acl filter's configuration and its one decision per request: classify the
//! request with the NGSI model, then decide it with the ACL engine. The filter crate only
//! gathers the request and applies the decision.

use serde::Deserialize;

use crate::acl::{Acl, AclConfig};
use crate::decision::{Decision, DenyReason};
use crate::enforcement::{summarize_accesses, Mode};
use crate::identity::Identity;
use crate::identity_headers::IdentityHeaderNames;
use crate::ngsi::{classify, NgsiRequest};

/// Default request body limit: Orion's own default maximum request size is 1 MB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// A larger limit is refused: every buffered byte is held in the filter's memory.
pub const MAX_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 10_000;

/// The plugin configuration, e.g.
/// `{"mode": "enforce", "max_body_bytes": 1048576, "acl": {"rules": [...]}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityAclConfig {
    #[serde(default)]
    pub mode: Mode,
    /// Allowed requests are logged at `debug` (default), `info`, or not at all (`off`).
    /// Denials are always logged, at warning.
    #[serde(default)]
    pub log_allows: crate::decision_line::LogAllows,
    /// Bodies above this are refused with 413 (before buffering them, when Content-Length says
    /// so).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// A request whose body has not fully arrived this long after its headers is refused with
    /// 503 (a stalled client, or Envoy not configured with allow_on_headers_stop_iteration).
    #[serde(default = "default_body_timeout")]
    pub body_timeout_ms: u64,
    /// The identity headers token-auth sets (the same names as in its configuration).
    #[serde(default)]
    pub identity_headers: IdentityHeaderNames,
    /// Endpoints that touch no entity data (only `/version` today) which this filter lets
    /// through; unlisted, they are refused (403). Default none: nothing passes without a rule.
    #[serde(default)]
    pub open_endpoints: Vec<String>,
    pub acl: AclConfig,
}

/// The endpoints that classify to no entity access, the only ones `open_endpoints` may name.
pub const NON_ENTITY_ENDPOINTS: [&str; 1] = ["/version"];

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_body_timeout() -> u64 {
    DEFAULT_BODY_TIMEOUT_MS
}

/// A validated configuration, ready to decide.
#[derive(Debug, Clone)]
pub struct EntityAcl {
    pub mode: Mode,
    pub log_allows: crate::decision_line::LogAllows,
    pub max_body_bytes: usize,
    pub body_timeout_ms: u64,
    pub identity_headers: IdentityHeaderNames,
    open_endpoints: Vec<String>,
    acl: Acl,
}

/// One request's decision and what the decision line needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub operation: String,
    pub entities: String,
    pub decision: Decision,
}

impl EntityAcl {
    /// Parses and validates the plugin configuration; the error says what is wrong.
    pub fn from_json(json: &[u8]) -> Result<EntityAcl, String> {
        let config: EntityAclConfig =
            crate::config_error::parse(json).map_err(|e| e.to_string())?;
        EntityAcl::new(config)
    }

    pub fn new(config: EntityAclConfig) -> Result<EntityAcl, String> {
        if config.max_body_bytes == 0 || config.max_body_bytes > MAX_MAX_BODY_BYTES {
            return Err(format!(
                "max_body_bytes must be between 1 and {MAX_MAX_BODY_BYTES}, not {}",
                config.max_body_bytes
            ));
        }
        if !(100..=300_000).contains(&config.body_timeout_ms) {
            return Err(format!(
                "body_timeout_ms must be between 100 and 300000, not {}",
                config.body_timeout_ms
            ));
        }
        config.identity_headers.validate()?;
        if let Some(e) = config
            .open_endpoints
            .iter()
            .find(|e| !NON_ENTITY_ENDPOINTS.contains(&e.as_str()))
        {
            return Err(format!(
                "open_endpoints: {e:?} is not an endpoint without entity data \
                 (known: {NON_ENTITY_ENDPOINTS:?})"
            ));
        }
        if let Some(rule) = config.acl.rules.iter().find(|r| r.mqtt.is_some()) {
            return Err(format!(
                "acl rule {:?} is an MQTT rule: entity-acl decides NGSI requests only \
                 (MQTT rules belong in mqtt-acl's configuration)",
                rule.name
            ));
        }
        let acl = Acl::from_config(&config.acl).map_err(|e| e.to_string())?;
        Ok(EntityAcl {
            mode: config.mode,
            log_allows: config.log_allows,
            max_body_bytes: config.max_body_bytes,
            body_timeout_ms: config.body_timeout_ms,
            identity_headers: config.identity_headers,
            open_endpoints: config.open_endpoints,
            acl,
        })
    }

    /// The request headers this engine reads (they must be text; see
    /// [`crate::enforcement::ngsi_filter_reads_header`]).
    pub fn reads_header(&self, name: &str) -> bool {
        crate::enforcement::ngsi_filter_reads_header(&self.identity_headers, name)
    }

    pub fn rule_count(&self) -> usize {
        self.acl.len()
    }

    /// Decides one request. `headers` are the request headers with lowercase names (the
    /// pseudo-headers may be among them; they are ignored by the model).
    pub fn decide(
        &self,
        identity: Option<&Identity>,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Verdict {
        let request = NgsiRequest {
            method,
            path,
            headers,
            body,
        };
        match classify(&request) {
            // Only `GET /version` touches no entity data: it passes only when configured
            // open (whether it needs a credential is token-auth's public-route decision).
            Ok(classified) if classified.accesses.is_empty() => {
                let endpoint = path_without_query(path);
                let decision = if self.open_endpoints.iter().any(|e| e == endpoint) {
                    Decision::Allow("open endpoint".into())
                } else {
                    Decision::Deny(DenyReason::Forbidden(format!(
                        "{endpoint} is not in open_endpoints"
                    )))
                };
                Verdict {
                    entities: "[]".into(),
                    decision,
                    operation: classified.operation,
                }
            }
            Ok(classified) => Verdict {
                entities: summarize_accesses(&classified.accesses),
                decision: self.acl.check_request(identity, &classified),
                operation: classified.operation,
            },
            Err(reason) => Verdict {
                operation: format!("{method} {}", path_without_query(path)),
                entities: "[]".into(),
                decision: Decision::Deny(reason),
            },
        }
    }

    /// The verdict for a body over the limit.
    pub fn too_large(&self, method: &str, path: &str) -> Verdict {
        Verdict {
            operation: format!("{method} {}", path_without_query(path)),
            entities: "[]".into(),
            decision: Decision::Deny(DenyReason::PayloadTooLarge(format!(
                "request body larger than {} bytes",
                self.max_body_bytes
            ))),
        }
    }
}

/// Query strings may carry anything (q filters with values); logs get the path only.
fn path_without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;
    use serde_json::json;

    fn config(rules: serde_json::Value) -> Vec<u8> {
        json!({ "acl": { "rules": rules } })
            .to_string()
            .into_bytes()
    }

    fn alice() -> Identity {
        Identity::new(IdentityKind::Jwt, "alice")
    }

    fn headers(service: &str, path: &str) -> Vec<(String, String)> {
        vec![
            ("fiware-service".into(), service.into()),
            ("fiware-servicepath".into(), path.into()),
        ]
    }

    #[test]
    fn version_passes_only_when_configured_open() {
        let closed = EntityAcl::from_json(&config(json!([]))).unwrap();
        let v = closed.decide(None, "GET", "/version", &[], b"");
        assert!(
            matches!(v.decision, Decision::Deny(DenyReason::Forbidden(_))),
            "{v:?}"
        );
        let open =
            EntityAcl::from_json(br#"{"open_endpoints": ["/version"], "acl": {"rules": []}}"#)
                .unwrap();
        let v = open.decide(None, "GET", "/version?x=1", &[], b"");
        assert_eq!(v.decision, Decision::Allow("open endpoint".into()));
        for bad in [r#"["/v2/entities"]"#, r#"["/version/"]"#, r#"["/"]"#] {
            let json = format!(r#"{{"open_endpoints": {bad}, "acl": {{"rules": []}}}}"#);
            assert!(EntityAcl::from_json(json.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn decides_v2_requests_with_the_rules() {
        let acl = EntityAcl::from_json(&config(json!([{
            "name": "alice-rooms", "effect": "allow", "subjects": ["user:alice"],
            "actions": ["read"],
            "ngsi": {"service": "openiot", "service_path": "/rooms/#", "entity_type": "Room"}
        }])))
        .unwrap();
        let h = headers("openiot", "/rooms/floor1");
        let v = acl.decide(Some(&alice()), "GET", "/v2/entities/R1?type=Room", &h, b"");
        assert_eq!(v.decision, Decision::Allow("acl:alice-rooms".into()));
        assert_eq!(v.operation, "ngsi-v2 GET /v2/entities/R1");
        assert_eq!(v.entities, "[read R1]");
        // No type named: it could be any type, the rule grants Rooms only.
        let v = acl.decide(Some(&alice()), "GET", "/v2/entities/R1", &h, b"");
        assert!(matches!(
            v.decision,
            Decision::Deny(DenyReason::Forbidden(_))
        ));
        // Another tenant, another caller, a write: all refused.
        let other = headers("other", "/rooms/floor1");
        let v = acl.decide(
            Some(&alice()),
            "GET",
            "/v2/entities/R1?type=Room",
            &other,
            b"",
        );
        assert!(!v.decision.is_allowed());
        let bob = Identity::new(IdentityKind::Jwt, "bob");
        let v = acl.decide(Some(&bob), "GET", "/v2/entities/R1?type=Room", &h, b"");
        assert!(!v.decision.is_allowed());
        let v = acl.decide(
            Some(&alice()),
            "DELETE",
            "/v2/entities/R1?type=Room",
            &h,
            b"",
        );
        assert!(!v.decision.is_allowed());
    }

    #[test]
    fn model_refusals_keep_their_status_and_hide_the_query() {
        let acl = EntityAcl::from_json(&config(json!([]))).unwrap();
        let v = acl.decide(None, "GET", "/v2/entities/../admin?q=secret", &[], b"");
        assert_eq!(v.decision.clone(), v.decision);
        match v.decision {
            Decision::Deny(r) => assert_eq!(r.status(), 400),
            other => panic!("{other:?}"),
        }
        assert!(!v.operation.contains("secret"), "{}", v.operation);
        let v = acl.decide(None, "GET", "/admin", &[], b"");
        assert!(matches!(
            v.decision,
            Decision::Deny(DenyReason::Forbidden(_))
        ));
    }

    #[test]
    fn bad_configuration_is_refused_with_the_reason() {
        let err = |json: serde_json::Value| {
            EntityAcl::from_json(json.to_string().as_bytes()).unwrap_err()
        };
        assert!(err(json!({})).contains("missing field `acl`"));
        assert!(err(json!({"acl": {"rules": []}, "mode": "audit"})).contains("unknown variant"));
        assert!(err(json!({"acl": {"rules": []}, "max_body_bytes": 0})).contains("max_body_bytes"));
        assert!(
            err(json!({"acl": {"rules": []}, "body_timeout_ms": 5})).contains("body_timeout_ms")
        );
        let mqtt = json!({"acl": {"rules": [{"name": "m", "effect": "allow",
            "subjects": ["anyone"], "actions": ["read"], "mqtt": {"topic": "a/#"}}]}});
        assert!(err(mqtt).contains("MQTT rule"));
        let typo = json!({"acl": {"rules": [{"name": "x", "effect": "allow",
            "subjects": ["usr:alice"], "actions": ["read"],
            "ngsi": {"service": "", "service_path": "/#"}}]}});
        assert!(err(typo).contains("\"usr\" is unknown"));
    }
}

#[cfg(test)]
mod readme {
    const README: &str = include_str!("../../../README.md");

    /// The configuration example in README.md's entity-acl section loads, and decides as the
    /// text around it says.
    #[test]
    fn readme_example_loads_and_decides() {
        use crate::identity::{Identity, IdentityKind};
        let section = README
            .split("## entity-acl")
            .nth(1)
            .and_then(|s| s.split("```json").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("README has an entity-acl configuration example");
        let acl = super::EntityAcl::from_json(section.as_bytes()).unwrap();
        assert_eq!(acl.rule_count(), 5);
        let mut lamp = Identity::new(IdentityKind::DeviceKey, "lamp-7");
        lamp.roles = vec!["device".into()];
        let h = |p: &str| {
            vec![
                ("fiware-service".to_string(), "smartcity".to_string()),
                ("fiware-servicepath".to_string(), p.to_string()),
            ]
        };
        let own = acl.decide(
            Some(&lamp),
            "PATCH",
            "/v2/entities/lamp-7/attrs",
            &h("/devices/a"),
            br#"{"on": {"value": true}}"#,
        );
        assert!(own.decision.is_allowed(), "{own:?}");
        let other = acl.decide(
            Some(&lamp),
            "PATCH",
            "/v2/entities/lamp-8/attrs",
            &h("/devices/a"),
            br#"{"on": {"value": true}}"#,
        );
        assert!(!other.decision.is_allowed());
        let alice = Identity::new(IdentityKind::Jwt, "alice");
        let vault = acl.decide(
            Some(&alice),
            "GET",
            "/v2/entities/urn:ngsi-ld:Room:vault1?type=Room&attrs=temperature",
            &h("/rooms"),
            b"",
        );
        assert!(!vault.decision.is_allowed());
        let room = acl.decide(
            Some(&alice),
            "GET",
            "/v2/entities/urn:ngsi-ld:Room:1?type=Room&attrs=temperature",
            &h("/rooms"),
            b"",
        );
        assert!(room.decision.is_allowed(), "{room:?}");
    }
}
