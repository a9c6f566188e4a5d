//! One plugin in one Wasm VM: instantiation, Envoy's lifecycle order, and guarded calls into
//! the guest (fuel limit, memory cap, trap → failed VM).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use wasmtime::{
    Config, Engine, Instance, Linker, Module, Store, StoreLimitsBuilder, TypedFunc, WasmParams,
    WasmResults,
};
use wasmtime_wasi::WasiCtxBuilder;

use crate::host::{add_proxy_imports, Deferred, HostState, Open, PluginInfo, StreamContext};
use crate::shared::{lock, Shared};

/// Envoy's log levels; the harness runs at info unless told otherwise.
pub const LOG_LEVEL_INFO: u32 = 2;

/// Limits against runaway guests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) one callback may burn.
    pub fuel_per_call: u64,
    /// Largest linear memory a VM may grow to.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_call: 2_000_000_000,
            memory_bytes: 256 << 20,
        }
    }
}

/// The engine, the compiled-module cache and the linker: build once, instantiate many times.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    modules: Mutex<HashMap<PathBuf, Module>>,
}

impl Runtime {
    pub fn new() -> Result<Self> {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(wt)?;
        let mut linker = Linker::new(&engine);
        add_proxy_imports(&mut linker).map_err(wt)?;
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut HostState| &mut s.wasi)
            .map_err(wt)?;
        Ok(Runtime {
            engine,
            linker,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Compiles a module once; later calls reuse it.
    pub fn module(&self, path: &Path) -> Result<Module> {
        if let Some(m) = lock(&self.modules).get(path) {
            return Ok(m.clone());
        }
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow!("cannot read wasm module {}: {e}", path.display()))?;
        let module = Module::new(&self.engine, bytes)
            .map_err(|e| anyhow!("cannot compile {}: {e:?}", path.display()))?;
        lock(&self.modules).insert(path.to_path_buf(), module.clone());
        Ok(module)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Names every import a module needs that the harness does not provide.
    pub fn missing_imports(&self, module: &Module) -> Vec<String> {
        let mut store = Store::new(&self.engine, dummy_state());
        module
            .imports()
            .filter(|i| self.linker.get_by_import(&mut store, i).is_none())
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect()
    }
}

fn dummy_state() -> HostState {
    HostState {
        wasi: WasiCtxBuilder::new().build_p1(),
        limits: StoreLimitsBuilder::new().build(),
        shared: Arc::new(Shared::default()),
        plugin: PluginInfo {
            name: String::new(),
            root_id: String::new(),
            vm_id: String::new(),
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
        },
        vm_index: 0,
        clusters: Arc::new(HashSet::new()),
        memory: None,
        allocate: None,
        root_context_id: 0,
        effective_context: 0,
        streams: HashMap::new(),
        in_configure: false,
        in_vm_start: false,
        tick_period_ms: 0,
        tick_armed_nanos: None,
        deferred: Vec::new(),
        pending_calls: Vec::new(),
        call_response: None,
        call_status: (0, String::new()),
        next_token: 0,
        metric_names: Vec::new(),
        log_level: LOG_LEVEL_INFO,
        host_calls: Default::default(),
    }
}

/// What a plugin is: its module and configuration, as in Envoy's `envoy.filters.http.wasm`.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub wasm: PathBuf,
    pub configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub limits: Limits,
    /// Envoy's `allow_on_headers_stop_iteration` (default false). False: a Pause from a
    /// header callback holds the body and trailers away from this filter until it continues
    /// (Envoy's StopAllIterationAndWatermark). True: the filter sees the body while its
    /// headers are stopped, and a Continue from the body callback lets everything go on.
    pub allow_on_headers_stop_iteration: bool,
    /// Envoy's `failure_policy`: what happens after the VM traps.
    pub failure_policy: FailurePolicy,
    /// The VM's environment (WASI `environ_get`), as Envoy's `vm_config.environment_variables`
    /// (`host_env_keys` copied from Envoy's own environment, `key_values` given): name, value.
    pub vm_env: Vec<(String, String)>,
}

/// Envoy's wasm `PluginConfig.failure_policy`, as far as it concerns a VM that fails at run
/// time (a trap). In both, the request that meets the failure is refused (503). FAIL_OPEN
/// (skip the failed filter) is not modelled: never acceptable for a security filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// FAIL_RELOAD (our templates' default): a request arriving after the VM failed starts a
    /// fresh VM (same configuration, fresh root context, `proxy_on_vm_start` and
    /// `proxy_on_configure` again) if `backoff_ms` have passed since the VM was last loaded;
    /// otherwise it is refused and counted as `wasm.<plugin>.vm_reload_backoff`. Envoy rate-limits
    /// reloads from the last load with a jittered lower bound of `reload_config.backoff`'s base
    /// (1 s by default); the harness uses the bound itself. So a VM that ran for a while comes
    /// back on the next request, one that failed right after a (re)load ~1 s later (measured in
    /// Envoy 1.40: 0.2 s and 1.2-1.5 s).
    Reload { backoff_ms: u64 },
    /// FAIL_CLOSED: the VM stays dead; every later request is refused.
    FailClosed,
}

