//! The state a VM's host calls act on, and the `proxy_*` imports themselves.
//!
//! Each import decodes its arguments, validates them, acts, and copies results out through
//! bounds-checked guest memory. A pointer outside the guest's memory is a trap, never a host
//! read or write out of bounds.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use wasmtime::{
    bail, format_err as anyhow, Caller, Linker, Memory, Result, StoreLimits, TypedFunc,
};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::abi::{
    deserialize_pairs, serialize_pairs, BufferType, MapType, MetricType, Pairs, Status, StreamType,
};
use crate::shared::{lock, Shared};

/// Data of one HTTP stream or TCP connection, shared by every filter of the chain (each filter
/// is its own VM, as in Envoy).
#[derive(Debug, Default)]
pub struct StreamData {
    pub request_headers: Pairs,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_trailers: Pairs,
    /// The body the current callback sees (Envoy's current or buffered data).
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub downstream_data: Vec<u8>,
    pub upstream_data: Vec<u8>,
    /// Properties as Envoy encodes them, keyed by path segments joined with NUL.
    pub properties: BTreeMap<String, Vec<u8>>,
    /// Set by `proxy_set_property`, readable back by later filters.
    pub filter_state: BTreeMap<String, Vec<u8>>,
}

pub type SharedStream = Arc<Mutex<StreamData>>;

/// Which of a stream's maps and buffers this filter's context may touch now. Envoy keeps a
/// pointer to each only while the filter is in (or stopped in) the matching callback.
#[derive(Debug, Default, Clone, Copy)]
pub struct Open {
    pub request_headers: bool,
    pub request_body: bool,
    pub request_trailers: bool,
    pub response_headers: bool,
    pub response_body: bool,
    pub response_trailers: bool,
    pub downstream: bool,
    pub upstream: bool,
}

pub struct StreamContext {
    pub data: SharedStream,
    pub open: Open,
}

/// Something a guest asked for during a callback; Envoy applies it after the callback returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Deferred {
    Continue(StreamType),
    Close(StreamType),
    LocalResponse(LocalResponse),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Pairs,
    pub grpc_status: i32,
}

#[derive(Debug, Clone)]
pub struct PendingCall {
    pub token: u32,
    pub context_id: u32,
    pub cluster: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub timeout_ms: u32,
}

/// An HTTP callout's answer, visible to the guest only inside `proxy_on_http_call_response`.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
}

/// Store data of one VM.
pub struct HostState {
    pub wasi: WasiP1Ctx,
    pub limits: StoreLimits,
    pub shared: Arc<Shared>,
    pub plugin: PluginInfo,
    /// This VM's index in the harness, for queue-ready delivery.
    pub vm_index: usize,
    pub clusters: Arc<HashSet<String>>,
    pub memory: Option<Memory>,
    pub allocate: Option<TypedFunc<u32, u32>>,
    pub root_context_id: u32,
    pub effective_context: u32,
    pub streams: std::collections::HashMap<u32, StreamContext>,
    /// Which lifecycle call is running: plugin configuration is readable only in configure,
    /// VM configuration only in vm_start.
    pub in_configure: bool,
    pub in_vm_start: bool,
    pub tick_period_ms: u32,
    /// When the root's timer was last (re)armed by `proxy_set_tick_period_milliseconds`: Envoy
    /// (`Wasm::setTimerPeriod`) disables the timer and starts a new one on every call, so the
    /// next tick comes one period after the call, whatever the old period's phase was.
    pub tick_armed_nanos: Option<u64>,
    pub deferred: Vec<(u32, Deferred)>,
    pub pending_calls: Vec<PendingCall>,
    pub call_response: Option<CallResponse>,
    pub call_status: (u32, String),
    pub next_token: u32,
    pub metric_names: Vec<String>,
    pub log_level: u32,
    /// Host calls the guest made, by import name (cumulative; `PluginVm::usage` counts the
    /// callbacks the other way). A filter's cost in Envoy is mostly crossings of the VM
    /// boundary, so benches report these per request.
    pub host_calls: RefCell<BTreeMap<&'static str, u64>>,
}

