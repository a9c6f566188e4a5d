//! Sending a stage's registry-token request and reading the IdP's answer: the host side of
//! `policy::client_credentials::TokenKeeper`, shared by token-auth (device registry) and
//! device-ownership (ownership registry).
//!
//! The token is shared by the workers' VMs through Envoy shared data (one entry per grant,
//! under `TokenKeeper::shared_key`): this moves the entry's bytes, the keeper decides. A VM
//! claims the fetch with the entry's compare-and-swap before sending the token request; the
//! others wait for the token it writes, read on their tick, which comes every
//! `PROMPT_TICK_MS` while they wait ([`prompt_tick_ms`]). A host that refuses shared data
//! leaves each VM with its own token.

use std::hash::Hash;

use policy::client_credentials::{Claim, Fetched, TokenKeeper, PROMPT_TICK_MS};
use policy::log_text::bounded;
use proxy_glue::{now_secs, Counter};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// Writes tried before giving up on a compare-and-swap that other VMs keep winning.
const CAS_ATTEMPTS: usize = 3;

/// A stage's counters for its registry token and its callouts.
#[derive(Clone, Copy)]
pub(crate) struct TokenCounters {
    pub fetched: Counter,
    pub failed: Counter,
    pub callouts: Counter,
    pub callout_failures: Counter,
    /// Tokens taken from the shared entry (another VM fetched them).
    pub shared: Counter,
}

/// What came of asking for the token request to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenFetch {
    /// Sent: the callout's token.
    Sent(u32),
    /// Another VM is fetching it: wait for its token (read on the tick, which comes promptly
    /// while calls wait: [`prompt_tick_ms`]).
    Elsewhere,
    /// The host refused the call, or the stage has no registry token.
    Failed,
}

impl TokenFetch {
    /// Whether the token is on its way (fetched here or elsewhere); a request sent from this VM
    /// is handed to `record` first, so the stage knows its answer when it comes.
    pub(crate) fn recorded(self, record: impl FnOnce(u32)) -> bool {
        match self {
            TokenFetch::Sent(sent) => {
                record(sent);
                true
            }
            TokenFetch::Elsewhere => true,
            TokenFetch::Failed => false,
        }
    }
}

/// The shared entry and its cas; None when the host has no shared data for this VM.
fn read_shared(key: &str) -> Option<(Option<Vec<u8>>, Option<u32>)> {
    hostcalls::get_shared_data(key).ok()
}

/// At configure time: creates the grant's shared entry if there is none, so that every claim
/// is a compare-and-swap (Envoy writes a new key whatever cas is given).
pub(crate) fn init_shared<W: PartialEq, C: Eq + Hash>(keeper: &TokenKeeper<W, C>) {
    let key = keeper.shared_key();
    if let Some((None, _)) = read_shared(&key) {
        let _ = hostcalls::set_shared_data(&key, Some(b""), None);
    }
}

/// Before a call needs the token at `now`: takes the one another VM shared if this VM has none
/// usable.
pub(crate) fn adopt_shared<W: PartialEq, C: Eq + Hash>(
    keeper: &mut TokenKeeper<W, C>,
    now: u64,
    counters: TokenCounters,
) {
    if keeper.authorization(now).is_some() {
        return;
    }
    if let Some((entry, _)) = read_shared(&keeper.shared_key()) {
        if keeper.adopt(entry.as_deref(), now) {
            counters.shared.inc();
        }
    }
}

/// The root's tick: the calls that waited for another VM's token, released (with the token,
/// or failed), if it came.
pub(crate) fn sync_shared<W: PartialEq, C: Eq + Hash>(
    keeper: &mut TokenKeeper<W, C>,
    now: u64,
    counters: TokenCounters,
) -> Option<Fetched<W>> {
    let (entry, _) = read_shared(&keeper.shared_key())?;
    let had = keeper.authorization(now).is_some();
    let released = keeper.sync_shared(entry.as_deref(), now);
    if !had && keeper.authorization(now).is_some() {
        counters.shared.inc();
    }
    released
}