impl FailurePolicy {
    /// Envoy's default reload backoff base interval.
    pub const DEFAULT_RELOAD_BACKOFF_MS: u64 = 1000;
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::Reload {
            backoff_ms: Self::DEFAULT_RELOAD_BACKOFF_MS,
        }
    }
}

/// Why a plugin is not serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmFailure {
    /// `proxy_on_vm_start` or `proxy_on_configure` answered false.
    ConfigRejected,
    /// The guest trapped (bad pointer, panic, out of fuel, memory cap, …).
    Trapped(String),
}

impl std::fmt::Display for VmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmFailure::ConfigRejected => write!(f, "configuration rejected by the plugin"),
            VmFailure::Trapped(why) => write!(f, "VM trapped: {why}"),
        }
    }
}

pub struct PluginVm {
    pub spec: PluginSpec,
    store: Store<HostState>,
    instance: Instance,
    next_context_id: u32,
    pub root_context_id: u32,
    pub failure: Option<VmFailure>,
    /// The start sequence completed and the VM served: a later failure is a run-time one,
    /// which FAIL_RELOAD recovers from (a VM that never started is not reloaded).
    pub started: bool,
    /// Clock time this plugin's VM was last loaded or a reload was tried (ns): FAIL_RELOAD's
    /// backoff counts from it.
    pub loaded_at_nanos: u64,
    /// Fresh VMs started after run-time failures of this plugin (carried across reloads).
    pub reloads: u64,
    /// Clock time of the last tick delivered (ns).
    pub last_tick_nanos: u64,
    /// What the guest has cost so far, for budgets and fuzzing.
    pub usage: Usage,
    /// Callbacks made into the guest, by export (each is a VM entry in Envoy too).
    pub callbacks: std::collections::BTreeMap<&'static str, u64>,
    /// Fuel burned, by export.
    pub fuel_by_export: std::collections::BTreeMap<&'static str, u64>,
}

/// What a VM's guest has cost: fuel (roughly, wasm instructions) per callback and linear
/// memory. Linear memory never shrinks, so `memory_bytes` is also the VM's high-water mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Fuel burned by all callbacks.
    pub fuel_total: u64,
    /// The most fuel one callback burned.
    pub fuel_max_call: u64,
    /// The export that burned `fuel_max_call`.
    pub fuel_max_call_export: &'static str,
    /// Callbacks made.
    pub calls: u64,
}

impl PluginVm {
    /// Instantiates the module and runs Envoy's start sequence: `_initialize`, root context
    /// create, `proxy_on_vm_start`, `proxy_on_configure`. A plugin that answers false, or
    /// traps, comes back with `failure` set — Envoy then fails every request to it closed.
    pub fn start(
        runtime: &Runtime,
        spec: PluginSpec,
        shared: Arc<Shared>,
        clusters: Arc<HashSet<String>>,
        vm_index: usize,
    ) -> Result<Self> {
        let module = runtime.module(&spec.wasm)?;
        let state = HostState {
            wasi: WasiCtxBuilder::new().envs(&spec.vm_env).build_p1(),
            limits: StoreLimitsBuilder::new()
                .memory_size(spec.limits.memory_bytes)
                .build(),
            shared,
            plugin: PluginInfo {
                name: spec.name.clone(),
                root_id: spec.root_id.clone(),
                vm_id: spec.vm_id.clone(),
                configuration: spec.configuration.clone(),
                vm_configuration: spec.vm_configuration.clone(),
            },
            vm_index,
            clusters,
            ..dummy_state()
        };
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(spec.limits.fuel_per_call).map_err(wt)?;
        let instance = runtime
            .linker
            .instantiate(&mut store, &module)
            .map_err(|e| anyhow!("cannot instantiate {}: {e:?}", spec.wasm.display()))?;
        let memory = instance.get_memory(&mut store, "memory");
        let allocate = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .ok();
        store.data_mut().memory = memory;
        store.data_mut().allocate = allocate;
        let mut vm = PluginVm {
            spec,
            store,
            instance,
            next_context_id: 0,
            root_context_id: 0,
            failure: None,
            started: false,
            loaded_at_nanos: 0,
            reloads: 0,
            last_tick_nanos: 0,
            usage: Usage::default(),
            callbacks: Default::default(),
            fuel_by_export: Default::default(),
        };
        vm.last_tick_nanos = vm.store.data().shared.now_nanos();
        vm.loaded_at_nanos = vm.last_tick_nanos;
        vm.boot()?;
        vm.started = vm.failure.is_none();
        Ok(vm)
    }

