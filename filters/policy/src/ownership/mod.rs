//! Device ownership: only a device's owner, or whom the owner delegates, reads or writes the
//! entities of its device (Snap4city's "the data retrieved by the registered IoT device are only
//! accessible to the owner of the device", with its `READ_ACCESS`, `READ_WRITE` and `PUBLIC`
//! delegation kinds).
//!
//! Pure logic: configuration ([`config`]), ownership records and the decision per request
//! ([`Ownership::evaluate`]), the wire formats of the sources and the body rewriting
//! ([`wire`]). The filter (`filters/device-ownership`) runs the callouts and applies the
//! outcome; time and fetched records are passed in.
//!
//! # Records and sources
//!
//! An entity (keyed by tenant — `fiware-service` / `NGSILD-Tenant` — and entity id; service
//! paths are *not* part of the key, an id is one device per tenant) has at most one
//! [`Record`]: `{owner, delegations: [{user|group, access: read|read_write}], public}`.
//! Sources are consulted in configured order; the first that knows the entity answers
//! ([`Ownership::resolve`]). A source that fails (error, timeout, 5xx, unparsable answer) makes
//! the request fail closed with 503, even if a later source might know. Final answers are
//! cached (bounded, TTL; "nobody owns it" with the shorter `negative_ttl_secs`); errors are
//! never cached; a create never trusts a cached "nobody owns it".
//!
//! # Decision table (non-admin callers; `caller` = the identity's subject)
//!
//! | access | allowed when |
//! |---|---|
//! | any, caller has an `admin_roles` role | always (no lookup) |
//! | Read `Id` | owner, a `read` or `read_write` delegate (user, or group of the caller), or public |
//! | Read `Any`/`IdPattern` on a list endpoint | allowed; the response is filtered to readable entities |
//! | Read `Any`/`IdPattern` elsewhere (types, attributes, discovery) | 403 |
//! | Write `Id` (only ordinary attributes) | owner or `read_write` delegate |
//! | Write `Id` touching the owner/delegations attributes, or replacing all attributes | owner only |
//! | Delete `Id` (entity or attributes) | owner only |
//! | Create `Id`, nobody owns it | allowed if a source can record the owner (broker: owner attribute injected in the body; registry: claim first); the caller becomes the owner; a body setting the owner attribute to someone else → 403 |
//! | Create `Id`, already owned | upsert (Create + Write in one request): decided as the Write; plain create: owner only |
//! | Subscribe `Id` | read on the entity |
//! | Register `Id` | owner only |
//! | Write/Delete/Subscribe/Register with `IdPattern`/`Any` | 403 (notifications and pattern writes can't be filtered per entity) |
//! | any other access to an entity nobody owns | 403 (unowned data is not readable by default) |
//!
//! Devices (identity kind `device_key` / `client_certificate`) may Write only the entity whose
//! id is `device_entity_id` with `{device}` replaced by their subject, without a lookup (an
//! upsert of it counts as that write, and is not claimed); they never create, delete,
//! subscribe, register or touch the owner/delegations attributes. Their reads follow the
//! table. A request without identity (a public route token-auth let through) may only read
//! public entities.

pub mod calls;
pub mod config;
pub mod list;
pub mod scope;
pub mod wire;

#[cfg(test)]
mod stage_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::access::{Access, Action, AttributeSelector, EntitySelector, RequestAccess};
use crate::cache::{CacheStats, VerdictCache};
use crate::decision::{Decision, DenyReason};
use crate::identity::{Identity, IdentityKind};

pub use calls::{graver, Lookup};
pub use config::{OwnershipConfig, SourceConfig};
pub use list::{Filtered, ListFilter, ListPlan};
pub use scope::{Scope, ScopeInput};

/// What a delegate may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DelegatedAccess {
    /// Snap4city `READ_ACCESS`.
    Read,
    /// Snap4city `READ_WRITE`.
    ReadWrite,
}

impl DelegatedAccess {
    /// `read` / `read_write`, or Snap4city's `READ_ACCESS` / `READ_WRITE`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" | "READ_ACCESS" => Some(DelegatedAccess::Read),
            "read_write" | "READ_WRITE" => Some(DelegatedAccess::ReadWrite),
            _ => None,
        }
    }
}

/// Who a delegation is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grantee {
    User(String),
    Group(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Delegation {
    pub grantee: Grantee,
    pub access: DelegatedAccess,
}

/// Who owns an entity and whom the owner lets in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub owner: String,
    pub delegations: Vec<Delegation>,
    /// Snap4city `PUBLIC`: everyone (even without identity) may read.
    pub public: bool,
}

