//! A bounded cache of entity-acl verdicts for bodiless requests (a GET of an entity, a list
//! query): the same caller asking the same thing again is answered without classifying the
//! request or matching a rule.
//!
//! * **The key is every input of the decision.** [`crate::entity_acl::EntityAcl::decide`] reads
//!   the caller's whole identity, the method, the path with its query, the headers it is given
//!   (the tenant headers, among them) and the body. Only requests with an empty body are cached,
//!   and the key holds the other four whole, compared for equality on every hit (the hash only
//!   finds the slot: a collision is a miss, never someone else's verdict). The identity includes
//!   its expiry, so a renewed token is another key.
//! * **Never across a token's expiry.** An identity at or past its `expires_at` is neither served
//!   from nor stored in the cache. (A revoked token is token-auth's refusal: it never reaches this
//!   decision, which depends on nothing but the key.)
//! * **Dropped on any policy change.** The cache belongs to one configured engine (the stage
//!   that holds both); a new configuration builds a new, empty one.
//! * **Bounded**: at most [`MAX_ENTRIES`] entries and about [`MAX_BYTES`] of text; an entry
//!   over a sixteenth of that is not cached. At a bound the oldest entry goes first (FIFO).

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use crate::entity_acl::Verdict;
use crate::identity::Identity;

/// At most this many verdicts are kept.
pub const MAX_ENTRIES: usize = 1024;
/// At most about this many bytes (keys, verdicts and bookkeeping) are kept.
pub const MAX_BYTES: usize = 1024 * 1024;

/// Everything a bodiless decision reads.
#[derive(Debug, Clone, Copy)]
pub struct DecisionInputs<'a> {
    pub identity: Option<&'a Identity>,
    pub method: &'a str,
    pub path: &'a str,
    /// The headers given to the decision (lowercase names), in order.
    pub headers: &'a [(String, String)],
}

impl DecisionInputs<'_> {
    fn same_as(&self, key: &Key) -> bool {
        self.identity == key.identity.as_ref()
            && self.method == key.method
            && self.path == key.path
            && self.headers == key.headers.as_slice()
    }

    fn to_key(self) -> Key {
        Key {
            identity: self.identity.cloned(),
            method: self.method.to_string(),
            path: self.path.to_string(),
            headers: self.headers.to_vec(),
        }
    }

    /// Text bytes the entry for these inputs holds.
    fn text_bytes(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.identity.map_or(0, identity_bytes) + self.method.len() + self.path.len() + headers
    }
}

fn identity_bytes(id: &Identity) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let list = |l: &[String]| l.iter().map(String::len).sum::<usize>();
    id.subject.len()
        + opt(&id.display_name)
        + list(&id.roles)
        + list(&id.groups)
        + opt(&id.tenant)
        + opt(&id.app_id)
        + id.keyrock.as_ref().map_or(0, |k| {
            k.roles.len() + k.organizations.len() + opt(&k.eidas_profile)
        })
}

fn verdict_bytes(v: &Verdict) -> usize {
    let reason = match &v.decision {
        crate::Decision::Allow(by) => by.len(),
        crate::Decision::Deny(reason) => reason.to_string().len(),
    };
    v.operation.len() + v.entities.len() + reason
}

#[derive(Debug, Clone)]
struct Key {
    identity: Option<Identity>,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Entry {
    key: Key,
    verdict: Verdict,
    bytes: usize,
}

/// The cache of one configured entity-acl engine.
#[derive(Debug, Clone)]
pub struct DecisionCache {
    entries: HashMap<u64, Entry>,
    /// Insertion order of the slots in `entries` (each exactly once).
    order: VecDeque<u64>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    hasher: RandomState,
}

impl Default for DecisionCache {
    fn default() -> Self {
        DecisionCache::with_bounds(MAX_ENTRIES, MAX_BYTES)
    }
}

impl DecisionCache {
    pub fn with_bounds(max_entries: usize, max_bytes: usize) -> Self {
        DecisionCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            hasher: RandomState::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (approximate: text plus a fixed cost per entry).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn slot(&self, inputs: &DecisionInputs) -> u64 {
        let mut h = self.hasher.build_hasher();
        inputs.identity.hash(&mut h);
        inputs.method.hash(&mut h);
        inputs.path.hash(&mut h);
        inputs.headers.hash(&mut h);
        h.finish()
    }

    /// The cached verdict for exactly these inputs, if the caller has not expired at `now`
    /// (seconds since the epoch).
    pub fn get(&self, now: u64, inputs: &DecisionInputs) -> Option<&Verdict> {
        if inputs.identity.is_some_and(|i| i.is_expired(now)) {
            return None;
        }
        self.entries
            .get(&self.slot(inputs))
            .filter(|e| inputs.same_as(&e.key))
            .map(|e| &e.verdict)
    }

    /// The cached verdict for these inputs, or else `decide()`'s, remembered.
    pub fn get_or_decide(
        &mut self,
        now: u64,
        inputs: &DecisionInputs,
        decide: impl FnOnce() -> Verdict,
    ) -> Cow<'_, Verdict> {
        let slot = self.slot(inputs);
        let live = !inputs.identity.is_some_and(|i| i.is_expired(now));
        let hit = live
            && self
                .entries
                .get(&slot)
                .is_some_and(|e| inputs.same_as(&e.key));
        if !hit {
            let verdict = decide();
            self.insert_at(slot, now, inputs, &verdict);
            return Cow::Owned(verdict);
        }
        match self.entries.get(&slot) {
            Some(e) => Cow::Borrowed(&e.verdict),
            None => Cow::Owned(decide()),
        }
    }

