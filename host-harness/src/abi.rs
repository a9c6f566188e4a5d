//! Proxy-Wasm ABI 0.2.1 constants and wire formats, as Envoy and the Rust SDK (proxy-wasm 0.2.5)
//! use them.

/// Status codes a host call returns (`WasmResult` in Envoy).
///
/// The Rust SDK's `Status` enum has no variant for 12 (Unimplemented): answering a Rust guest
/// with it would be undefined behaviour, so the harness never does.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl Status {
    pub fn code(self) -> i32 {
        self as u32 as i32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    CallResponseHeaders,
    CallResponseTrailers,
}

impl MapType {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            4 => Self::GrpcInitialMetadata,
            5 => Self::GrpcTrailingMetadata,
            6 => Self::CallResponseHeaders,
            7 => Self::CallResponseTrailers,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    CallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    CallData,
}

impl BufferType {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::RequestBody,
            1 => Self::ResponseBody,
            2 => Self::DownstreamData,
            3 => Self::UpstreamData,
            4 => Self::CallResponseBody,
            5 => Self::GrpcReceiveBuffer,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            8 => Self::CallData,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamType {
    Request,
    Response,
    Downstream,
    Upstream,
}

impl StreamType {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Request,
            1 => Self::Response,
            2 => Self::Downstream,
            3 => Self::Upstream,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }
}

/// What a stream callback answers: 0 = Continue, 1 = Pause (StopIteration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    pub fn from_raw(raw: i32) -> Self {
        // Envoy treats every value other than Continue as a stop.
        if raw == 0 {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}

/// Peer types for connection-close callbacks.
pub const PEER_REMOTE: i32 = 2;

/// A header map: ordered pairs, duplicate names allowed, as Envoy's HeaderMap.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// Serialises pairs as the ABI does: a u32 count, then (name length, value length) u32 pairs,
/// then each name and value followed by a NUL byte. All integers little-endian.
pub fn serialize_pairs(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let data_len: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data_len);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed header-pair map: {0}")]
pub struct PairsError(&'static str);

/// Parses the ABI's pair serialisation. Every length is checked against the input.
pub fn deserialize_pairs(bytes: &[u8]) -> Result<Pairs, PairsError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let read_u32 = |at: usize| -> Result<usize, PairsError> {
        let word = bytes
            .get(at..at + 4)
            .ok_or(PairsError("truncated length"))?;
        Ok(u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize)
    };
    let count = read_u32(0)?;
    let sizes_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .ok_or(PairsError("count overflows"))?;
    if sizes_end > bytes.len() {
        return Err(PairsError("count larger than the data"));
    }
    let mut pairs = Vec::with_capacity(count);
    let mut data_at = sizes_end;
    for i in 0..count {
        let key_len = read_u32(4 + i * 8)?;
        let value_len = read_u32(8 + i * 8)?;
        let key = take(bytes, &mut data_at, key_len)?;
        let value = take(bytes, &mut data_at, value_len)?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| PairsError("name is not UTF-8"))?;
        pairs.push((key, value.to_vec()));
    }
    Ok(pairs)
}

/// Takes `len` bytes and the NUL that must follow them.
fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], PairsError> {
    let end = at.checked_add(len).ok_or(PairsError("length overflows"))?;
    let slice = bytes
        .get(*at..end)
        .ok_or(PairsError("entry runs past the end"))?;
    if bytes.get(end) != Some(&0) {
        return Err(PairsError("entry not NUL-terminated"));
    }
    *at = end + 1;
    Ok(slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes Envoy and the SDK exchange for {":path": "/", "x-auth-token": "abc"}.
    const GOLDEN: &[u8] = &[
        2, 0, 0, 0, // two pairs
        5, 0, 0, 0, 1, 0, 0, 0, // ":path" (5), "/" (1)
        12, 0, 0, 0, 3, 0, 0, 0, // "x-auth-token" (12), "abc" (3)
        b':', b'p', b'a', b't', b'h', 0, b'/', 0, // names and values, NUL-terminated
        b'x', b'-', b'a', b'u', b't', b'h', b'-', b't', b'o', b'k', b'e', b'n', 0, b'a', b'b',
        b'c', 0,
    ];

    fn golden_pairs() -> Pairs {
        vec![
            (":path".to_string(), b"/".to_vec()),
            ("x-auth-token".to_string(), b"abc".to_vec()),
        ]
    }

    #[test]
    fn serializes_to_golden_bytes() {
        assert_eq!(serialize_pairs(&golden_pairs()), GOLDEN);
    }

    #[test]
    fn parses_golden_bytes() {
        assert_eq!(deserialize_pairs(GOLDEN).unwrap(), golden_pairs());
    }

    #[test]
    fn empty_map_is_a_zero_count() {
        assert_eq!(serialize_pairs(&[]), vec![0, 0, 0, 0]);
        assert_eq!(deserialize_pairs(&[0, 0, 0, 0]).unwrap(), vec![]);
        assert_eq!(deserialize_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn rejects_truncated_and_lying_input() {
        assert!(deserialize_pairs(&GOLDEN[..GOLDEN.len() - 1]).is_err());
        let mut huge_count = GOLDEN.to_vec();
        huge_count[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(deserialize_pairs(&huge_count).is_err());
        let mut no_nul = GOLDEN.to_vec();
        no_nul[25] = b'!';
        assert!(deserialize_pairs(&no_nul).is_err());
    }
}
