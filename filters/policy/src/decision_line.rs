//! One decision line for every filter, in one format, and the same facts for Envoy's access
//! log and for labelled metrics.
//!
//! ```text
//! filter=entity-acl decision=deny status=403 reason=forbidden subject="bob" method="GET"
//!   path="/v2/entities/Room1" tenant="smartcity" request_id="6c1f..." rule="secret-rooms"
//!   operation="ngsi-v2 GET /v2/entities/Room1" entities=[read Room1] by="denied by rule ..."
//! ```
//!
//! The fields come in a fixed order: `filter decision status reason subject method path tenant
//! request_id rule`, then the filter's own fields, then `by` (what decided, or why not).
//! `filter`, `decision`, `status` and `reason` come from closed sets and are written bare;
//! every other value comes from a client or a configuration and is bounded
//! ([`crate::log_text`]) and quoted, so it can't forge another field. A missing value is `-`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use crate::decision::{Decision, DenyReason};
use crate::enforcement::Mode;
use crate::log_text::{bounded, bounded_debug, bounded_to, MAX_LOGGED_VALUE};

/// What happened to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    Allow,
    Deny,
    /// Shadow mode: a denial that was logged and counted, and the request went on.
    ShadowDeny,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Allow => "allow",
            DecisionKind::Deny => "deny",
            DecisionKind::ShadowDeny => "shadow-deny",
        }
    }
}

/// Why, as a closed set: it is a metric label, so it must never carry free text (one label
/// value per client-chosen string would grow the stats without bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Allowed by the policy (a rule, a check, a public route of entity-acl's).
    Allowed,
    /// token-auth: a public route, no credential needed.
    Public,
    BadRequest,
    Unauthenticated,
    Forbidden,
    TooLarge,
    Unavailable,
    /// token-auth: one introspection callout too many in flight (503, Retry-After).
    IntrospectionShed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Public => "public",
            Reason::BadRequest => "bad_request",
            Reason::Unauthenticated => "unauthenticated",
            Reason::Forbidden => "forbidden",
            Reason::TooLarge => "too_large",
            Reason::Unavailable => "unavailable",
            Reason::IntrospectionShed => "introspection_shed",
        }
    }

    /// The reason of a denial, by its kind.
    pub fn of(reason: &DenyReason) -> Reason {
        match reason {
            DenyReason::BadRequest(_) => Reason::BadRequest,
            DenyReason::Unauthenticated(_) => Reason::Unauthenticated,
            DenyReason::Forbidden(_) => Reason::Forbidden,
            DenyReason::PayloadTooLarge(_) => Reason::TooLarge,
            DenyReason::Unavailable(_) => Reason::Unavailable,
        }
    }
}

/// At which level allowed requests are logged (`log_allows` in every filter's configuration).
/// Denials are always logged at warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogAllows {
    /// Logged only when Envoy runs the wasm component at debug (the default: one line per
    /// allowed request is too much for production logs).
    #[default]
    Debug,
    Info,
    Off,
}

/// The filter-state names Envoy's access log reads (Envoy stores a Wasm property `iot_x` as
/// filter state `wasm.iot_x`: `%FILTER_STATE(wasm.iot_decision:PLAIN)%`).
pub const STATE_FILTER: &str = "iot_filter";
pub const STATE_DECISION: &str = "iot_decision";
pub const STATE_STATUS: &str = "iot_status";
pub const STATE_REASON: &str = "iot_reason";
pub const STATE_SUBJECT: &str = "iot_subject";
pub const STATE_RULE: &str = "iot_rule";
/// mqtt-acl: how many of the connection's packets were refused (or would be, in shadow mode)
/// so far; a connection's access-log line is written when it closes, and the decision fields
/// above then describe its last decided packet only.
pub const STATE_DENIALS: &str = "iot_denials";

/// The labelled counter's name stem; Envoy's `stats_tags` (in the sidecar templates) turn
/// `iot_decisions.filter.<f>.decision.<d>.reason.<r>` into `iot_decisions{filter, decision,
/// reason}`.
pub const DECISIONS_METRIC: &str = "iot_decisions";

