//! The vocabulary shared by the request models (NGSI v2, NGSI-LD, FogFlow NGSI9/10, MQTT) and
//! the ACL engine: what one request touches, as a list of [`Access`]es. A model turns a request
//! into accesses (or refuses it); the engine decides on the accesses; neither knows the other's
//! insides.

use serde::{Deserialize, Serialize};

/// What is done. Every endpoint maps to exactly these; anything else is not classified and
/// is refused by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Read,
    /// Change attributes of an existing entity (update, append, replace attributes).
    Write,
    Create,
    Delete,
    /// Create or change a subscription (including its notification endpoint).
    Subscribe,
    /// Create or change a registration (context provider, NGSI9 registerContext).
    Register,
}

impl Action {
    /// The action's lowercase name (`read`, `write`, ...), as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::Create => "create",
            Action::Delete => "delete",
            Action::Subscribe => "subscribe",
            Action::Register => "register",
        }
    }
}

/// Which entities an access reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntitySelector {
    /// One entity by id.
    Id(String),
    /// Every entity whose id matches a pattern (NGSI v2 `idPattern` / LD `idPattern` / NGSI10
    /// `isPattern: true`: a regular expression as the client sent it).
    IdPattern(String),
    /// No id restriction (list queries, type-only subscriptions): every entity the other
    /// selectors allow.
    Any,
}

/// Which entity types an access reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeSelector {
    Type(String),
    /// A regular expression (`typePattern`).
    Pattern(String),
    /// The request does not name a type: it may reach any.
    Any,
}

/// Which attributes an access reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributeSelector {
    /// These attributes only (names as the broker stores them).
    Only(Vec<String>),
    /// Every attribute (no `attrs` restriction, or a whole-entity operation).
    All,
}

impl AttributeSelector {
    /// How many names an access with this selector carries, for the request caps: `All` (or
    /// an empty list) counts one.
    pub fn weight(&self) -> usize {
        match self {
            AttributeSelector::Only(names) => names.len().max(1),
            AttributeSelector::All => 1,
        }
    }
}

/// The tenant (Orion's `fiware-service`) and service path (`fiware-servicepath`), canonical:
/// service lowercased as Orion treats it; service paths absolute, without a trailing slash.
/// A read without a service path covers the whole tree (`/#`); Orion's default for writes is `/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Empty for the default tenant.
    pub service: String,
    /// One or more paths; a path ending in `/#` covers its subtree.
    pub service_paths: Vec<String>,
}

impl Default for Tenant {
    fn default() -> Self {
        Tenant {
            service: String::new(),
            service_paths: vec!["/".into()],
        }
    }
}

/// One thing a request does to some entities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub action: Action,
    pub entity: EntitySelector,
    pub entity_type: TypeSelector,
    pub attributes: AttributeSelector,
    pub tenant: Tenant,
    /// Where a subscription sends notifications (`notification.http.url`, LD `endpoint.uri`,
    /// NGSI10 `reference`), or a registration's provider URL: a rule may restrict it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Everything one request touches. A batch with N entities is N accesses; a request is allowed
/// only if every access is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAccess {
    /// The dialect and endpoint, for logs (e.g. `ngsi-v2 POST /v2/op/update`).
    pub operation: String,
    pub accesses: Vec<Access>,
}

#[cfg(test)]
mod tests {
    use super::Action;

    #[test]
    fn action_names_are_serdes() {
        for a in [
            Action::Read,
            Action::Write,
            Action::Create,
            Action::Delete,
            Action::Subscribe,
            Action::Register,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
    }
}
