//! Remote JWT key sets, for every filter that verifies JWTs (token-auth, mqtt-acl): fetched
//! through an Envoy cluster (after OIDC discovery when configured), refreshed on a timer,
//! fetched again on an unknown `kid` (at most every [`MIN_REFETCH_SECS`] per issuer), shared
//! between the workers' VMs through Envoy shared data, and kept when a fetch fails (the last
//! good set stays in force, for at most the provider's `remote.max_stale_secs` after its last
//! successful fetch: then tokens that need it get 503). A set that is refused (too large,
//! duplicate `kid`s, no usable key) is logged and never installed nor shared.
//!
//! The filter owns the callouts' answers: it hands every answer to
//! [`RemoteKeys::on_response`], which says whether it was one of ours and whether a fetch
//! ended; the filter then resumes whatever waited for the keys.

use std::collections::HashMap;

use policy::jwt::{JwtProvider, JwtVerifier, KeySet};
use policy::log_text::bounded;
use policy::token_auth::TokenAuth;
use policy::upstream::HttpCall;
use proxy_wasm::hostcalls;

use crate::Counter;

/// Least time between two fetches of one issuer's keys triggered by unknown kids.
pub const MIN_REFETCH_SECS: u64 = 30;

/// What holds the JWT providers whose remote keys are managed here.
pub trait KeyHolder {
    fn providers(&self) -> &[JwtProvider];
    /// Installs a key set fetched at `fetched_at` (the holder drops verdicts made with the
    /// old one).
    fn install_keys(&mut self, issuer: &str, keys: KeySet, fetched_at: u64) -> Result<(), String>;
    /// The keys in force were fetched again, unchanged, at `fetched_at`.
    fn confirm_keys(&mut self, issuer: &str, fetched_at: u64);
}

impl KeyHolder for TokenAuth {
    fn providers(&self) -> &[JwtProvider] {
        TokenAuth::providers(self)
    }
    fn install_keys(&mut self, issuer: &str, keys: KeySet, fetched_at: u64) -> Result<(), String> {
        self.set_remote_keys(issuer, keys, fetched_at)
    }
    fn confirm_keys(&mut self, issuer: &str, fetched_at: u64) {
        self.confirm_remote_keys(issuer, fetched_at);
    }
}

impl KeyHolder for JwtVerifier {
    fn providers(&self) -> &[JwtProvider] {
        JwtVerifier::providers(self)
    }
    fn install_keys(&mut self, issuer: &str, keys: KeySet, fetched_at: u64) -> Result<(), String> {
        self.provider_mut(issuer)
            .ok_or_else(|| format!("no provider for issuer {issuer}"))?
            .set_remote_keys(keys, fetched_at)
            .map_err(|e| e.to_string())
    }
    fn confirm_keys(&mut self, issuer: &str, fetched_at: u64) {
        if let Some(provider) = self.provider_mut(issuer) {
            provider.confirm_remote_keys(fetched_at);
        }
    }
}

/// A key set as shared between workers: when it was fetched, and the JWKS text.
fn shared_entry(fetched_at: u64, jwks: &str) -> String {
    format!("{fetched_at}\n{jwks}")
}

fn parse_shared_entry(text: &str) -> Option<(u64, &str)> {
    let (at, jwks) = text.split_once('\n')?;
    Some((at.parse().ok()?, jwks))
}

/// The counters a filter keeps for its key fetches.
#[derive(Debug, Clone, Copy)]
pub struct KeyMetrics {
    pub fetched: Counter,
    pub failed: Counter,
    pub callouts: Counter,
    pub callout_failures: Counter,
}

#[derive(Default)]
struct IssuerKeys {
    last_fetch: Option<u64>,
    next_refresh: u64,
    in_flight: bool,
    /// The cas of the shared-data entry these keys came from.
    shared_cas: Option<u32>,
    /// The JWKS text in force: the same set fetched again (by this or another worker) is not
    /// re-installed, so verdict caches are cleared only when keys really change.
    installed: Option<String>,
    /// When the keys in force were last fetched (by any worker).
    fetched_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Discovery,
    Keys,
}

/// What an answer meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not a key fetch of ours.
    NotOurs,
    /// The discovery document named the JWKS; that fetch is under way.
    Continuing,
    /// The fetch ended: new keys installed (`loaded`), or it failed and the last good set
    /// stays.
    Done { issuer: String, loaded: bool },
}

pub struct RemoteKeys {
    filter: &'static str,
    shared_prefix: String,
    metrics: KeyMetrics,
    issuers: HashMap<String, IssuerKeys>,
    calls: HashMap<u32, (String, Step)>,
}

