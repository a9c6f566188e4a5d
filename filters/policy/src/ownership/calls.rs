//! The calls device-ownership makes to its sources, as data: which lookup a request needs
//! ([`Lookup`]), the HTTP call that asks a source ([`HttpCall`]), what its answer means, and
//! the claim of a new entity in the registry. The stage (`http_stages::device_ownership`)
//! only sends these and hands the answers back.

use std::collections::HashSet;

use super::config::BrokerApi;
use super::wire::{self, Dialect, Endpoint};
use super::{EntityKey, Ownership, Record, SourceConfig, Verdict};
use crate::access::RequestAccess;
use crate::decision::DenyReason;
use crate::identity::Identity;
use crate::upstream::HttpCall;

/// One lookup: an entity in one remote source, read with one broker API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lookup {
    pub key: EntityKey,
    /// The index of the source in `sources`.
    pub source: usize,
    pub api: BrokerApi,
}

/// Of two reasons a request must fail, the one to answer with: a definite refusal (403, e.g.
/// the registry says someone else claimed the entity) wins over an unavailable source (503);
/// otherwise the first one stays.
pub fn graver(current: Option<DenyReason>, new: DenyReason) -> DenyReason {
    match current {
        None => new,
        Some(DenyReason::Unavailable(_)) if matches!(new, DenyReason::Forbidden(_)) => new,
        Some(current) => current,
    }
}

impl Ownership {
    /// The broker API a lookup for a request of `dialect` reads with.
    pub fn lookup_api(&self, dialect: Dialect) -> BrokerApi {
        let configured = match self.broker() {
            Some((_, SourceConfig::Broker(broker))) => broker.api,
            _ => BrokerApi::Auto,
        };
        wire::broker_api(configured, dialect)
    }

    /// The call that asks source `lookup.source` for `lookup.key`'s record (None: that source
    /// is not a remote one).
    pub fn lookup_call(&self, lookup: &Lookup) -> Option<HttpCall> {
        let c = &self.config;
        let source = c.sources.get(lookup.source)?;
        let target = source.target()?;
        match source {
            SourceConfig::Broker { .. } => {
                let (path, extra) = wire::broker_lookup(
                    lookup.api,
                    &lookup.key,
                    &c.owner_attribute,
                    &c.delegations_attribute,
                );
                let mut call = target.call("GET", path);
                call.headers.extend(extra);
                Some(call)
            }
            SourceConfig::Registry(registry) => Some(
                target
                    .call("POST", registry.lookup_path.as_str().to_string())
                    .with_header("content-type", "application/json")
                    .with_header("accept", "application/json")
                    .with_body(wire::registry_lookup_body(&lookup.key).into_bytes()),
            ),
            SourceConfig::Static { .. } => None,
        }
    }

    /// What a source's answer to `lookup` says: the record, None (the source does not know
    /// the entity: ask the next one), or why it can't be trusted (the request fails closed).
    pub fn lookup_answer(
        &self,
        lookup: &Lookup,
        status: u32,
        body: &[u8],
    ) -> Result<Option<Record>, String> {
        let c = &self.config;
        match c.sources.get(lookup.source) {
            Some(SourceConfig::Broker { .. }) => wire::parse_broker_lookup(
                lookup.api,
                &lookup.key.id,
                status,
                body,
                &c.owner_attribute,
                &c.delegations_attribute,
            ),
            Some(SourceConfig::Registry { .. }) => wire::parse_registry_lookup(status, body),
            _ => Err("not a remote source".into()),
        }
    }

    /// The registry claims for the new entities of an allowed create: the caller becomes
    /// their owner (type from the body, the request's first service path). Empty when no
    /// registry is configured (a broker source records the owner in the body instead).
    pub fn claim_calls(
        &self,
        verdict: &Verdict,
        identity: Option<&Identity>,
        access: &RequestAccess,
        endpoint: &Endpoint,
        body: &[u8],
    ) -> Vec<(EntityKey, HttpCall)> {
        let Some((_, source @ SourceConfig::Registry(registry))) = self.registry() else {
            return Vec::new();
        };
        let Some(target) = source.target() else {
            return Vec::new();
        };
        let service_path = access
            .accesses
            .first()
            .and_then(|a| a.tenant.service_paths.first().cloned())
            .unwrap_or_else(|| "/".into());
        let caller = identity.map(|i| i.subject.as_str()).unwrap_or_default();
        verdict
            .new_entities
            .iter()
            .map(|key| {
                let ty = endpoint
                    .create_body
                    .and_then(|kind| wire::created_type(kind, body, &key.id));
                let claim = wire::registry_claim_body(key, ty.as_deref(), &service_path, caller);
                let call = target
                    .call("POST", registry.claim_path.as_str().to_string())
                    .with_header("content-type", "application/json")
                    .with_body(claim.into_bytes());
                (key.clone(), call)
            })
            .collect()
    }

    /// The body an allowed create goes upstream with: the owner attribute of the new entities
    /// checked (it may only name the caller: else 403) and, with a broker source, injected.
    /// None: the body goes as it is. An anonymous create is refused.
    pub fn create_body(
        &self,
        verdict: &Verdict,
        identity: Option<&Identity>,
        endpoint: &Endpoint,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, DenyReason> {
        if verdict.new_entities.is_empty() {
            return Ok(None);
        }
        let Some(kind) = endpoint.create_body else {
            return Ok(None);
        };
        let caller = identity
            .map(|i| i.subject.as_str())
            .ok_or_else(|| DenyReason::Forbidden("anonymous create".into()))?;
        let ids: HashSet<String> = verdict.new_entities.iter().map(|k| k.id.clone()).collect();
        let rewritten = wire::inject_owner(
            kind,
            body,
            endpoint.key_values,
            &self.config.owner_attribute,
            caller,
            &ids,
        )?;
        Ok(if self.broker().is_some() {
            rewritten
        } else {
            None
        })
    }
}
