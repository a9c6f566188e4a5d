//! The verified-token cache: what the filter already knows about a token, so that it does not
//! verify a JWT or call the IdP for every request.
//!
//! * **Keys are BLAKE3 digests of the tokens**, never the tokens: a dump of the cache (its
//!   `Debug`, a shared-data key, a heap snapshot of the map) does not reveal a usable credential.
//!   For a device key, hash the id and the key together (e.g. `id + "\n" + key`); a digest of a
//!   low-entropy secret can still be brute-forced, which is why device keys should be long.
//! * **Every entry expires** at `min(now + ttl, token exp)` ([`entry_expiry`]), computed when it
//!   is inserted. [`VerdictCache::get`] never returns an entry at or past its expiry (the same
//!   inclusive rule as [`crate::Identity::is_expired`]); it removes it instead.
//! * **Bounded.** At capacity, an insertion first drops the entry that expires soonest if it has
//!   already expired (garbage costs nothing to drop), otherwise the least recently used entry (an
//!   eviction). Both orders are kept in `BTreeMap`s beside the `HashMap`, so `get` and `insert`
//!   are O(log n); [`VerdictCache::purge_expired`] is O(k log n) for k expired entries.
//! * **Counters** of hits, misses, insertions, evictions and expirations ([`CacheStats`]).
//!
//! Envoy runs one VM per worker thread; to share verdicts between them the filter stores entries
//! in shared data under [`shared_data_key`] (a digest again), encoded by [`encode_entry`] and read
//! back by [`decode_entry`], which checks the format version and [`SharedEntry::fresh`] the
//! expiry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A BLAKE3 digest (256 bits) of a token.
pub type TokenDigest = [u8; 32];

/// The digest a token is cached under.
pub fn token_digest(token: &str) -> TokenDigest {
    blake3::hash(token.as_bytes()).into()
}

/// Lowercase hex of a digest.
pub fn digest_hex(digest: &TokenDigest) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The shared-data key of a token's entry: `prefix` followed by the hex digest of the token.
pub fn shared_data_key(prefix: &str, token: &str) -> String {
    format!("{prefix}{}", digest_hex(&token_digest(token)))
}

/// When an entry inserted at `now` for `ttl_s` seconds expires: never after the token itself.
pub fn entry_expiry(now: u64, ttl_s: u64, token_exp: Option<u64>) -> u64 {
    let by_ttl = now.saturating_add(ttl_s);
    match token_exp {
        Some(exp) => by_ttl.min(exp),
        None => by_ttl,
    }
}

/// What the cache has done since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// `get` found a live entry.
    pub hits: u64,
    /// `get` found nothing, or only an expired entry.
    pub misses: u64,
    /// Entries stored (new or replacing).
    pub inserts: u64,
    /// Live entries dropped to make room.
    pub evictions: u64,
    /// Expired entries dropped (by `get`, by an insertion at capacity, or by `purge_expired`).
    pub expirations: u64,
}

struct Entry<V> {
    value: V,
    expires_at: u64,
    /// Position in the recency order; larger is more recent.
    used: u64,
}

/// A bounded cache from tokens (by digest) to verdicts `V`.
pub struct VerdictCache<V> {
    capacity: usize,
    entries: HashMap<TokenDigest, Entry<V>>,
    /// Recency order: `used` → key. The first is the least recently used.
    by_use: BTreeMap<u64, TokenDigest>,
    /// Expiry order: the first expires soonest.
    by_expiry: BTreeSet<(u64, TokenDigest)>,
    clock: u64,
    stats: CacheStats,
}

impl<V: Clone> VerdictCache<V> {
    /// A cache of at most `capacity` entries (0: caches nothing).
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The verdict for `token` if one is cached and `now` is before its expiry.
    pub fn get(&mut self, token: &str, now: u64) -> Option<V> {
        self.get_with_expiry(token, now).map(|(v, _)| v)
    }

