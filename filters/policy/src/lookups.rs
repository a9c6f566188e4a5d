//! Callout-backed lookups shared by the streams that need the same answer (a JWKS per
//! issuer, an introspection per token digest, an ownership record per entity: the HTTP stages
//! in `http-stages`; an introspection, a registry lookup or a backend question per VM for
//! mqtt-acl's connections: [`crate::mqtt_acl::SharedAsks`]). Pure bookkeeping: the callers
//! send the calls and resume the waiters.
//!
//! The stream that starts a lookup makes the call (the host routes the answer to it). If that
//! stream goes away first, Envoy cancels its callout: [`Lookups::forget_stream`] then marks
//! the lookup as not in flight, and the caller re-issues it from the root on its next tick
//! ([`Lookups::orphans`]), so no waiter is left behind.

use std::collections::HashMap;
use std::hash::Hash;

struct Lookup<D> {
    /// The stream whose callout is in flight, or None when the root made it.
    owner: Option<u32>,
    in_flight: bool,
    waiters: Vec<u32>,
    /// What the stage needs to re-issue the call (e.g. the token being introspected).
    data: Option<D>,
}

/// Lookups by key `K`, each with the data `D` needed to (re-)issue it.
pub struct Lookups<K, D = ()> {
    lookups: HashMap<K, Lookup<D>>,
}

impl<K, D> Default for Lookups<K, D> {
    fn default() -> Self {
        Lookups {
            lookups: HashMap::new(),
        }
    }
}

impl<K: Clone + Eq + Hash, D> Lookups<K, D> {
    /// Makes `ctx` wait for `key`; returns true when its callout is already in flight (then
    /// the caller must not start another).
    pub fn join(&mut self, key: K, ctx: u32, data: Option<D>) -> bool {
        let lookup = self.lookups.entry(key).or_insert(Lookup {
            owner: None,
            in_flight: false,
            waiters: Vec::new(),
            data: None,
        });
        if !lookup.waiters.contains(&ctx) {
            lookup.waiters.push(ctx);
        }
        if data.is_some() {
            lookup.data = data;
        }
        lookup.in_flight
    }

    pub fn in_flight(&self, key: &K) -> bool {
        self.lookups.get(key).is_some_and(|l| l.in_flight)
    }

    /// The callout of `key` was sent by `owner` (None: the root).
    pub fn started(&mut self, key: K, owner: Option<u32>) {
        let lookup = self.lookups.entry(key).or_insert(Lookup {
            owner: None,
            in_flight: false,
            waiters: Vec::new(),
            data: None,
        });
        lookup.owner = owner;
        lookup.in_flight = true;
    }

    /// `ctx` no longer waits for `key` (its callout could not be started).
    pub fn leave(&mut self, key: &K, ctx: u32) {
        if let Some(l) = self.lookups.get_mut(key) {
            l.waiters.retain(|w| *w != ctx);
            if l.waiters.is_empty() && !l.in_flight {
                self.lookups.remove(key);
            }
        }
    }

    pub fn data(&self, key: &K) -> Option<&D> {
        self.lookups.get(key).and_then(|l| l.data.as_ref())
    }

    /// Ends a lookup; returns its waiters.
    pub fn finish(&mut self, key: &K) -> Vec<u32> {
        self.lookups
            .remove(key)
            .map(|l| l.waiters)
            .unwrap_or_default()
    }

    /// Whether `ctx` waits for any lookup.
    pub fn is_waiting(&self, ctx: u32) -> bool {
        self.lookups.values().any(|l| l.waiters.contains(&ctx))
    }

    /// Lookups with waiters but no callout in flight (their owner went away): the root
    /// re-issues them.
    pub fn orphans(&self) -> Vec<K> {
        self.lookups
            .iter()
            .filter(|(_, l)| !l.in_flight && !l.waiters.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A stream ended: it waits for nothing, and the lookups it owned (their callouts Envoy
    /// cancels) are returned, no longer in flight, for the stage to drop its call records.
    pub fn forget_stream(&mut self, ctx: u32) -> Vec<K> {
        let mut orphaned = Vec::new();
        for (key, l) in self.lookups.iter_mut() {
            l.waiters.retain(|w| *w != ctx);
            if l.owner == Some(ctx) && l.in_flight {
                l.owner = None;
                l.in_flight = false;
                orphaned.push(key.clone());
            }
        }
        self.lookups
            .retain(|_, l| l.in_flight || !l.waiters.is_empty());
        orphaned
    }
}