impl RemoteKeys {
    /// `shared_prefix`: the shared-data key prefix (one per filter, e.g. `token_auth.jwks.`).
    pub fn new(filter: &'static str, shared_prefix: &str, metrics: KeyMetrics) -> Self {
        RemoteKeys {
            filter,
            shared_prefix: shared_prefix.to_string(),
            metrics,
            issuers: HashMap::new(),
            calls: HashMap::new(),
        }
    }

    /// The issuers whose keys are fetched.
    pub fn remote_issuers(holder: &impl KeyHolder) -> Vec<String> {
        holder
            .providers()
            .iter()
            .filter(|p| p.remote().is_some())
            .map(|p| p.issuer().to_string())
            .collect()
    }

    /// Starts fetching an issuer's keys; the callout's token, or None if no call was made.
    /// The context that makes the call receives the answer.
    pub fn start(&mut self, holder: &impl KeyHolder, issuer: &str, now: u64) -> Option<u32> {
        let remote = holder
            .providers()
            .iter()
            .find(|p| p.issuer() == issuer)?
            .remote()?
            .clone();
        let entry = self.issuers.entry(issuer.to_string()).or_default();
        entry.last_fetch = Some(now);
        entry.next_refresh = now + remote.refresh_secs;
        let step = if remote.discovery {
            Step::Discovery
        } else {
            Step::Keys
        };
        let call = remote
            .target()
            .call("GET", remote.path.as_str().to_string());
        let token = self.dispatch(call)?;
        self.calls.insert(token, (issuer.to_string(), step));
        if let Some(entry) = self.issuers.get_mut(issuer) {
            entry.in_flight = true;
        }
        Some(token)
    }

    pub fn in_flight(&self, issuer: &str) -> bool {
        self.issuers.get(issuer).is_some_and(|k| k.in_flight)
    }

    /// Whether a fetch for this issuer started less than [`MIN_REFETCH_SECS`] ago (an unknown
    /// kid then does not trigger another).
    pub fn fetched_recently(&self, issuer: &str, now: u64) -> bool {
        self.issuers
            .get(issuer)
            .and_then(|k| k.last_fetch)
            .is_some_and(|t| now < t + MIN_REFETCH_SECS)
    }

    /// Issuers whose refresh is due and that are not being fetched.
    pub fn due(&self, holder: &impl KeyHolder, now: u64) -> Vec<String> {
        Self::remote_issuers(holder)
            .into_iter()
            .filter(|issuer| {
                let keys = self.issuers.get(issuer);
                keys.is_none_or(|k| now >= k.next_refresh) && !self.in_flight(issuer)
            })
            .collect()
    }

    /// Issuers without any key yet (fetch them at configure time).
    pub fn without_keys(holder: &impl KeyHolder) -> Vec<String> {
        holder
            .providers()
            .iter()
            .filter(|p| p.remote().is_some() && !p.has_keys())
            .map(|p| p.issuer().to_string())
            .collect()
    }

    /// The context that made an issuer's call went away: Envoy cancelled the call.
    pub fn cancelled(&mut self, issuer: &str) {
        self.calls.retain(|_, (i, _)| i != issuer);
        if let Some(entry) = self.issuers.get_mut(issuer) {
            entry.in_flight = false;
        }
    }

