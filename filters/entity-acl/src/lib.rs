//! entity-acl: decides every NGSI request (v2, NGSI-LD, FogFlow NGSI9/10) against the entity
//! ACL of its configuration, with the identity token-auth put in the request headers.
//!
//! A thin wrapper: the stage is `http_stages::entity_acl` (the same code `ngsi-gateway` runs),
//! the decision `policy::entity_acl`'s. Envoy must run this filter with
//! `allow_on_headers_stop_iteration: true`, or the body never reaches it.

use http_stages::entity_acl::{EntityAclStage, NAME};
use http_stages::Stage;

proxy_wasm::main! {{
    http_stages::main(NAME, build);
}}

fn build() -> Option<Vec<Box<dyn Stage>>> {
    let stage = EntityAclStage::from_plugin_config()?;
    Some(vec![Box::new(stage)])
}