impl Record {
    pub fn owned_by(owner: impl Into<String>) -> Self {
        Record {
            owner: owner.into(),
            delegations: Vec::new(),
            public: false,
        }
    }

    fn delegated(&self, identity: &Identity) -> Option<DelegatedAccess> {
        self.delegations
            .iter()
            .filter(|d| match &d.grantee {
                Grantee::User(u) => *u == identity.subject,
                Grantee::Group(g) => identity.in_group(g),
            })
            .map(|d| d.access)
            .max()
    }

    fn is_owner(&self, identity: Option<&Identity>) -> bool {
        identity.is_some_and(|i| i.subject == self.owner)
    }

    /// Why `identity` may read, or None.
    pub fn read_by(&self, identity: Option<&Identity>) -> Option<&'static str> {
        if self.is_owner(identity) {
            return Some("owner");
        }
        match identity.and_then(|i| self.delegated(i)) {
            Some(DelegatedAccess::ReadWrite) => Some("read_write delegate"),
            Some(DelegatedAccess::Read) => Some("read delegate"),
            None if self.public => Some("public"),
            None => None,
        }
    }

    /// Why `identity` may write ordinary attributes, or None.
    pub fn write_by(&self, identity: Option<&Identity>) -> Option<&'static str> {
        if self.is_owner(identity) {
            return Some("owner");
        }
        match identity.and_then(|i| self.delegated(i)) {
            Some(DelegatedAccess::ReadWrite) => Some("read_write delegate"),
            _ => None,
        }
    }
}

/// An entity's identity for ownership: tenant (service) and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityKey {
    pub service: String,
    pub id: String,
}

impl EntityKey {
    pub fn new(service: impl Into<String>, id: impl Into<String>) -> Self {
        EntityKey {
            service: service.into(),
            id: id.into(),
        }
    }

    fn cache_key(&self) -> String {
        format!("{}\n{}", self.service, self.id)
    }
}

impl std::fmt::Display for EntityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.service.is_empty() {
            write!(f, "{:?}", self.id)
        } else {
            write!(f, "{}/{:?}", self.service, self.id)
        }
    }
}

/// The next step to find an entity's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolve {
    /// The answer: the record, or None (no source knows the entity).
    Known(Option<Record>),
    /// Ask remote source `index` (broker or registry); on "unknown" continue from `index + 1`.
    Fetch(usize),
}

/// The outcome of [`Ownership::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eval {
    /// Records of these entities are needed (`fresh`: a create — don't trust a cached
    /// "nobody owns it").
    Need(Vec<(EntityKey, bool)>),
    Done(Verdict),
}

/// A final decision and what the filter must do with an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Entities this request creates (nobody owned them): the caller becomes the owner — the
    /// filter claims them (registry) and injects the owner attribute (broker source).
    pub new_entities: Vec<EntityKey>,
    /// Entities whose cached record this request may change (create, delete, owner change).
    pub invalidate: Vec<EntityKey>,
    /// The response is a list to filter to what the caller may read.
    pub filter_list: bool,
}

impl Verdict {
    fn deny(reason: DenyReason) -> Self {
        Verdict {
            decision: Decision::Deny(reason),
            new_entities: Vec::new(),
            invalidate: Vec::new(),
            filter_list: false,
        }
    }

    fn allow(by: impl Into<String>) -> Self {
        Verdict {
            decision: Decision::Allow(by.into()),
            new_entities: Vec::new(),
            invalidate: Vec::new(),
            filter_list: false,
        }
    }
}

fn forbidden(msg: impl Into<String>) -> DenyReason {
    DenyReason::Forbidden(msg.into())
}

/// The ownership engine: validated configuration, the static map, the lookup cache.
pub struct Ownership {
    config: OwnershipConfig,
    statics: HashMap<EntityKey, Record>,
    cache: VerdictCache<Option<Record>>,
    scope: Option<Scope>,
}

impl Ownership {
    /// Validates the configuration (every error names what is wrong).
    pub fn new(config: OwnershipConfig) -> Result<Self, String> {
        let statics = config.validate()?;
        if config.scope.is_some() && config.broker == crate::ngsi::Broker::FogFlow {
            // FogFlow keys entities by id alone and ignores types and tenants: nothing in a
            // request proves an entity out of scope.
            return Err(
                "scope can't be used with broker \"fogflow\" (FogFlow keys entities by \
                 id alone, so no request is provably out of scope)"
                    .into(),
            );
        }
        let scope = config.scope.as_ref().map(Scope::compile).transpose()?;
        let cache = VerdictCache::new(config.cache.max_entries);
        Ok(Ownership {
            config,
            statics,
            cache,
            scope,
        })
    }