/// The per-rule counter's name stem: `iot_rule_decisions.filter.<f>.rule.<rule>.decision.<d>`,
/// tagged `iot_rule_decisions{filter, rule, decision}`. Rule names come from the configuration
/// (and `default-deny`), never from a request, so the label values are bounded by the policy;
/// only names a metric can carry as they are get one ([`metric_safe_rule`]).
pub const RULE_DECISIONS_METRIC: &str = "iot_rule_decisions";

/// Longest rule name with a counter of its own.
pub const MAX_METRIC_RULE_NAME: usize = 64;

/// Whether a rule name can be a metric label as it is: 1 to 64 ASCII letters, digits, `-`,
/// `_` (no `.`, which separates a stat name's parts, and nothing a tag regex would misread).
pub fn metric_safe_rule(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_METRIC_RULE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One decided request (or MQTT packet), ready to be logged, exported and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionLine {
    pub filter: &'static str,
    pub kind: DecisionKind,
    /// The status the filter answered (or would have, in shadow mode); None for an allow.
    pub status: Option<u32>,
    pub reason: Reason,
    pub subject: Option<String>,
    pub method: Option<String>,
    /// Without its query (which may carry anything, credentials included).
    pub path: Option<String>,
    pub tenant: Option<String>,
    pub request_id: Option<String>,
    /// The configured rule that decided, when one did.
    pub rule: Option<String>,
    /// The filter's own fields, in order: (name, value already safe to print as is).
    pub extra: Vec<(&'static str, String)>,
    /// What allowed the request, or why it was refused.
    pub by: String,
}

impl DecisionLine {
    /// The line of `decision`, taken in `mode` (a denial in shadow mode is a shadow-deny).
    pub fn new(filter: &'static str, mode: Mode, decision: &Decision) -> DecisionLine {
        let (kind, status, reason, by) = match decision {
            Decision::Allow(by) => (DecisionKind::Allow, None, Reason::Allowed, by.clone()),
            Decision::Deny(r) => (
                if mode == Mode::Shadow {
                    DecisionKind::ShadowDeny
                } else {
                    DecisionKind::Deny
                },
                Some(r.status()),
                Reason::of(r),
                r.description().to_string(),
            ),
        };
        DecisionLine {
            filter,
            kind,
            status,
            reason,
            subject: None,
            method: None,
            path: None,
            tenant: None,
            request_id: None,
            rule: decision.rule().map(str::to_string),
            extra: Vec::new(),
            by,
        }
    }

    /// A more precise reason than the decision's kind gives (e.g. `header_not_text`).
    pub fn reason(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }

    pub fn subject(mut self, subject: Option<&str>) -> Self {
        self.subject = subject.map(str::to_string);
        self
    }

    /// The request's method, path (its query is dropped), tenant and `x-request-id`.
    pub fn request(
        mut self,
        method: Option<&str>,
        path: Option<&str>,
        tenant: Option<&str>,
        request_id: Option<&str>,
    ) -> Self {
        let some = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
        self.method = some(method);
        self.path = some(path.map(|p| p.split_once('?').map_or(p, |(p, _)| p)));
        self.tenant = some(tenant);
        self.request_id = some(request_id);
        self
    }

    /// A filter-specific field from a client or configuration: bounded and quoted.
    pub fn text(mut self, name: &'static str, value: &str) -> Self {
        self.extra.push((name, bounded_debug(value)));
        self
    }

    /// A filter-specific field already rendered safely (e.g.
    /// [`crate::enforcement::summarize_accesses`], or a closed-set word); bounded.
    pub fn literal(mut self, name: &'static str, value: &str) -> Self {
        self.extra
            .push((name, bounded_to(value, 4 * MAX_LOGGED_VALUE).into_owned()));
        self
    }

    pub fn is_allow(&self) -> bool {
        self.kind == DecisionKind::Allow
    }

    /// The labelled counter of this decision, e.g.
    /// `iot_decisions.filter.entity_acl.decision.deny.reason.forbidden`. Every part is from a
    /// closed set (the filter's name in its metric form, `-` as `_`).
    pub fn metric_name(&self) -> String {
        format!(
            "{DECISIONS_METRIC}.filter.{}.decision.{}.reason.{}",
            self.filter.replace('-', "_"),
            self.kind.as_str(),
            self.reason.as_str()
        )
    }

    /// The per-rule counters of this decision: one per rule that decided (several allowing
    /// rules may), e.g. `iot_rule_decisions.filter.entity_acl.rule.no-vault.decision.deny`;
    /// none when no rule decided or for a name [`metric_safe_rule`] refuses.
    pub fn rule_metric_names(&self) -> Vec<String> {
        self.metric_rules()
            .map(|rule| self.rule_metric_name(rule))
            .collect()
    }

    /// The rules that decided and have a per-rule counter (names [`metric_safe_rule`] takes).
    pub fn metric_rules(&self) -> impl Iterator<Item = &str> {
        self.rule
            .iter()
            .flat_map(|rules| rules.split(','))
            .filter(|name| metric_safe_rule(name))
    }

    /// The per-rule counter of `rule` (one of [`DecisionLine::metric_rules`]) for this
    /// decision.
    pub fn rule_metric_name(&self, rule: &str) -> String {
        format!(
            "{RULE_DECISIONS_METRIC}.filter.{}.rule.{rule}.decision.{}",
            self.filter.replace('-', "_"),
            self.kind.as_str()
        )
    }

    /// What Envoy's access log gets, as (property name, value): the values unquoted but
    /// bounded, `-` when absent.
    pub fn filter_state(&self) -> [(&'static str, Cow<'_, str>); 6] {
        fn plain(v: &Option<String>) -> Cow<'_, str> {
            v.as_deref().map_or(Cow::Borrowed("-"), bounded)
        }
        [
            (STATE_FILTER, Cow::Borrowed(self.filter)),
            (STATE_DECISION, Cow::Borrowed(self.kind.as_str())),
            (STATE_STATUS, self.status_text()),
            (STATE_REASON, Cow::Borrowed(self.reason.as_str())),
            (STATE_SUBJECT, plain(&self.subject)),
            (STATE_RULE, plain(&self.rule)),
        ]
    }

    fn status_text(&self) -> Cow<'static, str> {
        self.status
            .map_or(Cow::Borrowed("-"), |s| Cow::Owned(s.to_string()))
    }
}

