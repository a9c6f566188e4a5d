//! Host calls on the request and callout paths, made through the raw ABI imports.
//!
//! The SDK's wrappers (proxy-wasm 0.2.5 `hostcalls`) trap the VM on input Envoy really sends:
//! `get_map` does `String::from_utf8(..).unwrap()` on every header name and value (one `caf\xE9`
//! from a client kills the worker's VM), and most wrappers `panic!("unexpected status")` on a
//! status they do not expect (e.g. BadArgument once headers are no longer readable). These
//! wrappers read bytes, decode header maps with `policy::header_pairs`, and turn every status
//! into a `Result`. `tests/banned_sdk_calls.rs` keeps the SDK's versions out of filter code.

use policy::header_pairs::{self, HeaderPairs};
use proxy_wasm::types::{BufferType, MapType, StreamType};

/// A status the host answered instead of Ok (the raw ABI value, so an unexpected one is
/// reported, never undefined behaviour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u32);

impl HostStatus {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
}

impl std::fmt::Display for HostStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            7 => "Empty",
            8 => "CasMismatch",
            10 => "InternalFailure",
            _ => "unknown status",
        };
        write!(f, "{name} ({})", self.0)
    }
}

// The same imports the SDK declares, with the status read as a plain u32: a value outside the
// SDK's `Status` enum would be undefined behaviour there.
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_continue_stream(stream_type: StreamType) -> u32;
    fn proxy_close_stream(stream_type: StreamType) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

fn check(status: u32) -> Result<(), HostStatus> {
    if status == HostStatus::OK {
        Ok(())
    } else {
        Err(HostStatus(status))
    }
}

/// Takes ownership of memory the host filled through the guest's `proxy_on_memory_allocate`
/// (the SDK's allocator: a boxed slice of exactly `size` bytes). Null means "no data".
///
/// # Safety
/// `data` must be null or a pointer the host returned with `size` for one call, not yet freed.
unsafe fn take_host_bytes(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: per the contract above, `data` is a `Box<[u8]>` of length `size` leaked by
    // `proxy_on_memory_allocate`; rebuilding it frees it exactly once when dropped.
    let boxed: Box<[u8]> = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, size)) };
    Some(boxed.into_vec())
}

/// Why a header map could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapError {
    Host(HostStatus),
    Malformed(header_pairs::PairsError),
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapError::Host(status) => write!(f, "the host answered {status}"),
            MapError::Malformed(e) => write!(f, "{e}"),
        }
    }
}

/// One whole header map (request/response headers or trailers, a callout's answer) as bytes.
pub fn header_map(map: MapType) -> Result<HeaderPairs, MapError> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and size it allocated through the guest allocator.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    // SAFETY: on any status, what the host returned (if anything) is ours to free.
    let bytes = unsafe { take_host_bytes(data, size) };
    check(status).map_err(MapError::Host)?;
    HeaderPairs::decode(&bytes.unwrap_or_default()).map_err(MapError::Malformed)
}

/// Sets `name` to `value` in a header map (replacing every value), or removes it (None).
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> Result<(), HostStatus> {
    // SAFETY: the pointers and lengths describe live slices for the duration of the call.
    let status = unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    };
    check(status)
}

/// Up to `max` bytes of a buffer from `start` (None: the host has no such buffer).
pub fn read_buffer(
    buffer: BufferType,
    start: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header_map`.
    let status = unsafe { proxy_get_buffer_bytes(buffer, start, max, &mut data, &mut size) };
    // SAFETY: as in `header_map`.
    let bytes = unsafe { take_host_bytes(data, size) };
    match status {
        HostStatus::OK => Ok(Some(bytes.unwrap_or_default())),
        HostStatus::NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// Replaces `size` bytes of a buffer from `start` with `data`.
pub fn write_buffer(
    buffer: BufferType,
    start: usize,
    size: usize,
    data: &[u8],
) -> Result<(), HostStatus> {
    // SAFETY: `data` is a live slice for the duration of the call.
    check(unsafe { proxy_set_buffer_bytes(buffer, start, size, data.as_ptr(), data.len()) })
}

/// A property's raw bytes (None: absent).
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostStatus> {
    let serialized = path.join("\0");
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header_map`.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    // SAFETY: as in `header_map`.
    let bytes = unsafe { take_host_bytes(data, size) };
    match status {
        HostStatus::OK => Ok(bytes),
        HostStatus::NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// Sets a property of the current stream. Envoy keeps it as filter state `wasm.<name>`, which
/// access logs read (`%FILTER_STATE(wasm.<name>:PLAIN)%`).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), HostStatus> {
    // SAFETY: both slices are live for the duration of the call.
    check(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Log levels as the ABI numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// Writes a log line at `level` (the SDK's logger panics on a refused line and drops debug lines
/// below its own fixed level; this asks the host only).
pub fn log(level: Level, message: &str) -> Result<(), HostStatus> {
    // SAFETY: `message` is a live slice for the duration of the call.
    check(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

/// Whether the host would print a line at `level` (so a line it would drop is never built).
pub fn logs_at(level: Level) -> bool {
    log_level().is_some_and(|host_level| host_level <= level as u32)
}

/// The host's log level as the ABI numbers it (None: the host did not say).
pub fn log_level() -> Option<u32> {
    let mut host_level: u32 = 0;
    // SAFETY: the host writes one u32 through the pointer.
    let status = unsafe { proxy_get_log_level(&mut host_level) };
    (status == HostStatus::OK).then_some(host_level)
}

/// Lets the paused request go on.
pub fn resume_request() -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(StreamType::HttpRequest) })
}

/// Lets the paused response go on.
pub fn resume_response() -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(StreamType::HttpResponse) })
}

/// Lets the paused client data of a network filter go on: Envoy continues reading with the
/// next filter (tcp_proxy), which forwards what the read buffer holds.
pub fn resume_downstream() -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(StreamType::Downstream) })
}

/// Closes the effective context's client connection (a network filter's); Envoy flushes what
/// was written to it first.
pub fn close_client() -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_close_stream(StreamType::Downstream) })
}

/// Makes context `id` the one later host calls act on (BadArgument: the host has no such
/// context, e.g. its connection is gone).
pub fn enter_context(id: u32) -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_effective_context(id) })
}

/// Sets the root context's tick period (from a stream's callback too: Envoy applies it to the
/// stream's root). Envoy restarts the root's timer on every call, even with the period it
/// already has: call it when the period changes, not on every request.
pub fn set_tick_period(millis: u32) -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

/// Answers the current stream locally.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), HostStatus> {
    let pairs: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect();
    let serialized = header_pairs::encode(&pairs);
    // SAFETY: every pointer/length pair describes a live slice for the duration of the call.
    check(unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            serialized.as_ptr(),
            serialized.len(),
            -1,
        )
    })
}
