//! A decision always carries its reason: the filter turns it into a status, an NGSI error body,
//! a log line and a metric label, in one place.

use std::fmt;

/// Why a request is refused. Each reason has exactly one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The request itself is malformed or ambiguous (e.g. two tokens).
    BadRequest(String),
    /// No credential, or one that does not verify.
    Unauthenticated(String),
    /// A valid credential that is not allowed to do this.
    Forbidden(String),
    /// The body is larger than the filter may buffer.
    PayloadTooLarge(String),
    /// A source the decision depends on (IdP, ownership registry) can't answer.
    Unavailable(String),
}

impl DenyReason {
    pub fn status(&self) -> u32 {
        match self {
            DenyReason::BadRequest(_) => 400,
            DenyReason::Unauthenticated(_) => 401,
            DenyReason::Forbidden(_) => 403,
            DenyReason::PayloadTooLarge(_) => 413,
            DenyReason::Unavailable(_) => 503,
        }
    }

    /// The NGSI error name clients see (`{"error": ..., "description": ...}`).
    pub fn error_name(&self) -> &'static str {
        match self {
            DenyReason::BadRequest(_) => "BadRequest",
            DenyReason::Unauthenticated(_) => "Unauthorized",
            DenyReason::Forbidden(_) => "Forbidden",
            DenyReason::PayloadTooLarge(_) => "RequestEntityTooLarge",
            DenyReason::Unavailable(_) => "ServiceUnavailable",
        }
    }

    /// A short label for metrics and log lines.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::BadRequest(_) => "bad_request",
            DenyReason::Unauthenticated(_) => "unauthenticated",
            DenyReason::Forbidden(_) => "forbidden",
            DenyReason::PayloadTooLarge(_) => "too_large",
            DenyReason::Unavailable(_) => "unavailable",
        }
    }

    /// What the client is told; it names no internals.
    pub fn description(&self) -> &str {
        match self {
            DenyReason::BadRequest(d)
            | DenyReason::Unauthenticated(d)
            | DenyReason::Forbidden(d)
            | DenyReason::PayloadTooLarge(d)
            | DenyReason::Unavailable(d) => d,
        }
    }

    /// The NGSI error body, as Orion writes it.
    pub fn ngsi_body(&self) -> String {
        serde_json::json!({
            "error": self.error_name(),
            "description": self.description(),
        })
        .to_string()
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.label(),
            self.status(),
            self.description()
        )
    }
}

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the string names the rule or check that allowed it, for the decision log.
    Allow(String),
    Deny(DenyReason),
}

/// The rule a default denial names in the decision line: no configured rule allowed the
/// request (or MQTT packet), and ACLs deny by default. Reserved: no configured rule may be
/// named so ([`crate::acl::Acl::from_config`]).
pub const DEFAULT_DENY_RULE: &str = "default-deny";

// How ACL decisions carry the rule that decided, in their text (one place writes and reads it):
// an allow is `acl:<rule>[,<rule>...]` (mqtt-acl may add ` ownership:...`), a denial by a deny
// rule `denied by rule '<rule>': <what>`, a default denial `no rule allows <what>`.
const ALLOWED_BY_RULES: &str = "acl:";
const DENIED_BY_RULE: &str = "denied by rule '";
const DENIED_BY_DEFAULT: &str = "no rule allows ";

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// Allowed by these configured rules (in the order they covered the request).
    pub fn allowed_by_rules(rules: &[&str]) -> Decision {
        Decision::Allow(format!("{ALLOWED_BY_RULES}{}", rules.join(",")))
    }

    /// Refused (403) by the configured deny rule `rule`; `what` says what it touched.
    pub fn denied_by_rule(rule: &str, what: impl fmt::Display) -> Decision {
        Decision::Deny(DenyReason::Forbidden(format!(
            "{DENIED_BY_RULE}{rule}': {what}"
        )))
    }

    /// Refused (403) because no configured rule allows `what` (the ACLs' default).
    pub fn denied_by_default(what: impl fmt::Display) -> Decision {
        Decision::Deny(DenyReason::Forbidden(format!("{DENIED_BY_DEFAULT}{what}")))
    }

    /// The configured rule(s) that decided, for the decision line: the allowing rules, the
    /// deny rule, or [`DEFAULT_DENY_RULE`]; None when no ACL rule decided (a malformed request,
    /// a token, an ownership check). Only the text the constructors above write is read: the
    /// rule's name comes before anything a client chose (the first `': ` ends it).
    pub fn rule(&self) -> Option<&str> {
        let rule = match self {
            Decision::Allow(by) => by
                .strip_prefix(ALLOWED_BY_RULES)
                .map(|rest| rest.split_once(' ').map_or(rest, |(rules, _)| rules)),
            Decision::Deny(DenyReason::Forbidden(why)) => match why.strip_prefix(DENIED_BY_RULE) {
                Some(rest) => rest.split_once("': ").map(|(rule, _)| rule),
                None if why.starts_with(DENIED_BY_DEFAULT) => Some(DEFAULT_DENY_RULE),
                None => None,
            },
            Decision::Deny(_) => None,
        };
        rule.filter(|r| !r.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_its_status() {
        let cases = [
            (DenyReason::BadRequest("x".into()), 400),
            (DenyReason::Unauthenticated("x".into()), 401),
            (DenyReason::Forbidden("x".into()), 403),
            (DenyReason::PayloadTooLarge("x".into()), 413),
            (DenyReason::Unavailable("x".into()), 503),
        ];
        for (reason, status) in cases {
            assert_eq!(reason.status(), status, "{reason}");
        }
    }

    #[test]
    fn ngsi_body_has_error_and_description_and_escapes() {
        let body = DenyReason::Forbidden(r#"no "write" on Room1"#.into()).ngsi_body();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "Forbidden");
        assert_eq!(v["description"], r#"no "write" on Room1"#);
    }
}