    /// Why the request is outside the configured scope (it then passes untouched, without a
    /// lookup), or None: ownership decides it. See [`scope`].
    pub fn out_of_scope(&self, req: &RequestAccess, input: ScopeInput) -> Option<String> {
        let why = self.scope.as_ref()?.request_out(req, input)?;
        Some(format!("out of scope: {why}"))
    }

    /// True if an entity of a list answer is provably out of scope by its type: it is passed
    /// as is (see [`Scope::listed_out`]).
    pub fn listed_out_of_scope(
        &self,
        format: wire::ListFormat,
        entity: &serde_json::Value,
        ld_context: bool,
    ) -> bool {
        self.scope
            .as_ref()
            .is_some_and(|s| s.listed_out(format, entity, ld_context))
    }

    pub fn config(&self) -> &OwnershipConfig {
        &self.config
    }

    /// The request headers this engine reads (they must be text; see
    /// [`crate::enforcement::ngsi_filter_reads_header`]).
    pub fn reads_header(&self, name: &str) -> bool {
        crate::enforcement::ngsi_filter_reads_header(&self.config.identity_headers, name)
            // With a scope, an NGSI-LD `Link` (a JSON-LD context) keeps types in scope.
            || (self.scope.is_some() && name.eq_ignore_ascii_case("link"))
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The admin role `identity` holds, if any.
    pub fn admin_role<'a>(&'a self, identity: Option<&Identity>) -> Option<&'a str> {
        let identity = identity?;
        self.config
            .admin_roles
            .iter()
            .find(|r| identity.has_role(r))
            .map(String::as_str)
    }

    /// True if some source records the owner of a new entity (broker or registry).
    pub fn can_record_owner(&self) -> bool {
        self.config
            .sources
            .iter()
            .any(|s| !matches!(s, SourceConfig::Static { .. }))
    }

    /// The configured registry source, if any (claims go there).
    pub fn registry(&self) -> Option<(usize, &SourceConfig)> {
        self.config
            .sources
            .iter()
            .enumerate()
            .find(|(_, s)| matches!(s, SourceConfig::Registry { .. }))
    }

    /// The client-credentials grant that authenticates calls to source `source` (None: they
    /// are not authenticated by the filter).
    pub fn source_auth(
        &self,
        source: usize,
    ) -> Option<&crate::client_credentials::ClientCredentials> {
        match self.config.sources.get(source)? {
            SourceConfig::Registry(registry) => {
                registry.auth.as_ref().map(|a| &a.client_credentials)
            }
            _ => None,
        }
    }

    /// The configured broker source, if any.
    pub fn broker(&self) -> Option<(usize, &SourceConfig)> {
        self.config
            .sources
            .iter()
            .enumerate()
            .find(|(_, s)| matches!(s, SourceConfig::Broker { .. }))
    }

    /// Where to look for `key`'s record, starting at source `from`. From 0, a cached final
    /// answer is used (a cached "nobody" only if `!fresh`).
    pub fn resolve(&mut self, key: &EntityKey, from: usize, now: u64, fresh: bool) -> Resolve {
        if from == 0 {
            if let Some(cached) = self.cache.get(&key.cache_key(), now) {
                if cached.is_some() || !fresh {
                    return Resolve::Known(cached);
                }
            }
        }
        for (i, source) in self.config.sources.iter().enumerate().skip(from) {
            match source {
                SourceConfig::Static { .. } => {
                    if let Some(r) = self.statics.get(key) {
                        return Resolve::Known(Some(r.clone()));
                    }
                }
                _ => return Resolve::Fetch(i),
            }
        }
        Resolve::Known(None)
    }

    /// Like [`Ownership::resolve`] for an entity listed in a response: the broker source
    /// answers from the entity's own attributes (`embedded`, as [`wire::embedded_record`]
    /// read them), the registry from the cache or a fetch.
    pub fn resolve_listed(
        &mut self,
        key: &EntityKey,
        embedded: &Result<Option<Record>, String>,
        from: usize,
        now: u64,
    ) -> Result<Resolve, String> {
        for (i, source) in self.config.sources.iter().enumerate().skip(from) {
            match source {
                SourceConfig::Static { .. } => {
                    if let Some(r) = self.statics.get(key) {
                        return Ok(Resolve::Known(Some(r.clone())));
                    }
                }
                SourceConfig::Broker { .. } => match embedded {
                    Ok(Some(r)) => return Ok(Resolve::Known(Some(r.clone()))),
                    Ok(None) => {}
                    Err(e) => return Err(e.clone()),
                },
                SourceConfig::Registry { .. } => {
                    if let Some(cached) = self.cache.get(&key.cache_key(), now) {
                        return Ok(Resolve::Known(cached));
                    }
                    return Ok(Resolve::Fetch(i));
                }
            }
        }
        Ok(Resolve::Known(None))
    }

    /// Caches a final answer (TTL, or the negative TTL for "nobody").
    pub fn remember(&mut self, key: &EntityKey, record: &Option<Record>, now: u64) {
        let ttl = if record.is_some() {
            self.config.cache.ttl_secs
        } else {
            self.config.cache.negative_ttl_secs
        };
        self.cache
            .insert(&key.cache_key(), record.clone(), now, ttl, None);
    }

    /// Drops a cached answer (after a create, delete or owner change went to the broker).
    pub fn forget(&mut self, key: &EntityKey) {
        self.cache.remove(&key.cache_key());
    }

    /// The entity id a device identity may write.
    pub fn device_entity(&self, identity: &Identity) -> String {
        self.config
            .device_entity_id
            .replace("{device}", &identity.subject)
    }

    fn is_ownership_attr(&self, a: &Access) -> bool {
        match &a.attributes {
            AttributeSelector::All => true,
            AttributeSelector::Only(names) => names.iter().any(|n| {
                *n == self.config.owner_attribute || *n == self.config.delegations_attribute
            }),
        }
    }

    /// Decides a classified request. `list` says the endpoint returns a list of entities the
    /// filter can filter. `records` holds what was resolved so far; until every entity the
    /// decision depends on is there, the answer is [`Eval::Need`].
    pub fn evaluate(
        &self,
        identity: Option<&Identity>,
        req: &RequestAccess,
        list: bool,
        records: &HashMap<EntityKey, Option<Record>>,
    ) -> Eval {
        if let Some(role) = self.admin_role(identity) {
            return Eval::Done(Verdict::allow(format!("admin role {role:?}")));
        }
        if req.accesses.is_empty() {
            return Eval::Done(Verdict::allow("touches no entity data"));
        }
        let device = identity.filter(|i| {
            matches!(
                i.kind,
                IdentityKind::DeviceKey | IdentityKind::ClientCertificate
            )
        });
        // Pass 1: what needs no record, and which records are needed.
        let mut needed: BTreeMap<EntityKey, bool> = BTreeMap::new();
        let mut filter_list = false;
        let mut by_key: BTreeMap<EntityKey, BTreeSet<Action>> = BTreeMap::new();
        // The ids the request writes, once: a device's create must come with a write of the
        // same entity (an upsert), checked per access without rescanning the request.
        let written: HashSet<&str> = req
            .accesses
            .iter()
            .filter(|b| b.action == Action::Write)
            .filter_map(|b| match &b.entity {
                EntitySelector::Id(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        for a in &req.accesses {
            let id = match &a.entity {
                EntitySelector::Id(id) => id,
                other => {
                    let what = match other {
                        EntitySelector::IdPattern(p) => format!("idPattern {p:?}"),
                        _ => "every entity".to_string(),
                    };
                    if a.action == Action::Read && list {
                        filter_list = true;
                        continue;
                    }
                    return Eval::Done(Verdict::deny(forbidden(format!(
                        "{:?} on {what}: ownership is decided per entity id",
                        a.action
                    ))));
                }
            };
            if a.action == Action::Read && list {
                // Listed entities are filtered in the response.
                filter_list = true;
                continue;
            }
            let key = EntityKey::new(a.tenant.service.clone(), id.clone());
            if let Some(d) = device {
                if a.action == Action::Read || a.action == Action::Subscribe {
                    // Reads follow ownership.
                } else {
                    let own = self.device_entity(d);
                    let ok = matches!(a.action, Action::Write | Action::Create)
                        && *id == own
                        && !self.is_ownership_attr(a)
                        && (a.action == Action::Write || written.contains(id.as_str()));
                    if !ok {
                        return Eval::Done(Verdict::deny(forbidden(format!(
                            "device {:?} may only write its own entity {own:?}, not {:?} {}",
                            d.subject, a.action, key
                        ))));
                    }
                    continue;
                }
            }
            if identity.is_none() && a.action != Action::Read {
                return Eval::Done(Verdict::deny(forbidden(format!(
                    "anonymous {:?} on {key}: only public entities may be read without identity",
                    a.action
                ))));
            }
            let fresh = a.action == Action::Create;
            let e = needed.entry(key.clone()).or_insert(false);
            *e |= fresh;
            by_key.entry(key).or_default().insert(a.action);
        }
        let missing: Vec<(EntityKey, bool)> = needed
            .iter()
            .filter(|(k, _)| !records.contains_key(*k))
            .map(|(k, f)| (k.clone(), *f))
            .collect();
        if !missing.is_empty() {
            return Eval::Need(missing);
        }
        // Pass 2: every access against its record.
        let mut reasons: BTreeSet<String> = BTreeSet::new();
        let mut new_entities = Vec::new();
        let mut invalidate = Vec::new();
        for a in &req.accesses {
            let EntitySelector::Id(id) = &a.entity else {
                continue;
            };
            let key = EntityKey::new(a.tenant.service.clone(), id.clone());
            if !needed.contains_key(&key) {
                if device.is_some() && a.action != Action::Read {
                    reasons.insert("device writes its own entity".into());
                }
                continue;
            }
            if a.action == Action::Read && list {
                continue;
            }
            let record = records.get(&key).and_then(Option::as_ref);
            let actions = by_key.get(&key).cloned().unwrap_or_default();
            match self.check(identity, a, &key, record, &actions) {
                Ok(Check::Allowed(why)) => {
                    reasons.insert(why.to_string());
                }
                Ok(Check::Creates) => {
                    if !self.can_record_owner() {
                        return Eval::Done(Verdict::deny(forbidden(format!(
                            "{key} has no owner and no configured source can record one"
                        ))));
                    }
                    reasons.insert("new entity: the creator becomes its owner".into());
                    if !new_entities.contains(&key) {
                        new_entities.push(key.clone());
                    }
                }
                Err(reason) => return Eval::Done(Verdict::deny(reason)),
            }
            let changes = matches!(a.action, Action::Create | Action::Delete)
                || (a.action == Action::Write && self.is_ownership_attr(a));
            if changes && !invalidate.contains(&key) {
                invalidate.push(key);
            }
        }
        if filter_list {
            reasons.insert("list filtered to readable entities".into());
        }
        let by = reasons.into_iter().collect::<Vec<_>>().join(", ");
        Eval::Done(Verdict {
            decision: Decision::Allow(by),
            new_entities,
            invalidate,
            filter_list,
        })
    }

    fn check(
        &self,
        identity: Option<&Identity>,
        a: &Access,
        key: &EntityKey,
        record: Option<&Record>,
        actions: &BTreeSet<Action>,
    ) -> Result<Check, DenyReason> {
        // Who asks, as a denial names them: rendered only into a denial (an allowed request,
        // nearly every one, never formats it).
        let who = || identity.map_or("anonymous".to_string(), |i| format!("{:?}", i.subject));
        let Some(r) = record else {
            if actions.contains(&Action::Create) {
                return Ok(Check::Creates);
            }
            return Err(forbidden(format!(
                "{key} has no owner: {} may not {:?} it",
                who(),
                a.action
            )));
        };
        let denied = |what: &str| {
            forbidden(format!(
                "{} may not {what} {key} (owner {:?})",
                who(),
                r.owner
            ))
        };
        let owner_only = |what: &str| {
            if r.is_owner(identity) {
                Ok(Check::Allowed("owner"))
            } else {
                Err(denied(what))
            }
        };
        match a.action {
            Action::Read | Action::Subscribe => {
                r.read_by(identity).map(Check::Allowed).ok_or_else(|| {
                    denied(if a.action == Action::Read {
                        "read"
                    } else {
                        "subscribe to"
                    })
                })
            }
            Action::Write if self.is_ownership_attr(a) => {
                owner_only("change the owner/delegations of (or replace all attributes of)")
            }
            Action::Write => r
                .write_by(identity)
                .map(Check::Allowed)
                .ok_or_else(|| denied("write")),
            Action::Create if actions.contains(&Action::Write) => {
                // An upsert of an existing entity: decided by its Write access.
                Ok(Check::Allowed("upsert of an existing entity"))
            }
            Action::Create => owner_only("create (it is owned)"),
            Action::Delete => owner_only("delete from"),
            Action::Register => owner_only("register a provider for"),
        }
    }
}

enum Check {
    Allowed(&'static str),
    Creates,
}
