//! Scope: which entities device-ownership decides. Entities out of scope are left to the next
//! filter (entity-acl) untouched, without a lookup.
//!
//! An entity is in scope when it matches every dimension the configuration names (`scope`
//! absent: every entity, as before): its type is in `entity_types`, its service path is in
//! `service_paths` (`/a/#` is `/a` and its subtree, as Orion reads it), its tenant in
//! `services`. A request is out of scope only when every entity it can reach provably is, and
//! anything not provable counts as in scope (fail closed):
//!
//! * NGSI10 (FogFlow, Orion's v1): always in scope. FogFlow keys entities by id alone and
//!   ignores types and tenants, so nothing in the request proves where the entity lives.
//! * NGSI v2 (Orion): tenant by `fiware-service`; service path by `fiware-servicepath` (a
//!   read without it is `/#`, the whole tree: in scope); type by `type` (query or body) or a
//!   `typePattern` that is provably one literal. No type, or another pattern, is in scope.
//!   Orion keys entities by id, type and service path, so `?type=Other` never reaches a `Lamp`.
//! * NGSI-LD: tenant by `NGSILD-Tenant`. Service paths are not NGSI-LD (brokers may ignore
//!   the header): that dimension never proves anything. Types are compared by their local name
//!   (after the last `/`, `#` or `:`, so `Lamp`, `ngsi-ld:Lamp` and `https://…/Lamp` are
//!   alike), and only for queries and subscriptions (not for operations by id: NGSI-LD brokers
//!   key entities by id alone) of a request without its own JSON-LD context (a `Link` header,
//!   an `@context` in the body, a `jsonldContext` parameter): a context may map any short
//!   name to a scoped type.
//!
//! A request touching anything in scope is decided whole, as without scope. In a list answer
//! to such a request, each entity whose type (as the answer gives it) is provably out of
//! scope is passed as is; the others are filtered by ownership.

use std::collections::BTreeSet;

use serde_json::Value;

use super::config::ScopeConfig;
use super::wire::{Dialect, ListFormat};
use crate::access::{Access, EntitySelector, RequestAccess, TypeSelector};
use crate::acl::{literal_regex, ServicePath};

/// A compiled `scope`.
#[derive(Debug, Clone)]
pub struct Scope {
    /// NGSI v2 types, exact.
    types: Option<BTreeSet<String>>,
    /// The local names of the same types, for NGSI-LD.
    local_names: Option<BTreeSet<String>>,
    service_paths: Option<Vec<ServicePath>>,
    services: Option<BTreeSet<String>>,
}

/// What the request says beyond its accesses.
#[derive(Debug, Clone, Copy)]
pub struct ScopeInput {
    pub dialect: Dialect,
    /// The request carries its own JSON-LD context ([`carries_ld_context`]).
    pub ld_context: bool,
}

/// The local name of an NGSI-LD type: what follows the last `/`, `#` or `:`.
fn local_name(t: &str) -> &str {
    t.rsplit(['/', '#', ':']).next().unwrap_or(t)
}

/// True if an NGSI-LD request brings a JSON-LD context of its own (then its short names may
/// expand to anything).
pub fn carries_ld_context(headers: &[(String, String)], path: &str, body: &[u8]) -> bool {
    headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("link"))
        || path.contains("jsonldContext")
        || body.windows(b"@context".len()).any(|w| w == b"@context")
}

fn non_empty<'a>(
    list: &'a Option<Vec<String>>,
    what: &str,
) -> Result<Option<&'a [String]>, String> {
    match list {
        None => Ok(None),
        Some(l) if l.is_empty() => Err(format!(
            "scope.{what} must not be empty (leave it out to mean every {what})"
        )),
        Some(l) => Ok(Some(l.as_slice())),
    }
}