    fn boot(&mut self) -> Result<()> {
        for init in ["_initialize", "_start"] {
            if self.has_export(init) {
                if let Err(e) = self.call::<(), ()>(init, ()) {
                    self.failure = Some(VmFailure::Trapped(e));
                    return Ok(());
                }
                break;
            }
        }
        let root = self.new_context_id();
        self.root_context_id = root;
        self.store.data_mut().root_context_id = root;
        self.store.data_mut().effective_context = root;
        if let Err(e) = self.call::<(u32, u32), ()>("proxy_on_context_create", (root, 0)) {
            self.failure = Some(VmFailure::Trapped(e));
            return Ok(());
        }
        let vm_config_len = self.spec.vm_configuration.len() as u32;
        self.store.data_mut().in_vm_start = true;
        let started = self.call::<(u32, u32), i32>("proxy_on_vm_start", (root, vm_config_len));
        self.store.data_mut().in_vm_start = false;
        match started {
            Err(e) => self.failure = Some(VmFailure::Trapped(e)),
            Ok(0) => self.failure = Some(VmFailure::ConfigRejected),
            Ok(_) => self.configure()?,
        }
        Ok(())
    }

    fn configure(&mut self) -> Result<()> {
        let root = self.root_context_id;
        let len = self.spec.configuration.len() as u32;
        self.store.data_mut().in_configure = true;
        let configured = self.call::<(u32, u32), i32>("proxy_on_configure", (root, len));
        self.store.data_mut().in_configure = false;
        match configured {
            Err(e) => self.failure = Some(VmFailure::Trapped(e)),
            Ok(0) => self.failure = Some(VmFailure::ConfigRejected),
            Ok(_) => {}
        }
        Ok(())
    }

    pub fn is_serving(&self) -> bool {
        self.failure.is_none()
    }

    /// A VM that served and then trapped, under FAIL_RELOAD: its reload backoff (ms), else None.
    pub fn reload_backoff_ms(&self) -> Option<u64> {
        match (&self.failure, self.spec.failure_policy) {
            (Some(VmFailure::Trapped(_)), FailurePolicy::Reload { backoff_ms }) if self.started => {
                Some(backoff_ms)
            }
            _ => None,
        }
    }

    /// The guest's linear memory now, in bytes (it never shrinks: this is the high-water mark).
    pub fn memory_bytes(&mut self) -> usize {
        match self.store.data().memory {
            Some(memory) => memory.data_size(&self.store),
            None => 0,
        }
    }

    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    fn has_export(&mut self, name: &str) -> bool {
        self.instance.get_func(&mut self.store, name).is_some()
    }

    fn new_context_id(&mut self) -> u32 {
        self.next_context_id += 1;
        self.next_context_id
    }

