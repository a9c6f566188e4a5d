//! Opaque tokens as MQTT user names (the LAMPI web app's session token): token-auth's
//! introspection ([`crate::introspection`]: RFC 7662 or Keyrock, the same configuration schema,
//! the same reading of answers by [`IntrospectionConfig::decide`]) with a verdict cache per VM.

use std::cell::RefCell;

use crate::cache::VerdictCache;
use crate::decision::DenyReason;
use crate::identity::Identity;
use crate::introspection::{AnswerDecision, HttpCall, IntrospectionConfig};

use super::BackendAnswer;

/// Tokens whose verdicts a VM remembers (least recently used dropped first).
pub const CACHE_ENTRIES: usize = 10_000;

/// The introspection endpoint and the answers it gave (one per VM: every connection of a worker).
#[derive(Debug)]
pub struct OpaqueTokens {
    config: IntrospectionConfig,
    /// Keyed by the token's SHA-256 digest (the cache never keeps the token).
    cache: RefCell<VerdictCache<Result<Identity, DenyReason>>>,
}

impl Clone for OpaqueTokens {
    /// The configuration, with an empty cache.
    fn clone(&self) -> Self {
        OpaqueTokens {
            config: self.config.clone(),
            cache: RefCell::new(VerdictCache::new(CACHE_ENTRIES)),
        }
    }
}

impl OpaqueTokens {
    /// Validates `introspection`; the error names the field.
    pub fn new(config: IntrospectionConfig) -> Result<OpaqueTokens, String> {
        config.validate().map_err(|e| e.to_string())?;
        Ok(OpaqueTokens {
            config,
            cache: RefCell::new(VerdictCache::new(CACHE_ENTRIES)),
        })
    }

    pub fn config(&self) -> &IntrospectionConfig {
        &self.config
    }

    /// The call that introspects `token`.
    pub fn call(&self, token: &str) -> HttpCall {
        self.config.build_request(token)
    }

    /// A remembered verdict on `token`, if still fresh.
    pub fn cached(&self, token: &str, now: u64) -> Option<Result<Identity, DenyReason>> {
        self.cache.borrow_mut().get(token, now)
    }

    /// What `answer` decides; remembered for its TTL (an active token no longer than its
    /// `exp`), except when the endpoint gave no usable answer.
    pub fn remember(&self, token: &str, answer: &BackendAnswer, now: u64) -> AnswerDecision {
        let decided = self
            .config
            .decide(answer.status.unwrap_or(0), &answer.body, now);
        if let Some(ttl) = decided.cache_ttl {
            let token_exp = decided.outcome.as_ref().ok().and_then(|i| i.expires_at);
            self.cache
                .borrow_mut()
                .insert(token, decided.outcome.clone(), now, ttl, token_exp);
        }
        decided
    }

    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.cache.borrow().stats()
    }
}