    /// Like [`VerdictCache::get`], with the entry's expiry (to copy it to shared data).
    pub fn get_with_expiry(&mut self, token: &str, now: u64) -> Option<(V, u64)> {
        let key = token_digest(token);
        // One lookup of the entry for a hit (its recency is updated in place).
        let Some(entry) = self.entries.get_mut(&key) else {
            self.stats.misses += 1;
            return None;
        };
        if now >= entry.expires_at {
            self.remove_key(&key);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            return None;
        }
        self.clock += 1;
        self.by_use.remove(&entry.used);
        entry.used = self.clock;
        self.by_use.insert(entry.used, key);
        self.stats.hits += 1;
        Some((entry.value.clone(), entry.expires_at))
    }

    /// Caches `value` for `token` until [`entry_expiry`]`(now, ttl_s, token_exp)`, replacing any
    /// previous entry. Returns false if nothing was stored (already expired, or capacity 0); a
    /// previous entry for the token is then dropped too, as the new verdict supersedes it.
    pub fn insert(
        &mut self,
        token: &str,
        value: V,
        now: u64,
        ttl_s: u64,
        token_exp: Option<u64>,
    ) -> bool {
        self.insert_until(token, value, now, entry_expiry(now, ttl_s, token_exp))
    }

    /// Caches `value` for `token` until `expires_at` (e.g. an entry read from shared data).
    pub fn insert_until(&mut self, token: &str, value: V, now: u64, expires_at: u64) -> bool {
        let key = token_digest(token);
        self.remove_key(&key);
        if expires_at <= now || self.capacity == 0 {
            return false;
        }
        while self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        self.clock += 1;
        let used = self.clock;
        self.entries.insert(
            key,
            Entry {
                value,
                expires_at,
                used,
            },
        );
        self.by_use.insert(used, key);
        self.by_expiry.insert((expires_at, key));
        self.stats.inserts += 1;
        true
    }

    /// Forgets `token` (e.g. after a revocation). True if it was cached.
    pub fn remove(&mut self, token: &str) -> bool {
        self.remove_key(&token_digest(token))
    }

    /// Drops every entry expired at `now`; returns how many.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let mut dropped = 0;
        while let Some(&(expires_at, key)) = self.by_expiry.first() {
            if expires_at > now {
                break;
            }
            self.remove_key(&key);
            self.stats.expirations += 1;
            dropped += 1;
        }
        dropped
    }

    /// Drops every entry (the counters stay).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_use.clear();
        self.by_expiry.clear();
    }

    /// Drops one entry: an expired one if there is any, else the least recently used.
    fn make_room(&mut self, now: u64) {
        if let Some(&(expires_at, key)) = self.by_expiry.first() {
            if expires_at <= now {
                self.remove_key(&key);
                self.stats.expirations += 1;
                return;
            }
        }
        if let Some((_, key)) = self.by_use.pop_first() {
            self.remove_key(&key);
            self.stats.evictions += 1;
        } else {
            // Unreachable while the indexes agree; never loop forever if they don't.
            self.clear();
        }
    }

    fn remove_key(&mut self, key: &TokenDigest) -> bool {
        match self.entries.remove(key) {
            Some(entry) => {
                self.by_use.remove(&entry.used);
                self.by_expiry.remove(&(entry.expires_at, *key));
                true
            }
            None => false,
        }
    }
}

/// Shows digests, expiries and counters: never a token, never a value.
impl<V> fmt::Debug for VerdictCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<(String, u64)> = self
            .by_expiry
            .iter()
            .map(|(exp, key)| (digest_hex(key), *exp))
            .collect();
        f.debug_struct("VerdictCache")
            .field("capacity", &self.capacity)
            .field("entries", &entries)
            .field("stats", &self.stats)
            .finish()
    }
}

// ------------------------------------------------------------------------------------------------
// Shared data

/// The version of [`SharedEntry`]'s encoding; entries of another version are not read.
pub const SHARED_ENTRY_VERSION: u32 = 1;

/// A cache entry as stored in Envoy shared data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedEntry<V> {
    /// [`SHARED_ENTRY_VERSION`].
    pub v: u32,
    /// Seconds since the epoch.
    pub expires_at: u64,
    pub value: V,
}