    /// Remembers `verdict` for these inputs (not for an expired caller, nor an entry over a
    /// sixteenth of the byte bound), dropping the oldest entries to stay within the bounds.
    pub fn insert(&mut self, now: u64, inputs: &DecisionInputs, verdict: &Verdict) {
        let slot = self.slot(inputs);
        self.insert_at(slot, now, inputs, verdict);
    }

    fn insert_at(&mut self, slot: u64, now: u64, inputs: &DecisionInputs, verdict: &Verdict) {
        if inputs.identity.is_some_and(|i| i.is_expired(now)) || self.max_entries == 0 {
            return;
        }
        let bytes = std::mem::size_of::<Entry>() + inputs.text_bytes() + verdict_bytes(verdict) + 8;
        if bytes > self.max_bytes / 16 {
            return;
        }
        let entry = Entry {
            key: inputs.to_key(),
            verdict: verdict.clone(),
            bytes,
        };
        // A slot already used (the same inputs, or a hash collision) is replaced in place.
        if let Some(old) = self.entries.insert(slot, entry) {
            self.bytes = self.bytes.saturating_sub(old.bytes) + bytes;
            return;
        }
        self.order.push_back(slot);
        self.bytes += bytes;
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.entries.remove(&oldest) {
                self.bytes = self.bytes.saturating_sub(old.bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;
    use crate::{Decision, DenyReason};

    fn verdict(text: &str) -> Verdict {
        Verdict {
            operation: "ngsi-v2 GET /v2/entities/R1".into(),
            entities: "[read R1]".into(),
            decision: Decision::Allow(text.into()),
        }
    }

    fn tenant(service: &str, path: &str) -> Vec<(String, String)> {
        vec![
            ("fiware-service".into(), service.into()),
            ("fiware-servicepath".into(), path.into()),
        ]
    }

    fn alice() -> Identity {
        let mut id = Identity::new(IdentityKind::Jwt, "alice");
        id.expires_at = Some(1000);
        id.roles = vec!["operator".into()];
        id.tenant = Some("city".into());
        id
    }

    /// Every input the decision reads is part of the key: changing any one of them is a miss.
    #[test]
    fn a_verdict_is_served_only_for_exactly_the_same_inputs() {
        let alice = alice();
        let h = tenant("city", "/rooms");
        let base = DecisionInputs {
            identity: Some(&alice),
            method: "GET",
            path: "/v2/entities/R1?type=Room",
            headers: &h,
        };
        let mut cache = DecisionCache::default();
        cache.insert(10, &base, &verdict("acl:alice"));
        assert_eq!(cache.get(10, &base), Some(&verdict("acl:alice")));

        let mut bob = alice.clone();
        bob.subject = "bob".into();
        let mut device = alice.clone();
        device.kind = IdentityKind::DeviceKey;
        let mut renewed = alice.clone();
        renewed.expires_at = Some(2000);
        let mut never_expires = alice.clone();
        never_expires.expires_at = None;
        let mut admin = alice.clone();
        admin.roles.push("admin".into());
        let mut group = alice.clone();
        group.groups = vec!["city".into()];
        let mut other_tenant_claim = alice.clone();
        other_tenant_claim.tenant = Some("other".into());
        let callers = [
            bob,
            device,
            renewed,
            never_expires,
            admin,
            group,
            other_tenant_claim,
        ];
        for caller in &callers {
            let inputs = DecisionInputs {
                identity: Some(caller),
                ..base
            };
            assert_eq!(cache.get(10, &inputs), None, "{caller:?}");
        }
        assert_eq!(
            cache.get(
                10,
                &DecisionInputs {
                    identity: None,
                    ..base
                }
            ),
            None
        );
        let other_service = tenant("other", "/rooms");
        let other_path = tenant("city", "/secret");
        let duplicated: Vec<(String, String)> = h
            .iter()
            .cloned()
            .chain([("fiware-service".to_string(), "other".to_string())])
            .collect();
        for headers in [
            &other_service,
            &other_path,
            &duplicated,
            &Vec::new(),
            &h[..1].to_vec(),
        ] {
            let inputs = DecisionInputs { headers, ..base };
            assert_eq!(cache.get(10, &inputs), None, "{headers:?}");
        }
        for (method, path) in [
            ("DELETE", "/v2/entities/R1?type=Room"),
            ("GET", "/v2/entities/R2?type=Room"),
            ("GET", "/v2/entities/R1?type=Room&attrs=secret"),
            ("GET", "/v2/entities/R1"),
        ] {
            let inputs = DecisionInputs {
                method,
                path,
                ..base
            };
            assert_eq!(cache.get(10, &inputs), None, "{method} {path}");
        }
        // Still there for the original inputs.
        assert_eq!(cache.get(10, &base), Some(&verdict("acl:alice")));
    }

    /// A verdict is never served at or after the caller's expiry, and an expired caller's
    /// verdict is not stored.
    #[test]
    fn never_across_the_token_expiry() {
        let alice = alice();
        let h = tenant("city", "/");
        let inputs = DecisionInputs {
            identity: Some(&alice),
            method: "GET",
            path: "/v2/entities/R1",
            headers: &h,
        };
        let mut cache = DecisionCache::default();
        cache.insert(999, &inputs, &verdict("acl:a"));
        assert!(cache.get(999, &inputs).is_some());
        assert_eq!(cache.get(1000, &inputs), None);
        assert_eq!(cache.get(5000, &inputs), None);
        let mut fresh = DecisionCache::default();
        fresh.insert(1000, &inputs, &verdict("acl:a"));
        assert!(fresh.is_empty());
    }

    /// The cache never holds more than its bounds, however many distinct requests arrive; the
    /// oldest go first and the newest stay.
    #[test]
    fn the_cache_is_bounded_in_entries_and_bytes() {
        let alice = alice();
        let h = tenant("city", "/");
        let mut cache = DecisionCache::with_bounds(8, MAX_BYTES);
        let paths: Vec<String> = (0..100).map(|i| format!("/v2/entities/R{i}")).collect();
        for p in &paths {
            let inputs = DecisionInputs {
                identity: Some(&alice),
                method: "GET",
                path: p,
                headers: &h,
            };
            cache.insert(1, &inputs, &verdict("acl:a"));
            assert!(cache.len() <= 8);
        }
        assert_eq!(cache.len(), 8);
        let at = |i: usize| DecisionInputs {
            identity: Some(&alice),
            method: "GET",
            path: &paths[i],
            headers: &h,
        };
        assert!(cache.get(1, &at(99)).is_some());
        assert!(cache.get(1, &at(92)).is_some());
        assert!(cache.get(1, &at(91)).is_none());
        assert!(cache.get(1, &at(0)).is_none());

        // The default bounds: 1024 entries, 1 MiB, whatever the paths' length.
        let mut cache = DecisionCache::default();
        let long = "x".repeat(4000);
        for i in 0..3000 {
            let path = format!("/v2/entities/R{i}?q={long}");
            let inputs = DecisionInputs {
                identity: Some(&alice),
                method: "GET",
                path: &path,
                headers: &h,
            };
            cache.insert(1, &inputs, &verdict("acl:a"));
            assert!(cache.len() <= MAX_ENTRIES && cache.bytes() <= MAX_BYTES);
        }
        assert!(cache.len() > 100, "{}", cache.len());
        // An entry over a sixteenth of the byte bound is not cached at all.
        let huge = format!("/v2/entities/R1?q={}", "y".repeat(MAX_BYTES / 16));
        let inputs = DecisionInputs {
            identity: Some(&alice),
            method: "GET",
            path: &huge,
            headers: &h,
        };
        cache.insert(1, &inputs, &verdict("acl:a"));
        assert!(cache.get(1, &inputs).is_none());
    }

    /// Replacing an entry (the same inputs again) keeps one entry and the byte count right.
    #[test]
    fn the_same_inputs_again_replace_their_entry() {
        let h = tenant("city", "/");
        let inputs = DecisionInputs {
            identity: None,
            method: "GET",
            path: "/v2/entities/R1",
            headers: &h,
        };
        let mut cache = DecisionCache::default();
        cache.insert(1, &inputs, &verdict("acl:a"));
        let once = cache.bytes();
        let denied = Verdict {
            decision: Decision::Deny(DenyReason::Forbidden("no".into())),
            ..verdict("x")
        };
        cache.insert(1, &inputs, &denied);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(1, &inputs), Some(&denied));
        assert!(cache.bytes() <= once + 16);
    }
}
