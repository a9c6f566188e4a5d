//! ngsi-gateway: the HTTP chain in one module, one pass. Its stages are the very ones the
//! separate filters wrap (`http_stages::token_auth`, `http_stages::device_ownership`,
//! `http_stages::entity_acl`), run in that order: the request headers are read once, the caller
//! token-auth authenticated is handed to the later stages in memory (token-auth still writes
//! the identity headers for the broker), the body is buffered once (and a create body
//! device-ownership rewrites is what entity-acl and the broker see), and one local response
//! answers a denial at any stage. Responses pass the stages in reverse order, as Envoy runs
//! separate filters: device-ownership filters list answers to what the caller may read.
//!
//! Configuration: `{"token_auth": {...}, "device_ownership": {...}, "entity_acl": {...}}`,
//! each key holding exactly what that filter's configuration holds; an absent key skips the
//! stage, an unknown key or an empty object is refused, and an error names its JSON path from
//! the key (`configuration refused at entity_acl.acl.rules[1].effect: ...`).

use http_stages::device_ownership::DeviceOwnershipStage;
use http_stages::entity_acl::EntityAclStage;
use http_stages::token_auth::TokenAuthStage;
use http_stages::Stage;
use policy::entity_acl::EntityAclConfig;
use policy::ownership::OwnershipConfig;
use policy::token_auth::TokenAuthConfig;
use serde::Deserialize;

const NAME: &str = "ngsi-gateway";

proxy_wasm::main! {{
    http_stages::main(NAME, build);
}}

/// The gateway's configuration: one optional key per stage, run in this order.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayConfig {
    token_auth: Option<TokenAuthConfig>,
    device_ownership: Option<OwnershipConfig>,
    entity_acl: Option<EntityAclConfig>,
}

fn build() -> Option<Vec<Box<dyn Stage>>> {
    proxy_glue::load_config(NAME, stages)
}

/// The stages of a parsed configuration, in chain order. An engine's own check names the key
/// (`entity_acl: ...`), as serde's path does.
fn stages(config: GatewayConfig) -> Result<Vec<Box<dyn Stage>>, String> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(c) = config.token_auth {
        stages.push(Box::new(
            TokenAuthStage::new(c).map_err(|e| format!("token_auth: {e}"))?,
        ));
    }
    if let Some(c) = config.device_ownership {
        stages.push(Box::new(
            DeviceOwnershipStage::new(c).map_err(|e| format!("device_ownership: {e}"))?,
        ));
    }
    if let Some(c) = config.entity_acl {
        stages.push(Box::new(
            EntityAclStage::new(c).map_err(|e| format!("entity_acl: {e}"))?,
        ));
    }
    if stages.is_empty() {
        return Err(
            "no stage configured: give at least one of token_auth, device_ownership, \
                    entity_acl (a gateway that checks nothing is a mistake)"
                .into(),
        );
    }
    log::info!(
        "{NAME}: stages {}",
        stages
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    Ok(stages)
}
