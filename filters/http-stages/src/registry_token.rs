//! Sending a stage's registry-token request and reading the IdP's answer: the host side of
//! `policy::client_credentials::TokenKeeper`, shared by token-auth (device registry) and
//! device-ownership (ownership registry).

use std::hash::Hash;

use policy::client_credentials::{Fetched, TokenKeeper};
use policy::log_text::bounded;
use proxy_glue::Counter;

/// A stage's counters for its registry token and its callouts.
#[derive(Clone, Copy)]
pub(crate) struct TokenCounters {
    pub fetched: Counter,
    pub failed: Counter,
    pub callouts: Counter,
    pub callout_failures: Counter,
}

/// Sends `keeper`'s token request from `owner`'s context (None: the root); the callout's
/// token, or None when the host refused the call.
pub(crate) fn send_token_request<W: PartialEq, C: Eq + Hash>(
    stage: &str,
    keeper: &mut TokenKeeper<W, C>,
    owner: Option<u32>,
    counters: TokenCounters,
) -> Option<u32> {
    let sent = proxy_glue::dispatch_call(
        stage,
        &keeper.request(),
        counters.callouts,
        counters.callout_failures,
    )?;
    keeper.fetch_sent(owner);
    Some(sent)
}

/// Hands the IdP's answer to `keeper`, counted, and logged when it gave no token (`upstream`
/// names what the token is for).
pub(crate) fn token_answered<W: PartialEq, C: Eq + Hash>(
    stage: &str,
    keeper: &mut TokenKeeper<W, C>,
    (status, body): (u32, &[u8]),
    now: u64,
    counters: TokenCounters,
    upstream: &str,
) -> Fetched<W> {
    let fetched = keeper.answered(status, body, now);
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
    fetched
}