impl fmt::Display for DecisionLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quoted = |v: &Option<String>| v.as_deref().map_or("-".into(), bounded_debug);
        write!(
            f,
            "filter={} decision={} status={} reason={} subject={} method={} path={} tenant={} \
             request_id={} rule={}",
            self.filter,
            self.kind.as_str(),
            self.status_text(),
            self.reason.as_str(),
            quoted(&self.subject),
            quoted(&self.method),
            quoted(&self.path),
            quoted(&self.tenant),
            quoted(&self.request_id),
            quoted(&self.rule),
        )?;
        for (name, value) in &self.extra {
            write!(f, " {name}={value}")?;
        }
        write!(f, " by={}", bounded_debug(&self.by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::DEFAULT_DENY_RULE;

    fn deny_by_rule() -> Decision {
        Decision::Deny(DenyReason::Forbidden(
            "denied by rule 'secret-rooms': write on entity Room1".into(),
        ))
    }

    #[test]
    fn fields_come_in_the_fixed_order() {
        let line = DecisionLine::new("entity-acl", Mode::Enforce, &deny_by_rule())
            .subject(Some("bob"))
            .request(
                Some("PATCH"),
                Some("/v2/entities/Room1/attrs?options=keyValues&access_token=secret"),
                Some("smartcity"),
                Some("6c1f-22"),
            )
            .text("operation", "ngsi-v2 PATCH /v2/entities/Room1/attrs")
            .literal("entities", "[write Room1]");
        assert_eq!(
            line.to_string(),
            r#"filter=entity-acl decision=deny status=403 reason=forbidden subject="bob" method="PATCH" path="/v2/entities/Room1/attrs" tenant="smartcity" request_id="6c1f-22" rule="secret-rooms" operation="ngsi-v2 PATCH /v2/entities/Room1/attrs" entities=[write Room1] by="denied by rule 'secret-rooms': write on entity Room1""#
        );
    }

    #[test]
    fn an_allow_has_no_status_and_absent_values_are_dashes() {
        let line = DecisionLine::new(
            "device-ownership",
            Mode::Enforce,
            &Decision::Allow("read delegate".into()),
        );
        assert_eq!(
            line.to_string(),
            r#"filter=device-ownership decision=allow status=- reason=allowed subject=- method=- path=- tenant=- request_id=- rule=- by="read delegate""#
        );
        assert!(line.is_allow());
    }

    #[test]
    fn shadow_mode_denials_are_shadow_denies() {
        let line = DecisionLine::new("mqtt-acl", Mode::Shadow, &deny_by_rule());
        assert_eq!(line.kind, DecisionKind::ShadowDeny);
        assert!(line
            .to_string()
            .starts_with("filter=mqtt-acl decision=shadow-deny status=403 reason=forbidden"));
    }

    #[test]
    fn client_values_cannot_forge_fields_and_are_bounded() {
        let forged = "x\" decision=allow rule=\"admin";
        let long = "a".repeat(10_000);
        let line = DecisionLine::new("token-auth", Mode::Enforce, &deny_by_rule())
            .subject(Some(forged))
            .request(Some("GET"), Some(&long), None, Some("id\nforged line"));
        let text = line.to_string();
        assert!(
            text.contains(r#"subject="x\" decision=allow rule=\"admin""#),
            "{text}"
        );
        assert!(text.contains(r#"request_id="id\nforged line""#), "{text}");
        assert!(!text.contains('\n'));
        assert!(text.len() < 1000, "{}", text.len());
        assert!(
            text.starts_with("filter=token-auth decision=deny "),
            "{text}"
        );
    }

    #[test]
    fn the_rule_is_read_from_the_acl_engines_words() {
        let rule = |d: Decision| DecisionLine::new("x", Mode::Enforce, &d).rule;
        assert_eq!(rule(Decision::Allow("acl:a,b".into())), Some("a,b".into()));
        assert_eq!(
            rule(Decision::Allow("acl:r1 ownership:own device".into())),
            Some("r1".into())
        );
        assert_eq!(rule(deny_by_rule()), Some("secret-rooms".into()));
        assert_eq!(rule(Decision::Allow("open endpoint".into())), None);
        assert_eq!(
            rule(Decision::denied_by_default("read on Room1")),
            Some(DEFAULT_DENY_RULE.into())
        );
        // Not an ACL rule's decision: no rule.
        assert_eq!(
            rule(Decision::Deny(DenyReason::Forbidden(
                "not the owner of device \"lamp-01\"".into()
            ))),
            None
        );
        assert_eq!(
            rule(Decision::Deny(DenyReason::BadRequest(
                "no rule allows x".into()
            ))),
            None
        );
        // What the request names comes after the rule: it can't make another rule.
        assert_eq!(
            rule(Decision::denied_by_rule("r", "read on entity \"x': y\"")),
            Some("r".into())
        );
    }

    #[test]
    fn the_rule_of_a_real_acl_decision() {
        use crate::entity_acl::EntityAcl;
        let acl = EntityAcl::from_json(
            br#"{"acl": {"rules": [
                {"name": "reads", "effect": "allow", "subjects": ["anyone"], "actions": ["read"],
                 "ngsi": {"service": "*", "service_path": "/#"}},
                {"name": "no-vault", "effect": "deny", "subjects": ["anyone"], "actions": ["*"],
                 "ngsi": {"service": "*", "service_path": "/#", "entity_id": "vault*"}}]}}"#,
        )
        .unwrap();
        let rule_for = |path: &str| {
            let v = acl.decide(None, "GET", path, &[], b"");
            DecisionLine::new("entity-acl", Mode::Enforce, &v.decision).rule
        };
        assert_eq!(rule_for("/v2/entities/Room1"), Some("reads".into()));
        assert_eq!(rule_for("/v2/entities/vault1"), Some("no-vault".into()));
        // A write no rule allows: the default denial names DEFAULT_DENY_RULE.
        let v = acl.decide(None, "DELETE", "/v2/entities/Room1", &[], b"");
        assert_eq!(
            DecisionLine::new("entity-acl", Mode::Enforce, &v.decision).rule,
            Some(DEFAULT_DENY_RULE.into())
        );
    }

    #[test]
    fn rule_counters_name_each_deciding_rule_that_a_metric_can_carry() {
        let deny = DecisionLine::new("entity-acl", Mode::Enforce, &deny_by_rule());
        assert_eq!(
            deny.rule_metric_names(),
            ["iot_rule_decisions.filter.entity_acl.rule.secret-rooms.decision.deny"]
        );
        let allow = DecisionLine::new(
            "mqtt-acl",
            Mode::Enforce,
            &Decision::Allow("acl:a,b_2".into()),
        );
        assert_eq!(
            allow.rule_metric_names(),
            [
                "iot_rule_decisions.filter.mqtt_acl.rule.a.decision.allow",
                "iot_rule_decisions.filter.mqtt_acl.rule.b_2.decision.allow"
            ]
        );
        let by_default = DecisionLine::new(
            "entity-acl",
            Mode::Shadow,
            &Decision::denied_by_default("read on Room1"),
        );
        assert_eq!(
            by_default.rule_metric_names(),
            ["iot_rule_decisions.filter.entity_acl.rule.default-deny.decision.shadow-deny"]
        );
        // No rule decided, or a name a stat can't carry as it is: no per-rule counter.
        let token = DecisionLine::new("token-auth", Mode::Enforce, &Decision::Allow("jwt".into()));
        assert!(token.rule_metric_names().is_empty());
        for name in ["has.dot", "has space", "quote\"", "", &"x".repeat(65)] {
            assert!(!metric_safe_rule(name), "{name}");
        }
        assert!(metric_safe_rule(&"x".repeat(64)));
    }

    #[test]
    fn metric_names_carry_only_closed_set_labels() {
        let line = DecisionLine::new("entity-acl", Mode::Enforce, &deny_by_rule())
            .subject(Some("anything.at.all"));
        assert_eq!(
            line.metric_name(),
            "iot_decisions.filter.entity_acl.decision.deny.reason.forbidden"
        );
        let shed = DecisionLine::new(
            "token-auth",
            Mode::Enforce,
            &Decision::Deny(DenyReason::Unavailable("busy".into())),
        )
        .reason(Reason::IntrospectionShed);
        assert_eq!(
            shed.metric_name(),
            "iot_decisions.filter.token_auth.decision.deny.reason.introspection_shed"
        );
    }

    #[test]
    fn filter_state_is_plain_and_bounded() {
        let long = "s".repeat(1000);
        let line =
            DecisionLine::new("entity-acl", Mode::Enforce, &deny_by_rule()).subject(Some(&long));
        let state = line.filter_state();
        assert_eq!(state[0], ("iot_filter", "entity-acl".into()));
        assert_eq!(state[1], ("iot_decision", "deny".into()));
        assert_eq!(state[2], ("iot_status", "403".into()));
        assert_eq!(state[3], ("iot_reason", "forbidden".into()));
        assert!(state[4].1.len() < MAX_LOGGED_VALUE + 32);
        assert_eq!(state[5], ("iot_rule", "secret-rooms".into()));
        let allow = DecisionLine::new("token-auth", Mode::Enforce, &Decision::Allow("jwt".into()));
        assert_eq!(allow.filter_state()[2].1, "-");
        assert_eq!(allow.filter_state()[4].1, "-");
    }

    #[test]
    fn log_allows_parses_its_three_values() {
        for (json, want) in [
            ("\"debug\"", LogAllows::Debug),
            ("\"info\"", LogAllows::Info),
            ("\"off\"", LogAllows::Off),
        ] {
            assert_eq!(serde_json::from_str::<LogAllows>(json).unwrap(), want);
        }
        assert!(serde_json::from_str::<LogAllows>("\"warn\"").is_err());
        assert_eq!(LogAllows::default(), LogAllows::Debug);
    }
}