    /// Calls an export with a fresh fuel budget. A trap marks the VM failed and comes back
    /// as the error text. A missing export is treated as the SDK's default (no call).
    fn call<P: WasmParams, R: WasmResults + Default>(
        &mut self,
        name: &str,
        params: P,
    ) -> Result<R, String> {
        let func: TypedFunc<P, R> = match self.instance.get_typed_func(&mut self.store, name) {
            Ok(f) => f,
            Err(e) => {
                if self.instance.get_func(&mut self.store, name).is_none() {
                    return Ok(R::default());
                }
                return Err(format!("export {name} has the wrong signature: {e}"));
            }
        };
        if let Err(e) = self.store.set_fuel(self.spec.limits.fuel_per_call) {
            return Err(e.to_string());
        }
        let called = func.call(&mut self.store, params);
        let burned = self
            .spec
            .limits
            .fuel_per_call
            .saturating_sub(self.store.get_fuel().unwrap_or(0));
        self.usage.calls += 1;
        *self.callbacks.entry(export_label(name)).or_default() += 1;
        *self.fuel_by_export.entry(export_label(name)).or_default() += burned;
        self.usage.fuel_total = self.usage.fuel_total.saturating_add(burned);
        if burned > self.usage.fuel_max_call {
            self.usage.fuel_max_call = burned;
            self.usage.fuel_max_call_export = export_label(name);
        }
        match called {
            Ok(r) => Ok(r),
            Err(e) => {
                let why = format!("{name}: {}", trap_text(&e));
                self.failure = Some(VmFailure::Trapped(why.clone()));
                self.store
                    .data()
                    .shared
                    .log(&self.spec.name, 4, format!("wasm trap: {why}"));
                Err(why)
            }
        }
    }

    /// Creates a stream context (HTTP stream or TCP connection) bound to shared stream data.
    pub fn create_stream(&mut self, data: crate::host::SharedStream) -> Result<u32, String> {
        let id = self.new_context_id();
        self.store.data_mut().streams.insert(
            id,
            StreamContext {
                data,
                open: Open::default(),
            },
        );
        let root = self.root_context_id;
        self.with_effective(id, |vm| {
            vm.call::<(u32, u32), ()>("proxy_on_context_create", (id, root))
        })?;
        Ok(id)
    }

    pub fn open_mut(&mut self, ctx: u32) -> Option<&mut Open> {
        self.store
            .data_mut()
            .streams
            .get_mut(&ctx)
            .map(|c| &mut c.open)
    }

    /// Runs a callback with the effective context set, as Envoy does for each call.
    fn with_effective<R>(
        &mut self,
        ctx: u32,
        f: impl FnOnce(&mut Self) -> Result<R, String>,
    ) -> Result<R, String> {
        self.store.data_mut().effective_context = ctx;
        let r = f(self);
        self.store.data_mut().effective_context = self.root_context_id;
        r
    }

    /// A stream callback that answers an Action (headers, body, trailers, data).
    pub fn call_action(
        &mut self,
        ctx: u32,
        export: &str,
        args: (u32, u32, u32),
        arity: usize,
    ) -> Result<crate::abi::Action, String> {
        let raw = self.with_effective(ctx, |vm| match arity {
            1 => vm.call::<u32, i32>(export, args.0),
            2 => vm.call::<(u32, u32), i32>(export, (args.0, args.1)),
            _ => vm.call::<(u32, u32, u32), i32>(export, args),
        })?;
        Ok(crate::abi::Action::from_raw(raw))
    }

    /// A stream callback without an answer (close notifications, log, delete).
    pub fn call_void(&mut self, ctx: u32, export: &str, args: &[u32]) -> Result<(), String> {
        self.with_effective(ctx, |vm| match args {
            [a] => vm.call::<u32, ()>(export, *a),
            [a, b] => vm.call::<(u32, u32), ()>(export, (*a, *b)),
            _ => Err(format!("call_void: unsupported arity for {export}")),
        })
    }

    /// Ends a stream context: done, log, delete (Envoy's order).
    pub fn finish_stream(&mut self, ctx: u32) {
        if self.is_serving() {
            let _ = self.with_effective(ctx, |vm| vm.call::<u32, i32>("proxy_on_done", ctx));
        }
        if self.is_serving() {
            let _ = self.call_void(ctx, "proxy_on_log", &[ctx]);
        }
        if self.is_serving() {
            let _ = self.call_void(ctx, "proxy_on_delete", &[ctx]);
        }
        self.store.data_mut().streams.remove(&ctx);
    }

    pub fn take_deferred(&mut self) -> Vec<(u32, Deferred)> {
        std::mem::take(&mut self.store.data_mut().deferred)
    }

    pub fn take_pending_calls(&mut self) -> Vec<crate::host::PendingCall> {
        std::mem::take(&mut self.store.data_mut().pending_calls)
    }