/// The stage's `Stage::prompt_tick_ms`: while calls wait for a token that no request of this
/// VM's own will bring (another VM's, read on the tick; or the root's, sent on the tick).
pub(crate) fn prompt_tick_ms<W: PartialEq, C: Eq + Hash>(
    keeper: Option<&TokenKeeper<W, C>>,
) -> Option<u64> {
    keeper
        .is_some_and(TokenKeeper::wants_prompt_tick)
        .then_some(PROMPT_TICK_MS)
}

/// Claims the fetch in the shared entry, then sends `keeper`'s token request from `owner`'s
/// context (None: the root), unless another VM holds the claim. A stage without a registry
/// token (`keeper` None) cannot fetch one.
pub(crate) fn send_token_request<W: PartialEq, C: Eq + Hash>(
    stage: &str,
    keeper: Option<&mut TokenKeeper<W, C>>,
    owner: Option<u32>,
    counters: TokenCounters,
) -> TokenFetch {
    let Some(keeper) = keeper else {
        return TokenFetch::Failed;
    };
    let now = now_secs().unwrap_or(0);
    let key = keeper.shared_key();
    let mut claimed = false;
    for _ in 0..CAS_ATTEMPTS {
        let Some((entry, cas)) = read_shared(&key) else {
            // No shared data: this VM fetches its own.
            keeper.unshared();
            claimed = true;
            break;
        };
        match keeper.claim(entry.as_deref(), now) {
            Claim::Elsewhere => return TokenFetch::Elsewhere,
            Claim::Write(bytes) => match hostcalls::set_shared_data(&key, Some(&bytes), cas) {
                Err(Status::CasMismatch) => {
                    keeper.claim_refused();
                    continue;
                }
                Ok(()) | Err(_) => {
                    claimed = true;
                    break;
                }
            },
        }
    }
    if !claimed {
        keeper.claim_lost(now);
        return TokenFetch::Elsewhere;
    }
    match proxy_glue::dispatch_call(
        stage,
        &keeper.request(),
        counters.callouts,
        counters.callout_failures,
    ) {
        Some(sent) => {
            keeper.fetch_sent(owner);
            TokenFetch::Sent(sent)
        }
        None => {
            keeper.fetch_not_sent();
            publish(keeper);
            TokenFetch::Failed
        }
    }
}

/// Stream `ctx` ended: true if it had sent the token request (Envoy cancels it), whose claim
/// in the shared entry is then dropped so that the other VMs need not wait for it to expire.
pub(crate) fn forget_stream<W: PartialEq, C: Eq + Hash>(
    keeper: &mut TokenKeeper<W, C>,
    ctx: u32,
) -> bool {
    if !keeper.forget_stream(ctx) {
        return false;
    }
    publish(keeper);
    true
}

/// Writes what this VM's fetch gave (the token, or its failure) to the shared entry.
fn publish<W: PartialEq, C: Eq + Hash>(keeper: &mut TokenKeeper<W, C>) {
    let key = keeper.shared_key();
    for _ in 0..CAS_ATTEMPTS {
        let Some((entry, cas)) = read_shared(&key) else {
            return;
        };
        let Some(bytes) = keeper.publish(entry.as_deref()) else {
            return;
        };
        match hostcalls::set_shared_data(&key, Some(&bytes), cas) {
            Err(Status::CasMismatch) => continue,
            _ => break,
        }
    }
    keeper.published();
}

/// Hands the IdP's answer to `keeper`, counted, shared with the other VMs, and logged when it
/// gave no token (`upstream` names what the token is for). None: the stage has no registry
/// token.
pub(crate) fn token_answered<W: PartialEq, C: Eq + Hash>(
    stage: &str,
    keeper: Option<&mut TokenKeeper<W, C>>,
    (status, body): (u32, &[u8]),
    counters: TokenCounters,
    upstream: &str,
) -> Option<Fetched<W>> {
    let keeper = keeper?;
    let fetched = keeper.answered(status, body, now_secs().unwrap_or(0));
    publish(keeper);
    match &fetched.failure {
        None => counters.fetched.inc(),
        Some(why) => {
            counters.failed.inc();
            log::warn!(
                "{stage}: no access token for the {upstream}: {}",
                bounded(why)
            );
        }
    }
    Some(fetched)
}