impl<V> SharedEntry<V> {
    /// The value, if `now` is before the expiry.
    pub fn fresh(self, now: u64) -> Option<V> {
        (now < self.expires_at).then_some(self.value)
    }
}

/// Why a shared-data entry could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheCodecError {
    #[error("cache entry could not be encoded: {0}")]
    Encode(String),
    #[error("cache entry could not be decoded: {0}")]
    Decode(String),
    #[error("cache entry has version {0}, expected {SHARED_ENTRY_VERSION}")]
    Version(u32),
}

/// Encodes an entry for shared data (JSON).
pub fn encode_entry<V: Serialize>(value: &V, expires_at: u64) -> Result<Vec<u8>, CacheCodecError> {
    #[derive(Serialize)]
    struct Borrowed<'a, V> {
        v: u32,
        expires_at: u64,
        value: &'a V,
    }
    serde_json::to_vec(&Borrowed {
        v: SHARED_ENTRY_VERSION,
        expires_at,
        value,
    })
    .map_err(|e| CacheCodecError::Encode(e.to_string()))
}

/// Decodes an entry written by [`encode_entry`]. Use [`SharedEntry::fresh`] before trusting it.
pub fn decode_entry<V: DeserializeOwned>(bytes: &[u8]) -> Result<SharedEntry<V>, CacheCodecError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version =
        serde_json::from_slice(bytes).map_err(|e| CacheCodecError::Decode(e.to_string()))?;
    if version.v != SHARED_ENTRY_VERSION {
        return Err(CacheCodecError::Version(version.v));
    }
    serde_json::from_slice(bytes).map_err(|e| CacheCodecError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, IdentityKind};

    const T0: u64 = 1_700_000_000;

    /// xorshift64*: deterministic pseudo-random operations without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn expiry_is_min_of_ttl_and_exp() {
        let cases = [
            (T0, 300, None, T0 + 300),
            (T0, 300, Some(T0 + 60), T0 + 60),
            (T0, 300, Some(T0 + 900), T0 + 300),
            (T0, 300, Some(T0 - 5), T0 - 5),
            (u64::MAX - 1, 300, None, u64::MAX),
            (T0, 0, None, T0),
        ];
        for (now, ttl, exp, want) in cases {
            assert_eq!(entry_expiry(now, ttl, exp), want, "{now} {ttl} {exp:?}");
        }
    }

    #[test]
    fn get_respects_expiry_inclusively() {
        let mut c = VerdictCache::new(10);
        assert!(c.insert("tok", 1, T0, 300, Some(T0 + 60)));
        assert_eq!(c.get("tok", T0), Some(1));
        assert_eq!(c.get("tok", T0 + 59), Some(1));
        assert_eq!(c.get_with_expiry("tok", T0 + 1), Some((1, T0 + 60)));
        assert_eq!(c.get("tok", T0 + 60), None, "expiry is inclusive");
        assert_eq!(c.len(), 0, "an expired entry is dropped when seen");
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.expirations, s.inserts), (3, 1, 1, 1));
    }

    #[test]
    fn already_expired_is_not_stored_and_supersedes() {
        let mut c = VerdictCache::new(10);
        assert!(c.insert("tok", "good", T0, 300, None));
        // A new verdict that can't be cached (token expired) removes the old one.
        assert!(!c.insert("tok", "bad", T0, 300, Some(T0)));
        assert_eq!(c.get("tok", T0), None);
        assert!(!c.insert("tok", "x", T0, 0, None), "ttl 0 caches nothing");
        let mut zero = VerdictCache::new(0);
        assert!(!zero.insert("tok", 1, T0, 300, None));
        assert_eq!(zero.get("tok", T0), None);
    }

    #[test]
    fn replacing_updates_value_and_expiry() {
        let mut c = VerdictCache::new(2);
        c.insert("a", 1, T0, 10, None);
        c.insert("a", 2, T0, 100, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a", T0 + 50), Some(2));
        c.insert("a", 3, T0, 5, None);
        assert_eq!(c.get("a", T0 + 6), None, "a shorter new expiry applies");
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut c = VerdictCache::new(3);
        for t in ["a", "b", "c"] {
            c.insert(t, t.to_string(), T0, 300, None);
        }
        assert!(c.get("a", T0).is_some()); // b is now the least recently used
        c.insert("d", "d".into(), T0, 300, None);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("b", T0), None);
        for t in ["a", "c", "d"] {
            assert_eq!(c.get(t, T0).as_deref(), Some(t));
        }
        assert_eq!(c.stats().evictions, 1);
    }

    #[test]
    fn expired_entries_go_before_live_ones() {
        let mut c = VerdictCache::new(3);
        c.insert("short", 0, T0, 10, None);
        c.insert("b", 1, T0, 300, None);
        c.insert("c", 2, T0, 300, None);
        assert!(c.get("short", T0).is_some()); // most recently used, but expires first
        c.insert("d", 3, T0 + 20, 300, None);
        assert_eq!(c.stats().evictions, 0);
        assert_eq!(c.stats().expirations, 1);
        for t in ["b", "c", "d"] {
            assert!(c.get(t, T0 + 20).is_some(), "{t}");
        }
    }

    #[test]
    fn purge_and_remove() {
        let mut c = VerdictCache::new(10);
        for (i, t) in ["a", "b", "c", "d"].iter().enumerate() {
            c.insert(t, i, T0, 10 * (i as u64 + 1), None);
        }
        assert_eq!(c.purge_expired(T0 + 20), 2);
        assert_eq!(c.len(), 2);
        assert!(c.remove("c"));
        assert!(!c.remove("c"));
        assert_eq!(c.get("d", T0 + 20), Some(3));
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn dump_never_shows_tokens_or_values() {
        let token = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2ln";
        let mut c = VerdictCache::new(4);
        c.insert(token, "value-marker", T0, 60, None);
        let dump = format!("{c:?}");
        assert!(
            !dump.contains(token) && !dump.contains("c2VjcmV0") && !dump.contains("value-marker"),
            "{dump}"
        );
        assert!(dump.contains(&digest_hex(&token_digest(token))), "{dump}");
        let key = shared_data_key("token-auth/v1/", token);
        assert!(key.starts_with("token-auth/v1/") && !key.contains(token));
        assert_eq!(key.len(), "token-auth/v1/".len() + 64);
    }

    #[test]
    fn digest_is_blake3() {
        // BLAKE3 of "" and of "abc" (the reference implementation's values).
        assert_eq!(
            digest_hex(&token_digest("")),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            digest_hex(&token_digest("abc")),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    /// Random operations against a record of what was inserted last for each token.
    #[test]
    fn property_expiry_capacity_and_isolation() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let capacity = 1 + rng.below(16) as usize;
            let tokens: Vec<String> = (0..40).map(|i| format!("token-{i}")).collect();
            let mut cache: VerdictCache<(usize, u64)> = VerdictCache::new(capacity);
            // token index → (value, expires_at) of the last insertion.
            let mut last: HashMap<usize, ((usize, u64), u64)> = HashMap::new();
            let mut now = T0;
            let mut gets = 0u64;
            for step in 0..3000u64 {
                now += rng.below(4);
                let t = rng.below(tokens.len() as u64) as usize;
                match rng.below(10) {
                    0..=3 => {
                        let ttl = rng.below(30);
                        let exp = if rng.below(2) == 0 {
                            None
                        } else {
                            Some(now + rng.below(40))
                        };
                        let value = (t, step);
                        let expires_at = entry_expiry(now, ttl, exp);
                        let stored = cache.insert(&tokens[t], value, now, ttl, exp);
                        assert_eq!(stored, expires_at > now);
                        if stored {
                            last.insert(t, (value, expires_at));
                        } else {
                            last.remove(&t);
                        }
                    }
                    4 => {
                        cache.remove(&tokens[t]);
                        last.remove(&t);
                    }
                    5 => {
                        cache.purge_expired(now);
                    }
                    _ => {
                        gets += 1;
                        if let Some(value) = cache.get(&tokens[t], now) {
                            let (want, expires_at) = last[&t];
                            assert_eq!(
                                value, want,
                                "seed {seed} step {step}: another token's value"
                            );
                            assert_eq!(value.0, t);
                            assert!(
                                now < expires_at,
                                "seed {seed} step {step}: returned after expiry"
                            );
                        }
                    }
                }
                assert!(
                    cache.len() <= capacity,
                    "seed {seed} step {step}: over capacity"
                );
                assert_eq!(cache.by_use.len(), cache.len());
                assert_eq!(cache.by_expiry.len(), cache.len());
            }
            let s = cache.stats();
            assert_eq!(s.hits + s.misses, gets);
        }
    }

    /// With room for every token and long lifetimes, every token keeps its own value: no two
    /// tokens share an entry.
    #[test]
    fn distinct_tokens_never_collide() {
        let n = 2000;
        let mut cache = VerdictCache::new(n);
        // Near-identical tokens: one character apart, prefixes of each other, case.
        let mut tokens: Vec<String> = (0..n / 4).map(|i| format!("tok{i}")).collect();
        tokens.extend((0..n / 4).map(|i| format!("tok{i}=")));
        tokens.extend((0..n / 4).map(|i| format!("TOK{i}")));
        tokens.extend((0..n / 4).map(|i| format!("tok{i} ")));
        for (i, t) in tokens.iter().enumerate() {
            assert!(cache.insert(t, i, T0, 3600, None));
        }
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(cache.get(t, T0 + 1), Some(i), "{t}");
        }
        assert_eq!(cache.stats().evictions, 0);
        assert_eq!(cache.get("tok", T0), None);
    }

    #[test]
    fn shared_entries_round_trip() {
        let mut id = Identity::new(IdentityKind::OpaqueToken, "alice");
        id.roles = vec!["admin".into()];
        let bytes = encode_entry(&id, T0 + 60).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"v":1,"expires_at":1700000060,"value":"#),
            "{text}"
        );
        let entry: SharedEntry<Identity> = decode_entry(&bytes).unwrap();
        assert_eq!(entry.expires_at, T0 + 60);
        assert_eq!(entry.clone().fresh(T0 + 59), Some(id));
        assert_eq!(entry.fresh(T0 + 60), None);
    }

    #[test]
    fn shared_entries_reject_bad_input() {
        assert!(matches!(
            decode_entry::<u32>(b"not json"),
            Err(CacheCodecError::Decode(_))
        ));
        assert!(matches!(
            decode_entry::<u32>(br#"{"expires_at":1,"value":2}"#),
            Err(CacheCodecError::Decode(_))
        ));
        assert_eq!(
            decode_entry::<u32>(br#"{"v":2,"expires_at":1,"value":2}"#),
            Err(CacheCodecError::Version(2))
        );
        assert!(matches!(
            decode_entry::<u32>(br#"{"v":1,"expires_at":1,"value":"x"}"#),
            Err(CacheCodecError::Decode(_))
        ));
        assert!(matches!(
            decode_entry::<u32>(br#"{"v":1,"expires_at":-1,"value":2}"#),
            Err(CacheCodecError::Decode(_))
        ));
        assert_eq!(
            decode_entry::<u32>(br#"{"v":1,"expires_at":5,"value":2}"#)
                .unwrap()
                .value,
            2
        );
    }

    #[test]
    fn verdicts_cache_and_share() {
        use crate::introspection::Verdict;
        let v = Verdict::Inactive {
            reason: "token is not active".into(),
        };
        let mut c = VerdictCache::new(8);
        c.insert("t", v.clone(), T0, 10, v.expires_at());
        let (got, exp) = c.get_with_expiry("t", T0 + 1).unwrap();
        let bytes = encode_entry(&got, exp).unwrap();
        let back: SharedEntry<Verdict> = decode_entry(&bytes).unwrap();
        assert_eq!(back.fresh(T0 + 2), Some(v));
    }
}
