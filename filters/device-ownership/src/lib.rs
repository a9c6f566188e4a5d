//! device-ownership: only a device's owner, or whom the owner delegates, reads or writes the
//! entities of its device (see this crate's README).
//!
//! A thin wrapper: the stage is `http_stages::device_ownership` (the same code `ngsi-gateway`
//! runs: ownership lookups and claims through the shared lookups, create bodies, list answers
//! filtered in the response phase), the decisions `policy::ownership`'s.

use http_stages::device_ownership::{DeviceOwnershipStage, NAME};
use http_stages::Stage;

proxy_wasm::main! {{
    http_stages::main(NAME, build);
}}

fn build() -> Option<Vec<Box<dyn Stage>>> {
    let stage = DeviceOwnershipStage::from_plugin_config()?;
    Some(vec![Box::new(stage)])
}
