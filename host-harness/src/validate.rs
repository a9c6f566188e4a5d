//! `host-harness validate`: does a filter accept a configuration? The real .wasm is started
//! as Envoy starts a plugin (`_initialize`, root context, `proxy_on_vm_start`,
//! `proxy_on_configure` with the configuration bytes as given), and what the filter logged
//! while starting is the reason. Nothing else runs: no request, no tick, no callout answered.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use crate::shared::{LogLine, Shared};
use crate::vm::{FailurePolicy, Limits, PluginSpec, PluginVm, Runtime, VmFailure};

/// What validation found.
#[derive(Debug)]
pub struct Validation {
    /// Why the filter did not start; `None` means it accepted the configuration.
    pub failure: Option<VmFailure>,
    /// What the filter logged while starting (the reason for a refusal, warnings otherwise).
    pub logs: Vec<LogLine>,
}

impl Validation {
    pub fn accepted(&self) -> bool {
        self.failure.is_none()
    }
}

/// Starts `wasm` with `configuration` as Envoy's plugin `name` (root id `root_id`, VM id =
/// `name` as render.py sets it). `clusters`: the cluster names the filter may call (only
/// a callout made while starting looks them up). `vm_env`: the VM's environment (name, value).
pub fn validate(
    runtime: &Runtime,
    wasm: PathBuf,
    name: &str,
    root_id: &str,
    configuration: Vec<u8>,
    clusters: HashSet<String>,
    vm_env: Vec<(String, String)>,
) -> Result<Validation> {
    // Envoy's clock is the wall clock: a configuration with dates is judged as of now.
    let now_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let shared = Arc::new(Shared::new(now_nanos, false));
    let spec = PluginSpec {
        name: name.to_string(),
        root_id: root_id.to_string(),
        vm_id: name.to_string(),
        wasm,
        configuration,
        vm_configuration: Vec::new(),
        limits: Limits::default(),
        allow_on_headers_stop_iteration: false,
        failure_policy: FailurePolicy::FailClosed,
        vm_env,
    };
    let vm = PluginVm::start(runtime, spec, shared.clone(), Arc::new(clusters), 0)?;
    Ok(Validation {
        failure: vm.failure.clone(),
        logs: shared.logs(),
    })
}
