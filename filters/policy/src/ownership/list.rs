//! Filtering a list answer to what the caller may read, sans-IO: the request is widened so
//! the owner attributes come back ([`Ownership::list_plan`]), the answer is parsed
//! ([`ListFilter::parse`]), every listed entity's record is resolved (embedded in the entity
//! with a broker source, cached, or looked up in the registry: [`ListFilter::lookups`]), and
//! the answer is rewritten with the readable entities only ([`ListFilter::finish`]).
//!
//! An answer filtering leaves as it is (every entity readable, nothing to strip) is passed as
//! it came: no new body, no header touched ([`Filtered::header_edits`]). A list request that
//! can only return entities the caller may read is not filtered at all: its answer is not even
//! held ([`Ownership::settle_list`]).

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use super::wire::{self, AttrsIn, Endpoint, ListFormat, Listed};
use super::{EntityKey, Ownership, Record, Resolve, Verdict};
use crate::access::{Action, EntitySelector, RequestAccess};
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
    /// The new body; None: the answer goes as it came (nothing removed or stripped).
    pub body: Option<Vec<u8>>,
    pub kept: usize,
    pub total: usize,
}

/// The count headers a list answer may carry (NGSI v2, NGSI-LD).
pub const COUNT_HEADERS: [&str; 2] = ["fiware-total-count", "ngsild-results-count"];

impl Filtered {
    /// The response header changes the filtered answer needs (Some: set to this value, None:
    /// remove), given the answer's `header(name)`: each count header kept true (see
    /// [`wire::filtered_count`]), and `content-length` set to the new body's length when the
    /// body changed (an answer without one is framed by the host). A header that keeps its
    /// value is not named, so an untouched answer needs no change at all.
    pub fn header_edits<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Vec<(&'static str, Option<String>)> {
        let mut edits = Vec::new();
        for name in COUNT_HEADERS {
            let Some(value) = header(name) else {
                continue;
            };
            // A count that is not text can't be a number: it is dropped like an unparsable one.
            let new = std::str::from_utf8(value)
                .ok()
                .and_then(|v| wire::filtered_count(Some(v), self.total, self.kept));
            if new.as_deref().map(str::as_bytes) != Some(value) {
                edits.push((name, new));
            }
        }
        if let (Some(body), Some(length)) = (&self.body, header("content-length")) {
            let new = body.len().to_string();
            if new.as_bytes() != length {
                edits.push(("content-length", Some(new)));
            }
        }
        edits
    }
}

impl Ownership {
    /// A list request's verdict as [`Ownership::evaluate`] gave it, settled: when the answer
    /// provably holds nothing the caller may not read, the request is allowed without
    /// filtering (the answer is not held, let alone rewritten). That is so when every access
    /// reads entities named by id (no pattern, no "every entity": the broker returns no other
    /// id, and a listed entity is keyed by the request's tenant and its id) and the caller
    /// may read each of them by what is known without a callout: a cached answer of a source
    /// or the static map, as [`Ownership::resolve`] finds them, which is what a GET of each
    /// entity alone is decided by. Anything else (an id no known record lets the caller read,
    /// one a source would have to be asked about, a pattern) keeps the answer filtered, as
    /// before. `now` is the cache's clock.
    pub fn settle_list(
        &mut self,
        verdict: Verdict,
        identity: Option<&Identity>,
        req: &RequestAccess,
        now: u64,
    ) -> Verdict {
        if !verdict.filter_list || !verdict.decision.is_allowed() || req.accesses.is_empty() {
            return verdict;
        }
        let mut by = BTreeSet::new();
        for a in &req.accesses {
            let (Action::Read, EntitySelector::Id(id)) = (a.action, &a.entity) else {
                return verdict;
            };
            let key = EntityKey::new(a.tenant.service.clone(), id.clone());
            let Resolve::Known(Some(record)) = self.resolve(&key, 0, now, false) else {
                return verdict;
            };
            let Some(why) = record.read_by(identity) else {
                return verdict;
            };
            by.insert(why);
        }
        let by = by.into_iter().collect::<Vec<_>>().join(", ");
        Verdict::allow(format!(
            "a list of ids the caller may each read ({by}): the answer is not filtered"
        ))
    }

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
