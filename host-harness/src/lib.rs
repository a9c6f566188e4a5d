//! host-harness: runs Proxy-Wasm filters (the same .wasm Envoy loads) outside Envoy, with
//! Envoy's semantics, for tests and for operators who want to try a policy before deploying it.
//!
//! - [`abi`]: ABI 0.2.1 constants and the header-pair wire format.
//! - [`host`]: the `proxy_*` imports and the state they act on.
//! - [`vm`]: one plugin in one VM, Envoy's start sequence, guarded calls (fuel, memory, traps).
//! - [`chain`]: a filter chain driven like Envoy's filter manager (HTTP and TCP).
//! - [`scenario`]: scenario files (TOML) and the runner behind `host-harness run`.
//! - [`validate`]: does a filter accept a configuration (`host-harness validate`).

pub mod abi;
pub mod chain;
pub mod host;
pub mod scenario;
pub mod shared;
pub mod validate;
pub mod vm;

pub use chain::{
    Chain, HttpOutcome, HttpRequest, MultiNetEvent, NetEvent, NetOutcome, UpstreamResponse,
};
pub use shared::{MetricValue, Shared};
pub use vm::{FailurePolicy, Limits, PluginSpec, Runtime, Usage, VmFailure};
