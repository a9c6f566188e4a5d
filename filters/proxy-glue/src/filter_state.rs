//! Envoy filter state from a Wasm filter, through Envoy's `set_envoy_filter_state` foreign
//! function. A network filter uses it to pick tcp_proxy's cluster per connection
//! (`envoy.tcp_proxy.cluster`) before tcp_proxy connects.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// tcp_proxy's per-connection cluster (a string object).
pub const TCP_PROXY_CLUSTER: &str = "envoy.tcp_proxy.cluster";

/// Sets the filter state object `key` (one Envoy knows how to build from bytes) to `value` on
/// the current connection or request. Fails when the host has no such foreign function (other
/// Proxy-Wasm hosts, the harness) or Envoy refuses the key or value.
pub fn set(key: &str, value: &str) -> Result<(), Status> {
    hostcalls::call_foreign_function("set_envoy_filter_state", Some(&arguments(key, value)))
        .map(|_| ())
}

/// `envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments` in protobuf wire format:
/// `path` (field 1) and `value` (field 2) as length-delimited strings; `span` (field 3) left at
/// its default, `FilterChain`. Three fields do not justify a protobuf crate in every filter.
fn arguments(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 12);
    for (tag, field) in [(0x0A, key), (0x12, value)] {
        out.push(tag);
        let mut len = field.len();
        loop {
            let byte = (len & 0x7F) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(field.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_protobuf_golden_bytes() {
        let bytes = arguments("envoy.tcp_proxy.cluster", "refusal");
        let mut expected = vec![0x0A, 23];
        expected.extend_from_slice(b"envoy.tcp_proxy.cluster");
        expected.extend_from_slice(&[0x12, 7]);
        expected.extend_from_slice(b"refusal");
        assert_eq!(bytes, expected);
        // Lengths of 128 and more take a second varint byte.
        let long = "c".repeat(300);
        let bytes = arguments("k", &long);
        assert_eq!(&bytes[..6], &[0x0A, 1, b'k', 0x12, 0xAC, 0x02]);
        assert_eq!(bytes.len(), 6 + 300);
    }
}
