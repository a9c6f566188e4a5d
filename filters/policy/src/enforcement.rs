//! What every authorization filter after token-auth (entity-acl, device-ownership, mqtt-acl)
//! does the same way: enforce or only watch (shadow mode), and say what clients see (the decision
//! line is `crate::decision_line`'s).

use serde::Deserialize;

use crate::access::{Access, EntitySelector};
use crate::decision::DenyReason;

/// The request headers an NGSI policy filter (entity-acl, device-ownership) reads, which must
/// be text: pseudo-headers, the tenant headers of the NGSI model, the identity headers
/// token-auth set, and `content-length` (a body over the limit is refused before it arrives).
pub fn ngsi_filter_reads_header(
    identity_headers: &crate::identity_headers::IdentityHeaderNames,
    name: &str,
) -> bool {
    crate::header_pairs::is_pseudo(name)
        || crate::ngsi::reads_header(name)
        || identity_headers.contains(name)
        || name.eq_ignore_ascii_case("content-length")
}

/// How a filter applies its decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denials are answered (the default).
    #[default]
    Enforce,
    /// Every request passes; the would-be decision is logged and counted. For trying a policy
    /// on live traffic before enforcing it.
    Shadow,
}

/// What the client is told for a denial. Forbidden details name rules, owners or delegations:
/// they go to the log only, the client gets a fixed text. Other reasons describe the request
/// itself (a bad path, a body too large) and are passed on.
pub fn client_reason(reason: &DenyReason) -> DenyReason {
    match reason {
        DenyReason::Forbidden(_) => {
            DenyReason::Forbidden("the caller is not allowed to perform this request".into())
        }
        other => other.clone(),
    }
}

/// At most this many entities are named in a decision line; the rest are counted.
const LOGGED_ENTITIES: usize = 10;

/// `[read Room1, write Room2, read idPattern:"^Room.*", ... (+5 more)]`: what a request touches,
/// short enough for one log line. Values are quoted when they hold anything but plain
/// id characters, so a crafted id can't forge log fields.
pub fn summarize_accesses(accesses: &[Access]) -> String {
    let mut items: Vec<String> = accesses
        .iter()
        .take(LOGGED_ENTITIES)
        .map(|a| {
            let action = a.action.as_str();
            let entity = match &a.entity {
                EntitySelector::Id(id) => quoted_if_needed(id),
                EntitySelector::IdPattern(p) => {
                    format!("idPattern:{}", crate::log_text::bounded_debug(p))
                }
                EntitySelector::Any => "*".into(),
            };
            format!("{action} {entity}")
        })
        .collect();
    if accesses.len() > LOGGED_ENTITIES {
        items.push(format!("... (+{} more)", accesses.len() - LOGGED_ENTITIES));
    }
    format!("[{}]", items.join(", "))
}

fn quoted_if_needed(value: &str) -> String {
    let value = &*crate::log_text::bounded(value);
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.'));
    if plain {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Action, AttributeSelector, Tenant, TypeSelector};

    fn access(action: Action, id: &str) -> Access {
        Access {
            action,
            entity: EntitySelector::Id(id.into()),
            entity_type: TypeSelector::Any,
            attributes: AttributeSelector::All,
            tenant: Tenant::default(),
            endpoint: None,
        }
    }

    #[test]
    fn forbidden_details_never_reach_the_client() {
        let r = client_reason(&DenyReason::Forbidden(
            "denied by rule 'secret-rule'".into(),
        ));
        assert!(!r.ngsi_body().contains("secret-rule"));
        assert_eq!(r.status(), 403);
        let bad = DenyReason::BadRequest("path has dot segments".into());
        assert_eq!(client_reason(&bad), bad);
    }

    #[test]
    fn summary_caps_and_quotes() {
        let mut list: Vec<Access> = (0..12)
            .map(|i| access(Action::Read, &format!("Room{i}")))
            .collect();
        list[0] = access(Action::Write, "evil\" by=\"x");
        let s = summarize_accesses(&list);
        assert!(
            s.starts_with(r#"[write "evil\" by=\"x", read Room1,"#),
            "{s}"
        );
        assert!(s.ends_with("... (+2 more)]"), "{s}");
    }
}
