//! The pure policy core shared by every filter: identity, decisions with reasons, and (as they
//! arrive) token verification, NGSI request models, ACLs and ownership rules.
//!
//! No proxy-wasm, no I/O, no clock: time and fetched data are passed in, so everything here is
//! tested natively and behaves the same inside Envoy.

pub mod access;
pub mod acl;
pub mod cache;
pub mod client_credentials;
pub mod config_error;
pub mod credentials;
pub mod decision;
pub mod decision_cache;
pub mod decision_line;
pub mod device_keys;
pub mod device_registry;
pub mod enforcement;
pub mod entity_acl;
pub mod header_pairs;
pub mod identity;
pub mod identity_headers;
pub mod introspection;
pub mod jwt;
pub mod log_text;
pub mod lookups;
pub mod mqtt;
pub mod mqtt_acl;
pub mod mtls;
pub mod ngsi;
pub mod notification_endpoint;
pub mod ownership;
pub mod routes;
pub mod strict_json;
pub mod token_auth;
pub mod upstream;
pub mod websocket;

pub use decision::{Decision, DenyReason};
pub use identity::{Identity, IdentityKind};