impl Scope {
    /// Validates and compiles a `scope`; every error names what is wrong.
    pub fn compile(cfg: &ScopeConfig) -> Result<Scope, String> {
        let types = non_empty(&cfg.entity_types, "entity_types")?;
        let paths = non_empty(&cfg.service_paths, "service_paths")?;
        let services = non_empty(&cfg.services, "services")?;
        if types.is_none() && paths.is_none() && services.is_none() {
            return Err(
                "scope must name entity_types, service_paths or services (leave scope \
                 out to apply ownership to every entity)"
                    .into(),
            );
        }
        if let Some(types) = types {
            for t in types {
                if t.is_empty() || t.chars().any(|c| c.is_control()) || local_name(t).is_empty() {
                    return Err(format!("scope.entity_types: {t:?} is not an entity type"));
                }
            }
        }
        let service_paths = paths
            .map(|paths| {
                paths
                    .iter()
                    .map(|p| {
                        let parsed = ServicePath::parse(p)
                            .map_err(|e| format!("scope.service_paths: {e}"))?;
                        if parsed
                            .segments()
                            .iter()
                            .any(|s| !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                        {
                            return Err(format!(
                                "scope.service_paths: {p:?} may contain only alphanumerics \
                                 and underscores between '/' (and a final '/#')"
                            ));
                        }
                        Ok(parsed)
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .transpose()?;
        if let Some(services) = services {
            for s in services {
                let ok = s.len() <= 50
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(format!(
                        "scope.services: {s:?} must be a tenant name as the broker stores it \
                         (lowercase alphanumerics and '_', at most 50; \"\" is the default tenant)"
                    ));
                }
            }
        }
        Ok(Scope {
            types: types.map(|t| t.iter().cloned().collect()),
            local_names: types.map(|t| t.iter().map(|t| local_name(t).to_string()).collect()),
            service_paths,
            services: services.map(|s| s.iter().cloned().collect()),
        })
    }

    /// Why the request is out of scope (every access provably is), or None: it is decided.
    pub fn request_out(&self, req: &RequestAccess, input: ScopeInput) -> Option<&'static str> {
        if req.accesses.is_empty() {
            return None;
        }
        let mut why = None;
        for a in &req.accesses {
            why = Some(self.access_out(a, input)?);
        }
        why
    }

    /// Which dimension puts the access provably out of scope, or None.
    fn access_out(&self, a: &Access, input: ScopeInput) -> Option<&'static str> {
        if input.dialect == Dialect::Ngsi10 {
            return None;
        }
        if self
            .services
            .as_ref()
            .is_some_and(|s| !s.contains(&a.tenant.service))
        {
            return Some("its tenant is not in scope.services");
        }
        if input.dialect == Dialect::V2 && self.paths_out(&a.tenant.service_paths) {
            return Some("its service paths are not in scope.service_paths");
        }
        if self.type_out(a, input) {
            return Some("its entity type is not in scope.entity_types");
        }
        None
    }

    fn paths_out(&self, requested: &[String]) -> bool {
        let Some(scoped) = &self.service_paths else {
            return false;
        };
        !requested.is_empty()
            && requested.iter().all(|p| {
                // An unparsable path proves nothing.
                ServicePath::parse(p).is_ok_and(|p| !scoped.iter().any(|s| s.intersects(&p)))
            })
    }

    fn type_out(&self, a: &Access, input: ScopeInput) -> bool {
        let Some(types) = &self.types else {
            return false;
        };
        match input.dialect {
            Dialect::V2 => match &a.entity_type {
                TypeSelector::Type(t) => !types.contains(t),
                TypeSelector::Pattern(re) => literal_regex(re).is_some_and(|t| !types.contains(&t)),
                TypeSelector::Any => false,
            },
            Dialect::Ld => {
                let by_id = matches!(a.entity, EntitySelector::Id(_));
                match &a.entity_type {
                    TypeSelector::Type(t) if !by_id && !input.ld_context => !self.ld_type_in(t),
                    _ => false,
                }
            }
            Dialect::Ngsi10 => false,
        }
    }

    fn ld_type_in(&self, t: &str) -> bool {
        let name = local_name(t);
        name.is_empty() || self.local_names.as_ref().is_none_or(|n| n.contains(name))
    }

    /// True if an entity of a list answer is provably out of scope by its type (the request
    /// itself was in scope): v2 `type`, NGSI-LD `type` (a string or an array, every type out;
    /// not when the request brought its own context). NGSI10 entities never are.
    pub fn listed_out(&self, format: ListFormat, entity: &Value, ld_context: bool) -> bool {
        let Some(types) = &self.types else {
            return false;
        };
        let ty = entity.get("type");
        match format {
            ListFormat::V2 => ty
                .and_then(Value::as_str)
                .is_some_and(|t| !types.contains(t)),
            ListFormat::Ld if !ld_context => match ty {
                Some(Value::String(t)) => !self.ld_type_in(t),
                Some(Value::Array(all)) if !all.is_empty() => all
                    .iter()
                    .all(|t| t.as_str().is_some_and(|t| !self.ld_type_in(t))),
                _ => false,
            },
            _ => false,
        }
    }
}