    /// Delivers a callout's answer to the context that made the call. `None` is a failed
    /// call (reset): zero headers, status BrokenConnection, as Envoy reports it.
    pub fn deliver_call_response(
        &mut self,
        context_id: u32,
        token: u32,
        response: Option<crate::host::CallResponse>,
    ) -> Result<(), String> {
        let (headers, body, trailers) = response
            .as_ref()
            .map(|r| (r.headers.len(), r.body.len(), r.trailers.len()))
            .unwrap_or((0, 0, 0));
        let state = self.store.data_mut();
        state.call_status = if response.is_some() {
            (0, String::new())
        } else {
            (11, "reset".to_string())
        };
        state.call_response = response;
        let context_id = if state.streams.contains_key(&context_id) {
            context_id
        } else {
            state.root_context_id
        };
        let r = self.with_effective(context_id, |vm| {
            vm.call::<(u32, u32, u32, u32, u32), ()>(
                "proxy_on_http_call_response",
                (
                    context_id,
                    token,
                    headers as u32,
                    body as u32,
                    trailers as u32,
                ),
            )
        });
        let state = self.store.data_mut();
        state.call_response = None;
        state.call_status = (0, String::new());
        r
    }

    /// When this VM's next tick is due (ns), if it asked for ticks and is serving.
    pub fn next_tick_nanos(&self) -> Option<u64> {
        let state = self.store.data();
        let period = state.tick_period_ms as u64 * 1_000_000;
        let last = state.tick_armed_nanos.unwrap_or(self.last_tick_nanos);
        (period > 0 && self.is_serving()).then(|| last + period)
    }

    /// Fires `proxy_on_tick` for every tick period the clock has crossed (at most `max`). A
    /// period set again (even from a tick) restarts the count from when it was set.
    pub fn fire_ticks(&mut self, now_nanos: u64, max: u32) -> Result<u32, String> {
        let mut fired = 0;
        loop {
            if let Some(armed) = self.store.data_mut().tick_armed_nanos.take() {
                self.last_tick_nanos = armed;
            }
            let period = self.store.data().tick_period_ms as u64 * 1_000_000;
            if period == 0 || !self.is_serving() {
                self.last_tick_nanos = now_nanos;
                return Ok(fired);
            }
            if self.last_tick_nanos + period > now_nanos || fired >= max {
                return Ok(fired);
            }
            self.last_tick_nanos += period;
            let root = self.root_context_id;
            self.call_void(root, "proxy_on_tick", &[root])?;
            fired += 1;
        }
    }

    /// Asks the filter to hand the counts it holds to the host now (our filters' export
    /// `iot_flush_counters`; a module without it holds nothing back). Envoy never calls it:
    /// there the root's tick flushes, at most a tick period later. Scenarios' `metrics`
    /// expectations read the counters after it, as Envoy's stats show them once that period
    /// passed.
    pub fn flush_counters(&mut self) -> Result<(), String> {
        if !self.is_serving() {
            return Ok(());
        }
        let root = self.root_context_id;
        self.with_effective(root, |vm| vm.call::<(), ()>("iot_flush_counters", ()))
    }

    /// The plugin goes away (replaced by a new configuration): Envoy's `startShutdown` calls
    /// the root context's `proxy_on_done` (our filters flush their counters there).
    pub fn root_done(&mut self) {
        if self.is_serving() {
            let root = self.root_context_id;
            let _ = self.with_effective(root, |vm| vm.call::<u32, i32>("proxy_on_done", root));
        }
    }

    pub fn queue_ready(&mut self, root: u32, queue: u32) -> Result<(), String> {
        self.call_void(root, "proxy_on_queue_ready", &[root, queue])
    }
}

fn trap_text(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => format!("{trap}"),
        None => format!("{e}"),
    }
}

/// wasmtime's error type is its own; the harness reports with anyhow.
fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// Error for a module that can't serve at all.
pub fn not_serving(vm: &PluginVm) -> anyhow::Error {
    anyhow!(
        "plugin {} is not serving: {}",
        vm.spec.name,
        vm.failure
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    )
}

/// A static name for an export (the ones the harness calls), for [`Usage`].
fn export_label(name: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "_initialize",
        "_start",
        "proxy_on_context_create",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_tick",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
        "proxy_on_http_call_response",
        "proxy_on_new_connection",
        "proxy_on_downstream_data",
        "proxy_on_upstream_data",
        "proxy_on_downstream_connection_close",
        "proxy_on_upstream_connection_close",
        "proxy_on_done",
        "proxy_on_log",
        "proxy_on_delete",
        "proxy_on_queue_ready",
    ];
    KNOWN
        .iter()
        .find(|k| **k == name)
        .copied()
        .unwrap_or("other")
}
