//! The entity-acl filter's configuration and its one decision per request: classify the
//! request with the NGSI model, then decide it with the ACL engine. The filter crate only
//! gathers the request and applies the decision.

use std::borrow::Cow;

use serde::Deserialize;

use crate::access::{Action, RequestAccess};
use crate::acl::RuleConfig;
use crate::acl::{Acl, AclConfig};
use crate::decision::{Decision, DenyReason};
use crate::decision_cache::{DecisionCache, DecisionInputs};
use crate::enforcement::{summarize_accesses, Mode};
use crate::identity::Identity;
use crate::identity_headers::IdentityHeaderNames;
use crate::ngsi::{classify, Broker, NgsiRequest};
use crate::notification_endpoint;

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
    /// The broker behind the sidecar: `orion` (default), `ngsi-ld` or `fogflow`. It decides
    /// which routes exist and what a request really does (see README, "Which broker").
    #[serde(default)]
    pub broker: Broker,
    /// Let subscriptions and registrations name loopback, link-local and metadata endpoints
    /// (refused by default, see [`notification_endpoint`]). Default false.
    #[serde(default)]
    pub allow_local_notification_endpoints: bool,
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
    pub broker: Broker,
    open_endpoints: Vec<String>,
    allow_local_notification_endpoints: bool,
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
        if config.broker == Broker::FogFlow {
            config.acl.rules.iter().try_for_each(fogflow_rule)?;
        }
        let acl = Acl::from_config(&config.acl).map_err(|e| e.to_string())?;
        Ok(EntityAcl {
            mode: config.mode,
            log_allows: config.log_allows,
            max_body_bytes: config.max_body_bytes,
            body_timeout_ms: config.body_timeout_ms,
            identity_headers: config.identity_headers,
            broker: config.broker,
            open_endpoints: config.open_endpoints,
            allow_local_notification_endpoints: config.allow_local_notification_endpoints,
            acl,
        })
    }

    /// The request headers this engine reads (they must be text; see
    /// [`crate::enforcement::ngsi_filter_reads_header`]).
    pub fn reads_header(&self, name: &str) -> bool {
        crate::enforcement::ngsi_filter_reads_header(&self.identity_headers, name)
    }

    /// The request headers [`EntityAcl::decide`] reads (the NGSI model's tenant headers):
    /// giving it (and the decision cache's key) only these decides the same.
    pub fn model_reads_header(name: &str) -> bool {
        crate::ngsi::reads_header(name)
    }

    pub fn rule_count(&self) -> usize {
        self.acl.len()
    }

    /// Decides one request. `headers` are the request headers with lowercase names (the
    /// pseudo-headers may be among them; they are ignored by the model); only those
    /// [`EntityAcl::model_reads_header`] names are read.
    pub fn decide(
        &self,
        identity: Option<&Identity>,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Verdict {
        let request = NgsiRequest {
            broker: self.broker,
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
                decision: match self.check_endpoints(&classified) {
                    Ok(()) => self.acl.check_request(identity, &classified),
                    Err(reason) => Decision::Deny(reason),
                },
                operation: classified.operation,
            },
            Err(reason) => Verdict {
                operation: format!("{method} {}", path_without_query(path)),
                entities: "[]".into(),
                decision: Decision::Deny(reason),
            },
        }
    }

    /// [`EntityAcl::decide`] of `request` and `body`, answered from `cache` when a request
    /// without a body was decided before for exactly the same caller (expiry included), method,
    /// path and headers (see
    /// [`crate::decision_cache`]); `now` in seconds since the epoch. The cache must be this
    /// engine's own: a verdict is only valid for the policy that made it.
    pub fn decide_cached<'c>(
        &self,
        cache: &'c mut DecisionCache,
        now: u64,
        request: DecisionInputs,
        body: &[u8],
    ) -> Cow<'c, Verdict> {
        let decide = || {
            let DecisionInputs {
                identity,
                method,
                path,
                headers,
            } = request;
            self.decide(identity, method, path, headers, body)
        };
        if !body.is_empty() {
            return Cow::Owned(decide());
        }
        cache.get_or_decide(now, &request, decide)
    }

    /// Refuses a subscription or registration whose endpoint the broker must not connect to
    /// (see [`notification_endpoint`]), unless the operator allowed it.
    fn check_endpoints(&self, request: &RequestAccess) -> Result<(), DenyReason> {
        if self.allow_local_notification_endpoints {
            return Ok(());
        }
        request
            .accesses
            .iter()
            .filter(|a| matches!(a.action, Action::Subscribe | Action::Register))
            .filter_map(|a| a.endpoint.as_deref())
            .filter(|e| !self.acl.allow_rule_names_endpoint(e))
            .try_for_each(notification_endpoint::check)
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

/// FogFlow keys entities by id alone and has no tenants or service paths: a rule naming a
/// type, a tenant or a service path could never apply as written (an allow rule would grant
/// nothing, a deny rule would touch everything), so it is refused at configure time.
fn fogflow_rule(rule: &RuleConfig) -> Result<(), String> {
    let Some(n) = &rule.ngsi else {
        return Ok(());
    };
    if n.entity_type != "*" || !matches!(n.service.as_str(), "" | "*") || n.service_path != "/#" {
        return Err(format!(
            "acl rule {:?}: broker \"fogflow\" keys entities by id alone and has no tenants \
             or service paths; give entity_type \"*\", service \"\" (or \"*\") and \
             service_path \"/#\"",
            rule.name
        ));
    }
    Ok(())
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

    /// Through the cache, every request gets the verdict a fresh decision gives it, in any
    /// order and repeated: the cache never answers one caller, tenant or path with another's.
    #[test]
    fn cached_decisions_are_the_fresh_decisions() {
        use crate::decision_cache::{DecisionCache, DecisionInputs};
        let acl = EntityAcl::from_json(&config(json!([
            {"name": "alice-rooms", "effect": "allow", "subjects": ["user:alice"],
             "actions": ["read"],
             "ngsi": {"service": "openiot", "service_path": "/rooms/#", "entity_type": "Room"}},
            {"name": "operators", "effect": "allow", "subjects": ["role:operator"],
             "actions": ["read", "write"],
             "ngsi": {"service": "%t", "service_path": "/#"}}
        ])))
        .unwrap();
        let mut alice = alice();
        alice.expires_at = Some(100);
        let mut operator = Identity::new(IdentityKind::Jwt, "bob");
        operator.roles = vec!["operator".into()];
        operator.tenant = Some("openiot".into());
        let mut other_tenant = operator.clone();
        other_tenant.tenant = Some("other".into());
        let bob = Identity::new(IdentityKind::Jwt, "bob");
        let callers = [
            None,
            Some(&alice),
            Some(&operator),
            Some(&other_tenant),
            Some(&bob),
        ];
        let tenants = [
            headers("openiot", "/rooms/floor1"),
            headers("openiot", "/secret"),
            headers("other", "/rooms/floor1"),
            vec![],
        ];
        let requests = [
            ("GET", "/v2/entities/R1?type=Room"),
            ("GET", "/v2/entities/R1"),
            ("DELETE", "/v2/entities/R1?type=Room"),
            ("GET", "/v2/entities?type=Room"),
            ("GET", "/v2/entities/../R1"),
        ];
        let mut cache = DecisionCache::default();
        let mut allowed = 0;
        for round in 0..2 {
            for caller in callers {
                for h in &tenants {
                    for (method, path) in requests {
                        for now in [50, 100] {
                            let fresh = acl.decide(caller, method, path, h, b"");
                            let inputs = DecisionInputs {
                                identity: caller,
                                method,
                                path,
                                headers: h,
                            };
                            let cached = acl.decide_cached(&mut cache, now, inputs, b"");
                            assert_eq!(*cached, fresh, "round {round}: {caller:?} {h:?} {path}");
                            allowed += usize::from(fresh.decision.is_allowed());
                        }
                    }
                }
            }
        }
        assert!(allowed > 0);
        // A request with a body is never answered from the cache.
        let h = headers("openiot", "/rooms");
        let inputs = DecisionInputs {
            identity: Some(&operator),
            method: "POST",
            path: "/v2/entities",
            headers: &h,
        };
        let before = cache.len();
        let body = br#"{"id": "R9", "type": "Room"}"#;
        let v = acl.decide_cached(&mut cache, 50, inputs, body);
        assert_eq!(
            *v,
            acl.decide(Some(&operator), "POST", "/v2/entities", &h, body)
        );
        assert_eq!(cache.len(), before);
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
    fn the_broker_setting_is_validated() {
        let err = |json: serde_json::Value| {
            EntityAcl::from_json(json.to_string().as_bytes()).unwrap_err()
        };
        let e = err(json!({"broker": "fog-flow", "acl": {"rules": []}}));
        assert!(e.contains("unknown variant `fog-flow`"), "{e}");
        assert!(e.contains("`orion`, `ngsi-ld`, `fogflow`"), "{e}");
        let default = EntityAcl::from_json(&config(json!([]))).unwrap();
        assert_eq!(default.broker, Broker::Orion);
        // FogFlow has no types, tenants or service paths: rules naming them are refused.
        for ngsi in [
            json!({"service": "", "service_path": "/#", "entity_type": "Room"}),
            json!({"service": "openiot", "service_path": "/#"}),
            json!({"service": "%t", "service_path": "/#"}),
            json!({"service": "", "service_path": "/rooms/#"}),
        ] {
            let e = err(json!({"broker": "fogflow", "acl": {"rules": [{"name": "r",
                "effect": "allow", "subjects": ["anyone"], "actions": ["read"], "ngsi": ngsi}]}}));
            assert!(e.contains("keys entities by id alone"), "{e}");
        }
        let ok = json!({"broker": "fogflow", "acl": {"rules": [{"name": "r", "effect": "allow",
            "subjects": ["anyone"], "actions": ["read"],
            "ngsi": {"service": "*", "service_path": "/#", "entity_id": "urn:*"}}]}});
        let acl = EntityAcl::from_json(ok.to_string().as_bytes()).unwrap();
        assert_eq!(acl.broker, Broker::FogFlow);
    }

    fn subscriber_acl(extra: serde_json::Value) -> EntityAcl {
        let mut cfg = json!({ "acl": { "rules": [
            {"name": "alice-subscribes-rooms", "effect": "allow", "subjects": ["user:alice"],
             "actions": ["subscribe"],
             "ngsi": {"service": "city", "service_path": "/#", "entity_id": "urn:Room:*"}},
            {"name": "ops-local-hook", "effect": "allow", "subjects": ["user:ops"],
             "actions": ["subscribe"],
             "ngsi": {"service": "city", "service_path": "/#",
                      "endpoint_prefix": "http://127.0.0.1:9090/hooks/"}}
        ]}});
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        EntityAcl::from_json(cfg.to_string().as_bytes()).unwrap()
    }

    fn subscribe(acl: &EntityAcl, who: &str, method: &str, path: &str, body: &str) -> Decision {
        let who = Identity::new(IdentityKind::Jwt, who);
        let h = headers("city", "/");
        acl.decide(Some(&who), method, path, &h, body.as_bytes())
            .decision
    }

    fn v2_subscription(url: &str) -> String {
        json!({"subject": {"entities": [{"id": "urn:Room:1"}]},
               "notification": {"http": {"url": url}}})
        .to_string()
    }

    /// A subscription whose notifications would go to the broker's own host or the metadata
    /// service is refused, in any spelling; on main it was allowed by a subscribe rule
    /// without endpoint_prefix.
    #[test]
    fn local_and_metadata_notification_endpoints_are_refused() {
        let acl = subscriber_acl(json!({}));
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://2852039166/",
            "http://[::ffff:169.254.169.254]/",
            "http://localhost:1026/v2/entities",
            "http://0x7f.1:1026/",
        ] {
            let d = subscribe(
                &acl,
                "alice",
                "POST",
                "/v2/subscriptions",
                &v2_subscription(url),
            );
            match d {
                Decision::Deny(DenyReason::Forbidden(m)) => {
                    assert!(m.contains("notification endpoint"), "{url}: {m}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        let ld = json!({"type": "Subscription", "entities": [{"id": "urn:Room:1", "type": "Room"}],
            "notification": {"endpoint": {"uri": "http://[::1]:1026/ngsi-ld/v1/entities"}}});
        let d = acl.decide(
            Some(&alice()),
            "POST",
            "/ngsi-ld/v1/subscriptions",
            &headers("city", ""),
            ld.to_string().as_bytes(),
        );
        assert!(!d.decision.is_allowed(), "{d:?}");
        // PATCH of the endpoint is checked too (and needs rights over every subscription).
        let d = subscribe(
            &acl,
            "alice",
            "PATCH",
            "/v2/subscriptions/abc",
            r#"{"notification": {"http": {"url": "http://169.254.169.254/"}}}"#,
        );
        assert!(!d.is_allowed(), "{d:?}");
        // A registration's new provider endpoint (the broker forwards requests there).
        let admin = EntityAcl::from_json(
            br#"{"broker": "ngsi-ld", "acl": {"rules": [{"name": "all", "effect": "allow",
                "subjects": ["anyone"], "actions": ["*"],
                "ngsi": {"service": "*", "service_path": "/#"}}]}}"#,
        )
        .unwrap();
        let d = admin.decide(
            Some(&alice()),
            "PATCH",
            "/ngsi-ld/v1/csourceRegistrations/urn:r",
            &[],
            br#"{"endpoint": "http://metadata.google.internal/computeMetadata/v1/"}"#,
        );
        assert!(!d.decision.is_allowed(), "{d:?}");
        // An ordinary endpoint, and a private network one, are the rules' business.
        for url in [
            "http://hooks.example.com/ngsi",
            "http://10.1.2.3:8080/notify",
        ] {
            let d = subscribe(
                &acl,
                "alice",
                "POST",
                "/v2/subscriptions",
                &v2_subscription(url),
            );
            assert!(d.is_allowed(), "{url}: {d:?}");
        }
        // The operator's opt-ins: a rule naming the endpoint, or the setting.
        let named = v2_subscription("http://127.0.0.1:9090/hooks/a");
        let d = subscribe(&acl, "ops", "POST", "/v2/subscriptions", &named);
        assert!(d.is_allowed(), "{d:?}");
        // The named receiver is a known one for every rule (alice's rule allows any endpoint);
        // the rest of that host is not.
        let d = subscribe(&acl, "alice", "POST", "/v2/subscriptions", &named);
        assert!(d.is_allowed(), "{d:?}");
        let elsewhere = v2_subscription("http://127.0.0.1:9090/admin/");
        let d = subscribe(&acl, "ops", "POST", "/v2/subscriptions", &elsewhere);
        assert!(!d.is_allowed(), "{d:?}");
        let open = subscriber_acl(json!({"allow_local_notification_endpoints": true}));
        let d = subscribe(
            &open,
            "alice",
            "POST",
            "/v2/subscriptions",
            &v2_subscription("http://localhost:1026/"),
        );
        assert!(d.is_allowed(), "{d:?}");
    }

    /// Orion finds a subscription by id alone: a narrow subscribe grant does not let its
    /// holder rewrite (PATCH) someone else's subscription. On main the PATCH was decided on
    /// its body alone and allowed.
    #[test]
    fn a_subscription_changed_by_id_needs_every_subscription() {
        let acl = subscriber_acl(json!({}));
        let body = r#"{"subject": {"entities": [{"id": "urn:Room:1"}]},
                       "notification": {"http": {"url": "http://hooks.example.com/x"}}}"#;
        for (method, path, body) in [
            ("PATCH", "/v2/subscriptions/5f0a1b2c3d4e5f6a7b8c9d0e", body),
            (
                "PATCH",
                "/v2/subscriptions/5f0a1b2c3d4e5f6a7b8c9d0e",
                r#"{"status": "inactive"}"#,
            ),
            ("DELETE", "/v2/subscriptions/5f0a1b2c3d4e5f6a7b8c9d0e", ""),
            ("GET", "/v2/subscriptions/5f0a1b2c3d4e5f6a7b8c9d0e", ""),
            (
                "PATCH",
                "/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:1",
                r#"{"isActive": false}"#,
            ),
        ] {
            let d = subscribe(&acl, "alice", method, path, body);
            assert!(!d.is_allowed(), "{method} {path}: {d:?}");
        }
        // Creating one within the grant is still fine.
        let d = subscribe(&acl, "alice", "POST", "/v2/subscriptions", body);
        assert!(d.is_allowed(), "{d:?}");
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
