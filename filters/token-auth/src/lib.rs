//! token-auth: the first filter of the chain. It authenticates every request and hands the
//! caller's identity to the later filters and the broker as request headers, after removing
//! any copy the client sent.
//!
//! A thin wrapper: the stage is `http_stages::token_auth` (the same code `ngsi-gateway` runs:
//! JWKS and introspection callouts, shared lookups, key refresh), the decisions
//! `policy::token_auth`'s.

use http_stages::token_auth::{TokenAuthStage, NAME};
use http_stages::Stage;

proxy_wasm::main! {{
    http_stages::main(NAME, build);
}}

fn build() -> Option<Vec<Box<dyn Stage>>> {
    let stage = TokenAuthStage::from_plugin_config()?;
    Some(vec![Box::new(stage)])
}