    /// Handles the answer to callout `token` (read from the current context).
    pub fn on_response(&mut self, holder: &mut impl KeyHolder, token: u32) -> Progress {
        let Some((issuer, step)) = self.calls.remove(&token) else {
            return Progress::NotOurs;
        };
        // Status 0: the call was reset. Any non-2xx is a failure too.
        let (status, body) = crate::callout_answer(self.filter);
        let ok = (200..300).contains(&status);
        if !ok {
            self.metrics.callout_failures.inc();
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let now = crate::now_secs().unwrap_or(0);
        let loaded = match (step, ok) {
            (Step::Discovery, true) => {
                if self.follow_discovery(holder, &issuer, &text) {
                    return Progress::Continuing;
                }
                false
            }
            (Step::Keys, true) => match self.install(holder, &issuer, &text, now) {
                Ok(_) => {
                    self.share(&issuer, &text, now);
                    true
                }
                Err(e) => {
                    log::warn!(
                        "{}: keys for {issuer} rejected: {}",
                        self.filter,
                        bounded(&e.to_string())
                    );
                    false
                }
            },
            (_, false) => false,
        };
        if let Some(entry) = self.issuers.get_mut(&issuer) {
            entry.in_flight = false;
        }
        if loaded {
            self.metrics.fetched.inc();
            log::info!("{}: keys for {issuer} loaded", self.filter);
        } else {
            self.metrics.failed.inc();
            log::warn!(
                "{}: fetching keys for {issuer} failed; keeping the last good set",
                self.filter
            );
        }
        Progress::Done { issuer, loaded }
    }

    /// Loads key sets other workers fetched (shared data), when they changed.
    pub fn sync_shared(&mut self, holder: &mut impl KeyHolder) {
        for issuer in Self::remote_issuers(holder) {
            let shared_key = format!("{}{issuer}", self.shared_prefix);
            let Ok((Some(bytes), cas)) = hostcalls::get_shared_data(&shared_key) else {
                continue;
            };
            let known = self.issuers.get(&issuer).and_then(|k| k.shared_cas);
            if cas.is_some() && cas == known {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            let Some((fetched_at, jwks)) = parse_shared_entry(&text) else {
                continue;
            };
            if self.install(holder, &issuer, jwks, fetched_at).is_ok() {
                self.issuers.entry(issuer).or_default().shared_cas = cas;
            }
        }
    }

    /// Installs a JWKS fetched at `fetched_at` unless it is the set already in force (then
    /// only its freshness is renewed); Ok(true) if keys changed.
    fn install(
        &mut self,
        holder: &mut impl KeyHolder,
        issuer: &str,
        text: &str,
        fetched_at: u64,
    ) -> Result<bool, String> {
        let entry = self.issuers.entry(issuer.to_string()).or_default();
        if entry.installed.as_deref() == Some(text) {
            if fetched_at > entry.fetched_at {
                entry.fetched_at = fetched_at;
                holder.confirm_keys(issuer, fetched_at);
            }
            return Ok(false);
        }
        let keys = KeySet::from_jwks_json(text).map_err(|e| format!("JWKS rejected: {e}"))?;
        holder.install_keys(issuer, keys, fetched_at)?;
        entry.installed = Some(text.to_string());
        entry.fetched_at = fetched_at;
        Ok(true)
    }

    /// Offers fetched keys (and when they were fetched) to the other workers.
    fn share(&mut self, issuer: &str, text: &str, fetched_at: u64) {
        let shared_key = format!("{}{issuer}", self.shared_prefix);
        let entry = shared_entry(fetched_at, text);
        if hostcalls::set_shared_data(&shared_key, Some(entry.as_bytes()), None).is_ok() {
            if let Ok((_, cas)) = hostcalls::get_shared_data(&shared_key) {
                self.issuers
                    .entry(issuer.to_string())
                    .or_default()
                    .shared_cas = cas;
            }
        }
    }

    /// Fetches the JWKS a discovery document names; false if it can't.
    fn follow_discovery(&mut self, holder: &impl KeyHolder, issuer: &str, text: &str) -> bool {
        let Some(provider) = holder.providers().iter().find(|p| p.issuer() == issuer) else {
            return false;
        };
        let Some(remote) = provider.remote() else {
            return false;
        };
        let location = match provider
            .check_discovery(text)
            .and_then(|d| d.jwks_location())
        {
            Ok(url) => url,
            Err(e) => {
                log::warn!(
                    "{}: discovery document for {issuer} rejected: {}",
                    self.filter,
                    bounded(&e.to_string())
                );
                return false;
            }
        };
        // The JWKS is fetched through the discovery document's cluster, at the host and path
        // its jwks_uri names.
        let mut call = remote.target().call("GET", location.path);
        call.authority = location.authority;
        match self.dispatch(call) {
            Some(token) => {
                self.calls.insert(token, (issuer.to_string(), Step::Keys));
                true
            }
            None => false,
        }
    }

    fn dispatch(&self, call: HttpCall) -> Option<u32> {
        let call = call.with_header("accept", "application/json");
        crate::dispatch_call(
            self.filter,
            &call,
            self.metrics.callouts,
            self.metrics.callout_failures,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_entries_carry_the_fetch_time() {
        let jwks = "{\"keys\":[]}\n";
        assert_eq!(
            parse_shared_entry(&shared_entry(1_767_225_600, jwks)),
            Some((1_767_225_600, jwks))
        );
        // An entry written by a module without fetch times is ignored (the worker fetches).
        assert_eq!(parse_shared_entry("{\"keys\":[]}"), None);
        assert_eq!(parse_shared_entry("soon\n{}"), None);
    }
}
