//! Filtering a list answer to what the caller may read, sans-IO: the request is widened so
//! the owner attributes come back ([`Ownership::list_plan`]), the answer is parsed
//! ([`ListFilter::parse`]), every listed entity's record is resolved (embedded in the entity
//! with a broker source, cached, or looked up in the registry: [`ListFilter::lookups`]), and
//! the answer is rewritten with the readable entities only ([`ListFilter::finish`]).

use std::collections::HashMap;

use serde_json::Value;

use super::wire::{self, AttrsIn, Endpoint, ListFormat, Listed};
use super::{EntityKey, Ownership, Record, Resolve};
use crate::identity::Identity;

/// How a list request goes upstream, and what to strip from its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPlan {
    pub format: ListFormat,
    /// Attributes added to the request, removed from every listed entity.
    pub strip: Vec<String>,
    /// The new `:path` (an `attrs` query widened), if it changed.
    pub new_path: Option<String>,
    /// The new body (an `attrs` member widened), if it changed.
    pub new_body: Option<Vec<u8>>,
}

/// A parsed list answer being filtered.
#[derive(Debug, Clone)]
pub struct ListFilter {
    format: ListFormat,
    strip: Vec<String>,
    doc: Value,
    listed: Listed,
    /// Per listed entity: provably out of scope by its type, passed as is.
    out_of_scope: Vec<bool>,
}

/// A filtered answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    pub body: Vec<u8>,
    pub kept: usize,
    pub total: usize,
}

impl Ownership {
    /// The plan for a list request to `endpoint` (None: not a list endpoint). With a broker
    /// source, an attribute restriction that leaves out the owner attributes is widened so
    /// they come back (and are stripped again).
    pub fn list_plan(&self, endpoint: &Endpoint, path: &str, body: &[u8]) -> Option<ListPlan> {
        let (format, attrs_in) = endpoint.list?;
        let mut plan = ListPlan {
            format,
            strip: Vec::new(),
            new_path: None,
            new_body: None,
        };
        if self.broker().is_none() {
            return Some(plan);
        }
        let names = [
            self.config.owner_attribute.as_str(),
            self.config.delegations_attribute.as_str(),
        ];
        match attrs_in {
            AttrsIn::Query => {
                if let Some((path, added)) = wire::widen_attrs_path(path, &names) {
                    plan.new_path = Some(path);
                    plan.strip = added;
                }
            }
            AttrsIn::Body(member) => {
                if let Some((body, added)) = wire::widen_attrs_body(body, member, &names) {
                    plan.new_body = Some(body);
                    plan.strip = added;
                }
            }
        }
        Some(plan)
    }
}

impl ListFilter {
    /// Parses a list answer (`ld_context`: the request carried its own JSON-LD context, so
    /// types can't be proved out of scope).
    pub fn parse(
        own: &Ownership,
        format: ListFormat,
        strip: Vec<String>,
        body: &[u8],
        ld_context: bool,
    ) -> Result<Self, String> {
        let c = own.config();
        let (doc, listed) =
            wire::list_entities(format, body, &c.owner_attribute, &c.delegations_attribute)?;
        let out_of_scope = wire::list_items(format, &doc)
            .map(|items| {
                items
                    .into_iter()
                    .map(|e| own.listed_out_of_scope(format, e, ld_context))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ListFilter {
            format,
            strip,
            doc,
            listed,
            out_of_scope,
        })
    }

    fn passed_as_is(&self, i: usize) -> bool {
        self.out_of_scope.get(i).copied().unwrap_or(false)
    }

    /// Resolves what it can of the listed entities of tenant `service` into `records`, and
    /// returns the registry lookups still needed (entity, source index), each once. More than
    /// `max_list_lookups`, or an entity whose embedded owner can't be read, is an error (the
    /// answer is refused with 503).
    pub fn lookups(
        &self,
        own: &mut Ownership,
        service: &str,
        records: &mut HashMap<EntityKey, Option<Record>>,
        now: u64,
    ) -> Result<Vec<(EntityKey, usize)>, String> {
        let mut to_fetch: Vec<(EntityKey, usize)> = Vec::new();
        for (i, (id, embedded)) in self.listed.iter().enumerate() {
            if self.passed_as_is(i) {
                continue;
            }
            let key = EntityKey::new(service, id.clone());
            if records.contains_key(&key) {
                continue;
            }
            match own.resolve_listed(&key, embedded, 0, now) {
                Ok(Resolve::Known(r)) => {
                    records.insert(key, r);
                }
                Ok(Resolve::Fetch(source)) => {
                    if !to_fetch.iter().any(|(k, _)| *k == key) {
                        to_fetch.push((key, source));
                    }
                }
                Err(e) => return Err(format!("entity {id:?}: {e}")),
            }
        }
        let max = own.config().max_list_lookups;
        if to_fetch.len() > max {
            return Err(format!(
                "{} lookups needed, more than max_list_lookups {max}",
                to_fetch.len()
            ));
        }
        Ok(to_fetch)
    }

    /// The answer with only the entities `identity` may read (and those out of scope), the
    /// added attributes stripped. An entity without a record in `records` is left out.
    pub fn finish(
        self,
        identity: Option<&Identity>,
        service: &str,
        records: &HashMap<EntityKey, Option<Record>>,
    ) -> Result<Filtered, String> {
        let keep: Vec<bool> = self
            .listed
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                self.passed_as_is(i)
                    || records
                        .get(&EntityKey::new(service, id.clone()))
                        .and_then(Option::as_ref)
                        .is_some_and(|r| r.read_by(identity).is_some())
            })
            .collect();
        let total = keep.len();
        let (body, kept) = wire::filter_list(self.format, self.doc, &keep, &self.strip)?;
        Ok(Filtered { body, kept, total })
    }
}