impl HostState {
    fn stream(&self) -> Option<&StreamContext> {
        self.streams.get(&self.effective_context)
    }
}

/// Counts one call of the import `name`.
fn count_call(caller: &Caller<'_, HostState>, name: &'static str) {
    *caller
        .data()
        .host_calls
        .borrow_mut()
        .entry(name)
        .or_default() += 1;
}

// ---------- guest memory ----------

fn memory(caller: &Caller<'_, HostState>) -> Result<Memory> {
    caller
        .data()
        .memory
        .ok_or_else(|| anyhow!("module exports no memory"))
}

/// Reads guest bytes; a range outside the memory traps.
fn read(caller: &Caller<'_, HostState>, ptr: u32, len: u32) -> Result<Vec<u8>> {
    let mem = memory(caller)?;
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or_else(|| anyhow!("guest range overflows"))?;
    mem.data(caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("guest pointer out of bounds: {ptr}+{len}"))
}

fn read_string(caller: &Caller<'_, HostState>, ptr: u32, len: u32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

fn write(caller: &mut Caller<'_, HostState>, ptr: u32, bytes: &[u8]) -> Result<()> {
    let mem = memory(caller)?;
    let start = ptr as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or_else(|| anyhow!("guest range overflows"))?;
    mem.data_mut(caller)
        .get_mut(start..end)
        .ok_or_else(|| anyhow!("guest pointer out of bounds: {ptr}+{}", bytes.len()))?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut Caller<'_, HostState>, ptr: u32, value: u32) -> Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Copies bytes into memory the guest allocates (`proxy_on_memory_allocate`) and writes the
/// pointer and size to the guest's out-parameters. Empty data is written as (0, 0), as Envoy
/// does — the Rust SDK then reports `None`.
fn copy_out(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ptr_out: u32,
    size_out: u32,
) -> Result<()> {
    let mut ptr = 0u32;
    if !bytes.is_empty() {
        let alloc = caller
            .data()
            .allocate
            .clone()
            .ok_or_else(|| anyhow!("module exports no proxy_on_memory_allocate"))?;
        ptr = alloc.call(&mut *caller, bytes.len() as u32)?;
        if ptr == 0 {
            bail!("proxy_on_memory_allocate returned null");
        }
        write(caller, ptr, bytes)?;
    }
    write_u32(caller, ptr_out, ptr)?;
    write_u32(caller, size_out, bytes.len() as u32)
}

// ---------- header maps and buffers ----------

/// Applies `f` to the map if this context may touch it now.
fn with_map<R>(state: &HostState, map: MapType, f: impl FnOnce(&mut Pairs) -> R) -> Option<R> {
    if let MapType::CallResponseHeaders | MapType::CallResponseTrailers = map {
        // Callout answers are read-only; treat writes as reads of a copy.
        let response = state.call_response.as_ref()?;
        let mut copy = if map == MapType::CallResponseHeaders {
            response.headers.clone()
        } else {
            response.trailers.clone()
        };
        return Some(f(&mut copy));
    }
    let ctx = state.stream()?;
    let mut data = lock(&ctx.data);
    let open = ctx.open;
    match map {
        MapType::RequestHeaders if open.request_headers => Some(f(&mut data.request_headers)),
        // Envoy lets the last body callback add trailers.
        MapType::RequestTrailers if open.request_trailers || open.request_body => {
            Some(f(&mut data.request_trailers))
        }
        MapType::ResponseHeaders if open.response_headers => Some(f(&mut data.response_headers)),
        MapType::ResponseTrailers if open.response_trailers || open.response_body => {
            Some(f(&mut data.response_trailers))
        }
        _ => None,
    }
}

fn is_writable(map: MapType) -> bool {
    matches!(
        map,
        MapType::RequestHeaders
            | MapType::RequestTrailers
            | MapType::ResponseHeaders
            | MapType::ResponseTrailers
    )
}

fn lower(key: &str) -> String {
    key.to_ascii_lowercase()
}

/// Replaces `[start, start+size)` of a buffer as Envoy does: prepend, replace all, or append.
fn splice(buffer: &mut Vec<u8>, start: usize, size: usize, data: &[u8]) -> Status {
    if start == 0 {
        if size == 0 {
            buffer.splice(0..0, data.iter().copied());
            Status::Ok
        } else if size >= buffer.len() {
            buffer.clear();
            buffer.extend_from_slice(data);
            Status::Ok
        } else {
            Status::BadArgument
        }
    } else if start >= buffer.len() {
        buffer.extend_from_slice(data);
        Status::Ok
    } else {
        Status::BadArgument
    }
}

fn with_buffer<R>(
    state: &HostState,
    buffer: BufferType,
    f: impl FnOnce(&mut Vec<u8>) -> R,
) -> Option<R> {
    match buffer {
        BufferType::PluginConfiguration if state.in_configure => {
            Some(f(&mut state.plugin.configuration.clone()))
        }
        BufferType::VmConfiguration => Some(f(&mut state.plugin.vm_configuration.clone())),
        BufferType::CallResponseBody => {
            let response = state.call_response.as_ref()?;
            Some(f(&mut response.body.clone()))
        }
        BufferType::RequestBody
        | BufferType::ResponseBody
        | BufferType::DownstreamData
        | BufferType::UpstreamData => {
            let ctx = state.stream()?;
            let open = ctx.open;
            let mut data = lock(&ctx.data);
            match buffer {
                BufferType::RequestBody if open.request_body => Some(f(&mut data.request_body)),
                BufferType::ResponseBody if open.response_body => Some(f(&mut data.response_body)),
                BufferType::DownstreamData if open.downstream => Some(f(&mut data.downstream_data)),
                BufferType::UpstreamData if open.upstream => Some(f(&mut data.upstream_data)),
                _ => None,
            }
        }
        _ => None,
    }
}

// ---------- properties ----------

/// Resolves a property path (segments separated by NUL, as the SDK sends them). Envoy's
/// attributes are stored under their dotted names ("request.path"); a single segment that
/// itself contains a dot is not an attribute path, exactly as in Envoy.
fn property(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    let path = String::from_utf8_lossy(path);
    let segments: Vec<&str> = path.trim_end_matches('\0').split('\0').collect();
    let raw = segments.join("\0");
    match raw.as_str() {
        "plugin_name" => return Some(state.plugin.name.clone().into_bytes()),
        "plugin_root_id" => return Some(state.plugin.root_id.clone().into_bytes()),
        "plugin_vm_id" => return Some(state.plugin.vm_id.clone().into_bytes()),
        _ => {}
    }
    let ctx = state.stream()?;
    let data = lock(&ctx.data);
    if let Some(value) = data.filter_state.get(&raw) {
        return Some(value.clone());
    }
    if segments.len() < 2 || segments.iter().any(|s| s.contains('.') || s.is_empty()) {
        return None;
    }
    match segments.as_slice() {
        ["request", "headers"] => return Some(serialize_pairs(&data.request_headers)),
        ["response", "headers"] => return Some(serialize_pairs(&data.response_headers)),
        ["request", "headers", name] => {
            let name = lower(name);
            return data
                .request_headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone());
        }
        _ => {}
    }
    data.properties.get(&segments.join(".")).cloned()
}

// ---------- the imports ----------

fn status(s: Status) -> Result<i32> {
    Ok(s.code())
}

/// Adds every `proxy_*` import of ABI 0.2.1 to the linker.
pub fn add_proxy_imports(linker: &mut Linker<HostState>) -> Result<()> {
    let env = "env";

    linker.func_wrap(
        env,
        "proxy_log",
        |caller: Caller<'_, HostState>, level: u32, ptr: u32, len: u32| -> Result<i32> {
            count_call(&caller, "proxy_log");
            let message = read_string(&caller, ptr, len)?;
            let state = caller.data();
            state.shared.log(&state.plugin.name, level, message);
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_log_level",
        |mut caller: Caller<'_, HostState>, out: u32| -> Result<i32> {
            count_call(&caller, "proxy_get_log_level");
            let level = caller.data().log_level;
            write_u32(&mut caller, out, level)?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, HostState>, out: u32| -> Result<i32> {
            count_call(&caller, "proxy_get_current_time_nanoseconds");
            let now = caller.data().shared.now_nanos();
            write(&mut caller, out, &now.to_le_bytes())?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_set_tick_period_milliseconds",
        |mut caller: Caller<'_, HostState>, period: u32| -> Result<i32> {
            count_call(&caller, "proxy_set_tick_period_milliseconds");
            let now = caller.data().shared.now_nanos();
            let state = caller.data_mut();
            state.tick_period_ms = period;
            state.tick_armed_nanos = Some(now);
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_buffer_bytes",
        |mut caller: Caller<'_, HostState>,
         kind: u32,
         start: u32,
         max: u32,
         ptr_out: u32,
         size_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_get_buffer_bytes");
            let Some(kind) = BufferType::from_raw(kind) else {
                return status(Status::BadArgument);
            };
            let slice = with_buffer(caller.data(), kind, |b| {
                let start = (start as usize).min(b.len());
                let end = start.saturating_add(max as usize).min(b.len());
                b[start..end].to_vec()
            });
            match slice {
                Some(bytes) => {
                    copy_out(&mut caller, &bytes, ptr_out, size_out)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_set_buffer_bytes",
        |caller: Caller<'_, HostState>,
         kind: u32,
         start: u32,
         size: u32,
         ptr: u32,
         len: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_set_buffer_bytes");
            let Some(kind) = BufferType::from_raw(kind) else {
                return status(Status::BadArgument);
            };
            let bytes = read(&caller, ptr, len)?;
            let writable = matches!(
                kind,
                BufferType::RequestBody
                    | BufferType::ResponseBody
                    | BufferType::DownstreamData
                    | BufferType::UpstreamData
            );
            if !writable {
                return status(Status::BadArgument);
            }
            let result = with_buffer(caller.data(), kind, |b| {
                splice(b, start as usize, size as usize, &bytes)
            });
            status(result.unwrap_or(Status::NotFound))
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_header_map_pairs",
        |mut caller: Caller<'_, HostState>, map: u32, ptr_out: u32, size_out: u32| -> Result<i32> {
            count_call(&caller, "proxy_get_header_map_pairs");
            let Some(map) = MapType::from_raw(map) else {
                return status(Status::BadArgument);
            };
            // Envoy answers an unavailable map with an empty one.
            let pairs = with_map(caller.data(), map, |m| m.clone()).unwrap_or_default();
            copy_out(&mut caller, &serialize_pairs(&pairs), ptr_out, size_out)?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_set_header_map_pairs",
        |caller: Caller<'_, HostState>, map: u32, ptr: u32, len: u32| -> Result<i32> {
            count_call(&caller, "proxy_set_header_map_pairs");
            let Some(map) = MapType::from_raw(map).filter(|m| is_writable(*m)) else {
                return status(Status::BadArgument);
            };
            let Ok(pairs) = deserialize_pairs(&read(&caller, ptr, len)?) else {
                return status(Status::ParseFailure);
            };
            let pairs: Pairs = pairs.into_iter().map(|(k, v)| (lower(&k), v)).collect();
            let done = with_map(caller.data(), map, |m| *m = pairs);
            status(if done.is_some() {
                Status::Ok
            } else {
                Status::BadArgument
            })
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_header_map_value",
        |mut caller: Caller<'_, HostState>,
         map: u32,
         key_ptr: u32,
         key_len: u32,
         ptr_out: u32,
         size_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_get_header_map_value");
            let Some(map) = MapType::from_raw(map) else {
                return status(Status::BadArgument);
            };
            let key = lower(&read_string(&caller, key_ptr, key_len)?);
            // Envoy returns the first value of a repeated header.
            let found = with_map(caller.data(), map, |m| {
                m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
            });
            match found {
                None => status(Status::BadArgument),
                Some(None) => status(Status::NotFound),
                Some(Some(value)) => {
                    copy_out(&mut caller, &value, ptr_out, size_out)?;
                    status(Status::Ok)
                }
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_replace_header_map_value",
        |caller: Caller<'_, HostState>,
         map: u32,
         key_ptr: u32,
         key_len: u32,
         value_ptr: u32,
         value_len: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_replace_header_map_value");
            let Some(map) = MapType::from_raw(map).filter(|m| is_writable(*m)) else {
                return status(Status::BadArgument);
            };
            let key = lower(&read_string(&caller, key_ptr, key_len)?);
            let value = read(&caller, value_ptr, value_len)?;
            let done = with_map(caller.data(), map, |m| {
                // Envoy's setCopy: the first entry takes the value, later duplicates go.
                match m.iter().position(|(k, _)| *k == key) {
                    Some(first) => {
                        m[first].1 = value;
                        let mut i = 0;
                        m.retain(|(k, _)| {
                            i += 1;
                            i - 1 == first || *k != key
                        });
                    }
                    None => m.push((key, value)),
                }
            });
            status(done.map_or(Status::BadArgument, |_| Status::Ok))
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_remove_header_map_value",
        |caller: Caller<'_, HostState>, map: u32, key_ptr: u32, key_len: u32| -> Result<i32> {
            count_call(&caller, "proxy_remove_header_map_value");
            let Some(map) = MapType::from_raw(map).filter(|m| is_writable(*m)) else {
                return status(Status::BadArgument);
            };
            let key = lower(&read_string(&caller, key_ptr, key_len)?);
            let done = with_map(caller.data(), map, |m| m.retain(|(k, _)| *k != key));
            status(done.map_or(Status::BadArgument, |_| Status::Ok))
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_add_header_map_value",
        |caller: Caller<'_, HostState>,
         map: u32,
         key_ptr: u32,
         key_len: u32,
         value_ptr: u32,
         value_len: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_add_header_map_value");
            let Some(map) = MapType::from_raw(map).filter(|m| is_writable(*m)) else {
                return status(Status::BadArgument);
            };
            let key = lower(&read_string(&caller, key_ptr, key_len)?);
            let value = read(&caller, value_ptr, value_len)?;
            let done = with_map(caller.data(), map, |m| m.push((key, value)));
            status(done.map_or(Status::BadArgument, |_| Status::Ok))
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_property",
        |mut caller: Caller<'_, HostState>,
         path_ptr: u32,
         path_len: u32,
         ptr_out: u32,
         size_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_get_property");
            let path = read(&caller, path_ptr, path_len)?;
            match property(caller.data(), &path) {
                Some(value) => {
                    copy_out(&mut caller, &value, ptr_out, size_out)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_set_property",
        |caller: Caller<'_, HostState>,
         path_ptr: u32,
         path_len: u32,
         value_ptr: u32,
         value_len: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_set_property");
            let path = read_string(&caller, path_ptr, path_len)?;
            let value = read(&caller, value_ptr, value_len)?;
            let Some(ctx) = caller.data().stream() else {
                return status(Status::NotFound);
            };
            lock(&ctx.data)
                .filter_state
                .insert(path.trim_end_matches('\0').to_string(), value);
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_shared_data",
        |mut caller: Caller<'_, HostState>,
         key_ptr: u32,
         key_len: u32,
         ptr_out: u32,
         size_out: u32,
         cas_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_get_shared_data");
            let key = read_string(&caller, key_ptr, key_len)?;
            let state = caller.data();
            match state.shared.get_shared_data(&state.plugin.vm_id, &key) {
                Some((value, cas)) => {
                    copy_out(&mut caller, &value, ptr_out, size_out)?;
                    write_u32(&mut caller, cas_out, cas)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_set_shared_data",
        |caller: Caller<'_, HostState>,
         key_ptr: u32,
         key_len: u32,
         value_ptr: u32,
         value_len: u32,
         cas: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_set_shared_data");
            let key = read_string(&caller, key_ptr, key_len)?;
            let value = read(&caller, value_ptr, value_len)?;
            let state = caller.data();
            status(
                state
                    .shared
                    .set_shared_data(&state.plugin.vm_id, &key, value, cas),
            )
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_register_shared_queue",
        |mut caller: Caller<'_, HostState>,
         name_ptr: u32,
         name_len: u32,
         id_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_register_shared_queue");
            let name = read_string(&caller, name_ptr, name_len)?;
            let state = caller.data();
            let owner = (state.vm_index, state.root_context_id);
            let id = state
                .shared
                .register_queue(&state.plugin.vm_id, &name, owner);
            write_u32(&mut caller, id_out, id)?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_resolve_shared_queue",
        |mut caller: Caller<'_, HostState>,
         vm_ptr: u32,
         vm_len: u32,
         name_ptr: u32,
         name_len: u32,
         id_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_resolve_shared_queue");
            let vm_id = read_string(&caller, vm_ptr, vm_len)?;
            let name = read_string(&caller, name_ptr, name_len)?;
            match caller.data().shared.resolve_queue(&vm_id, &name) {
                Some(id) => {
                    write_u32(&mut caller, id_out, id)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_dequeue_shared_queue",
        |mut caller: Caller<'_, HostState>, id: u32, ptr_out: u32, size_out: u32| -> Result<i32> {
            count_call(&caller, "proxy_dequeue_shared_queue");
            match caller.data().shared.dequeue(id) {
                Ok(value) => {
                    copy_out(&mut caller, &value, ptr_out, size_out)?;
                    status(Status::Ok)
                }
                Err(s) => status(s),
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_enqueue_shared_queue",
        |caller: Caller<'_, HostState>, id: u32, ptr: u32, len: u32| -> Result<i32> {
            count_call(&caller, "proxy_enqueue_shared_queue");
            let value = read(&caller, ptr, len)?;
            status(caller.data().shared.enqueue(id, value))
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_continue_stream",
        |mut caller: Caller<'_, HostState>, stream: u32| -> Result<i32> {
            count_call(&caller, "proxy_continue_stream");
            defer_stream_action(&mut caller, stream, Deferred::Continue)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_close_stream",
        |mut caller: Caller<'_, HostState>, stream: u32| -> Result<i32> {
            count_call(&caller, "proxy_close_stream");
            defer_stream_action(&mut caller, stream, Deferred::Close)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_send_local_response",
        |mut caller: Caller<'_, HostState>,
         status_code: u32,
         details_ptr: u32,
         details_len: u32,
         body_ptr: u32,
         body_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         grpc_status: i32|
         -> Result<i32> {
            count_call(&caller, "proxy_send_local_response");
            let details = read_string(&caller, details_ptr, details_len)?;
            let body = read(&caller, body_ptr, body_len)?;
            let Ok(headers) = deserialize_pairs(&read(&caller, headers_ptr, headers_len)?) else {
                return status(Status::ParseFailure);
            };
            let state = caller.data_mut();
            let ctx = state.effective_context;
            if !state.streams.contains_key(&ctx) {
                return status(Status::NotFound);
            }
            let headers = headers.into_iter().map(|(k, v)| (lower(&k), v)).collect();
            state.deferred.push((
                ctx,
                Deferred::LocalResponse(LocalResponse {
                    status: status_code,
                    details,
                    body,
                    headers,
                    grpc_status,
                }),
            ));
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_http_call",
        |mut caller: Caller<'_, HostState>,
         cluster_ptr: u32,
         cluster_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         body_ptr: u32,
         body_len: u32,
         trailers_ptr: u32,
         trailers_len: u32,
         timeout_ms: u32,
         token_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_http_call");
            let cluster = read_string(&caller, cluster_ptr, cluster_len)?;
            let headers = deserialize_pairs(&read(&caller, headers_ptr, headers_len)?);
            let trailers = deserialize_pairs(&read(&caller, trailers_ptr, trailers_len)?);
            let body = read(&caller, body_ptr, body_len)?;
            let (Ok(headers), Ok(trailers)) = (headers, trailers) else {
                return status(Status::ParseFailure);
            };
            let headers: Pairs = headers.into_iter().map(|(k, v)| (lower(&k), v)).collect();
            let has = |name: &str| headers.iter().any(|(k, _)| k == name);
            // Envoy: unknown cluster, or a call without :path, :method or :authority.
            if !caller.data().clusters.contains(&cluster)
                || !has(":path")
                || !has(":method")
                || !has(":authority")
            {
                return status(Status::BadArgument);
            }
            let state = caller.data_mut();
            state.next_token += 1;
            let token = state.next_token;
            state.pending_calls.push(PendingCall {
                token,
                context_id: state.effective_context,
                cluster,
                headers,
                body,
                trailers,
                timeout_ms,
            });
            write_u32(&mut caller, token_out, token)?;
            status(Status::Ok)
        },
    )?;

    // gRPC: the harness has no gRPC clusters. The SDK maps these answers to errors cleanly
    // (it has no variant for Unimplemented).
    linker.func_wrap(
        env,
        "proxy_grpc_call",
        |_: Caller<'_, HostState>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> Result<i32> { status(Status::InternalFailure) },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_stream",
        |_: Caller<'_, HostState>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> Result<i32> { status(Status::InternalFailure) },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_send",
        |_: Caller<'_, HostState>, _: u32, _: u32, _: u32, _: u32| -> Result<i32> {
            status(Status::NotFound)
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_cancel",
        |_: Caller<'_, HostState>, _: u32| -> Result<i32> { status(Status::NotFound) },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_close",
        |_: Caller<'_, HostState>, _: u32| -> Result<i32> { status(Status::NotFound) },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_status",
        |mut caller: Caller<'_, HostState>,
         code_out: u32,
         ptr_out: u32,
         size_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_get_status");
            let (code, message) = caller.data().call_status.clone();
            write_u32(&mut caller, code_out, code)?;
            copy_out(&mut caller, message.as_bytes(), ptr_out, size_out)?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_set_effective_context",
        |mut caller: Caller<'_, HostState>, context_id: u32| -> Result<i32> {
            count_call(&caller, "proxy_set_effective_context");
            let state = caller.data_mut();
            if context_id == state.root_context_id || state.streams.contains_key(&context_id) {
                state.effective_context = context_id;
                status(Status::Ok)
            } else {
                status(Status::BadArgument)
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_call_foreign_function",
        |caller: Caller<'_, HostState>,
         name_ptr: u32,
         name_len: u32,
         _args_ptr: u32,
         _args_len: u32,
         _ptr_out: u32,
         _size_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_call_foreign_function");
            // Envoy registers a few foreign functions (e.g. compress); the harness none.
            let _name = read_string(&caller, name_ptr, name_len)?;
            status(Status::NotFound)
        },
    )?;

    // Envoy answers Ok only while it shuts a VM down and the root context's on_done said
    // false; the harness never shuts VMs down, so a filter calling it gets what Envoy gives.
    linker.func_wrap(
        env,
        "proxy_done",
        |_: Caller<'_, HostState>| -> Result<i32> { status(Status::NotFound) },
    )?;

    linker.func_wrap(
        env,
        "proxy_define_metric",
        |mut caller: Caller<'_, HostState>,
         kind: u32,
         name_ptr: u32,
         name_len: u32,
         id_out: u32|
         -> Result<i32> {
            count_call(&caller, "proxy_define_metric");
            let Some(kind) = MetricType::from_raw(kind) else {
                return status(Status::BadArgument);
            };
            let name = read_string(&caller, name_ptr, name_len)?;
            let state = caller.data_mut();
            state.shared.define_metric(kind, &name);
            let id = match state.metric_names.iter().position(|n| *n == name) {
                Some(i) => i as u32 + 1,
                None => {
                    state.metric_names.push(name);
                    state.metric_names.len() as u32
                }
            };
            write_u32(&mut caller, id_out, id)?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_get_metric",
        |mut caller: Caller<'_, HostState>, id: u32, out: u32| -> Result<i32> {
            count_call(&caller, "proxy_get_metric");
            let Some(name) = metric_name(caller.data(), id) else {
                return status(Status::NotFound);
            };
            let value = match caller.data().shared.metric(&name) {
                Some(crate::shared::MetricValue::Counter(v)) => v,
                Some(crate::shared::MetricValue::Gauge(v)) => v as u64,
                Some(crate::shared::MetricValue::Histogram(_)) => {
                    return status(Status::BadArgument)
                }
                None => return status(Status::NotFound),
            };
            write(&mut caller, out, &value.to_le_bytes())?;
            status(Status::Ok)
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_record_metric",
        |caller: Caller<'_, HostState>, id: u32, value: u64| -> Result<i32> {
            count_call(&caller, "proxy_record_metric");
            match metric_name(caller.data(), id) {
                Some(name) => status(caller.data().shared.record_metric(&name, value)),
                None => status(Status::NotFound),
            }
        },
    )?;

    linker.func_wrap(
        env,
        "proxy_increment_metric",
        |caller: Caller<'_, HostState>, id: u32, offset: i64| -> Result<i32> {
            count_call(&caller, "proxy_increment_metric");
            match metric_name(caller.data(), id) {
                Some(name) => status(caller.data().shared.increment_metric(&name, offset)),
                None => status(Status::NotFound),
            }
        },
    )?;

    Ok(())
}

fn metric_name(state: &HostState, id: u32) -> Option<String> {
    (id as usize)
        .checked_sub(1)
        .and_then(|i| state.metric_names.get(i))
        .cloned()
}

fn defer_stream_action(
    caller: &mut Caller<'_, HostState>,
    stream: u32,
    action: fn(StreamType) -> Deferred,
) -> Result<i32> {
    let Some(stream) = StreamType::from_raw(stream) else {
        return status(Status::BadArgument);
    };
    let state = caller.data_mut();
    let ctx = state.effective_context;
    let Some(stream_ctx) = state.streams.get_mut(&ctx) else {
        return status(Status::NotFound);
    };
    let action = action(stream);
    if let Deferred::Continue(kind) = action {
        match kind {
            // Envoy: continuing an upstream TCP stream is not implemented (12, a value the
            // Rust SDK has no Status for).
            StreamType::Upstream => return Ok(UNIMPLEMENTED),
            // Envoy drops its request maps as soon as a filter continues the request or the
            // response: the same callback can no longer read or change them.
            StreamType::Request | StreamType::Response => {
                stream_ctx.open.request_headers = false;
                stream_ctx.open.request_body = false;
                stream_ctx.open.request_trailers = false;
            }
            StreamType::Downstream => {}
        }
    }
    state.deferred.push((ctx, action));
    status(Status::Ok)
}

/// Envoy's WasmResult::Unimplemented.
const UNIMPLEMENTED: i32 = 12;

#[cfg(test)]
mod tests {
    use super::splice;
    use crate::abi::Status;

    #[test]
    fn splice_follows_envoy() {
        let mut b = b"body".to_vec();
        assert_eq!(splice(&mut b, 0, 0, b">"), Status::Ok);
        assert_eq!(b, b">body");
        assert_eq!(splice(&mut b, 5, 0, b"<"), Status::Ok);
        assert_eq!(b, b">body<");
        assert_eq!(splice(&mut b, 0, usize::MAX, b"new"), Status::Ok);
        assert_eq!(b, b"new");
        assert_eq!(splice(&mut b, 1, 1, b"x"), Status::BadArgument);
        assert_eq!(splice(&mut b, 0, 1, b"x"), Status::BadArgument);
    }
}
