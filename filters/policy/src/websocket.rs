//! RFC 6455 (WebSocket) codec for MQTT over WebSockets, sans-IO and incremental: what mqtt-acl
//! needs to read the MQTT byte stream inside a WebSocket connection and to write it back.
//!
//! # Opening handshake (section 4)
//! - [`HeadReader`] collects an HTTP/1.1 head (request or response) up to its blank line, at
//!   most [`MAX_HEAD_BYTES`]; bytes after it are returned, not read.
//! - [`UpgradeRequest::parse`] accepts only `GET <origin-form path> HTTP/1.1` with one `Host`,
//!   `Upgrade: websocket`, `Connection: upgrade`, one `Sec-WebSocket-Key` (base64 of 16 bytes),
//!   `Sec-WebSocket-Version: 13`, the required sub-protocol among those offered (`mqtt`), and no
//!   body. [`UpgradeRequest::to_bytes`] writes the request that goes on: only those fields (no
//!   cookies, no `Authorization`, no extension offers: the server cannot negotiate
//!   `permessage-deflate`, which this codec does not read).
//! - [`check_upgrade_response`] accepts only `HTTP/1.1 101` with `Upgrade: websocket`,
//!   `Connection: upgrade`, the `Sec-WebSocket-Accept` of the key sent, exactly the offered
//!   sub-protocol, and no extension.
//! - [`http_error_response`]: the answer to a refused request.
//!
//! # Frames (section 5)
//! [`FrameDecoder`] reads one direction's frames from bytes split at any point, keeping at most
//! one frame header (14 bytes) and one control frame (125 bytes): the payload of binary data
//! frames is handed on as it arrives ([`Piece::Data`], unmasked), so a message of any size costs
//! no memory. Control frames (close, ping, pong) come whole ([`Piece::Control`], with their bytes
//! as received, to be passed on unchanged). Refused, each with its close code
//! ([`WsError::close_code`]): a client frame without mask or a server frame with one (5.1),
//! RSV bits (no extension is negotiated), reserved opcodes, text frames (MQTT goes in binary
//! frames; MQTT 3.1.1 section 6), a continuation without a message or a new message inside one,
//! fragmented or longer-than-125-byte control frames, non-minimal lengths (5.2), a 1-byte close
//! payload, invalid close codes or a reason that is not UTF-8 (5.5.1, 7.4), frames after a close,
//! and messages over [`FrameDecoder::new`]'s `max_message_bytes`. After an error the decoder
//! stays failed.
//!
//! [`encode_frame`] writes frames (masked with the key given, for the client's direction).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

#[cfg(test)]
mod tests;

/// The largest HTTP head (request or response, with its blank line) read.
pub const MAX_HEAD_BYTES: usize = 8192;
/// The most header fields an HTTP head may have.
pub const MAX_HEADERS: usize = 48;
/// The GUID of RFC 6455 section 1.3.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

// ------------------------------------------------------------------------------------------
// Opening handshake
// ------------------------------------------------------------------------------------------

/// Why a handshake is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandshakeError(pub String);

fn refuse<T>(why: impl Into<String>) -> Result<T, HandshakeError> {
    Err(HandshakeError(why.into()))
}

/// An HTTP head (with its blank line) and the bytes that came after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub head: Vec<u8>,
    pub rest: Vec<u8>,
}

/// Collects one HTTP head, bytes split at any point.
#[derive(Debug, Default)]
pub struct HeadReader {
    buffer: Vec<u8>,
}

impl HeadReader {
    /// Reads `bytes`: Ok(None) while the head is incomplete, the [`Head`] once its blank line
    /// arrived. More than [`MAX_HEAD_BYTES`] without a
    /// blank line is refused.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Head>, HandshakeError> {
        let searched_from = self.buffer.len().saturating_sub(3);
        self.buffer.extend_from_slice(bytes);
        let end = self
            .buffer
            .get(searched_from..)
            .unwrap_or_default()
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| searched_from + at + 4);
        match end {
            Some(end) if end <= MAX_HEAD_BYTES => {
                let head: Vec<u8> = self.buffer.drain(..end).collect();
                let rest = std::mem::take(&mut self.buffer);
                Ok(Some(Head { head, rest }))
            }
            _ if self.buffer.len() > MAX_HEAD_BYTES => {
                self.buffer = Vec::new();
                refuse(format!(
                    "no end of the HTTP head within {MAX_HEAD_BYTES} bytes"
                ))
            }
            _ => Ok(None),
        }
    }

    pub fn buffered_len(&self) -> usize {
        self.buffer.len()
    }
}

/// Header values as text: visible ASCII and spaces only (no obs-text: a value we compare or
/// write on must mean the same to every reader).
fn header_text<'a>(name: &str, value: &'a [u8]) -> Result<&'a str, HandshakeError> {
    if !value
        .iter()
        .all(|b| *b == b' ' || *b == b'\t' || b.is_ascii_graphic())
    {
        return refuse(format!("header {name} is not visible ASCII"));
    }
    std::str::from_utf8(value)
        .map(str::trim)
        .map_err(|_| HandshakeError(format!("header {name} is not visible ASCII")))
}

/// The comma-separated tokens of a header value (`Connection: keep-alive, Upgrade`).
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

fn has_token(values: &[&str], token: &str) -> bool {
    values
        .iter()
        .flat_map(|v| tokens(v))
        .any(|t| t.eq_ignore_ascii_case(token))
}

/// The header fields of a parsed head, by lower-case name.
struct Fields<'a> {
    fields: Vec<(String, &'a str)>,
}

impl<'a> Fields<'a> {
    fn new(headers: &[httparse::Header<'a>]) -> Result<Fields<'a>, HandshakeError> {
        let fields = headers
            .iter()
            .map(|h| Ok((h.name.to_ascii_lowercase(), header_text(h.name, h.value)?)))
            .collect::<Result<Vec<_>, HandshakeError>>()?;
        Ok(Fields { fields })
    }

    fn all(&self, name: &str) -> Vec<&'a str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .collect()
    }

    /// Exactly one field `name` (a second one could be read differently by the next hop).
    fn one(&self, name: &str) -> Result<&'a str, HandshakeError> {
        match self.all(name).as_slice() {
            [value] => Ok(value),
            [] => refuse(format!("no {name} header")),
            _ => refuse(format!("more than one {name} header")),
        }
    }

    fn requires_token(&self, name: &str, token: &str) -> Result<(), HandshakeError> {
        if has_token(&self.all(name), token) {
            Ok(())
        } else {
            refuse(format!("{name} does not name {token:?}"))
        }
    }
}

/// The Sec-WebSocket-Accept value for `key` (RFC 6455 section 4.2.2, step 5.4).
pub fn accept_value(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// A client's opening handshake, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub path: String,
    pub host: String,
    pub key: String,
    /// The sub-protocol the request goes on with (the one required).
    pub protocol: String,
    pub origin: Option<String>,
}

impl UpgradeRequest {
    /// Parses the head of the client's request (as [`HeadReader`] returns it) and checks it is
    /// a WebSocket upgrade offering `protocol`.
    pub fn parse(head: &[u8], protocol: &str) -> Result<UpgradeRequest, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(head) {
            Ok(httparse::Status::Complete(len)) if len == head.len() => {}
            Ok(_) => return refuse("an incomplete HTTP request head"),
            Err(httparse::Error::TooManyHeaders) => {
                return refuse(format!("more than {MAX_HEADERS} header fields"))
            }
            Err(e) => return refuse(format!("not an HTTP/1.1 request ({e})")),
        }
        if request.method != Some("GET") {
            return refuse("the method is not GET");
        }
        if request.version != Some(1) {
            return refuse("the version is not HTTP/1.1");
        }
        let path = request.path.unwrap_or_default();
        if !path.starts_with('/') {
            return refuse("the request target is not a path");
        }
        let fields = Fields::new(request.headers)?;
        let host = fields.one("host")?;
        if host.is_empty() || host.contains([' ', '\t']) {
            return refuse("an invalid Host header");
        }
        fields.requires_token("upgrade", "websocket")?;
        fields.requires_token("connection", "upgrade")?;
        if !fields.all("transfer-encoding").is_empty()
            || fields.all("content-length").iter().any(|v| *v != "0")
        {
            return refuse("an upgrade request with a body");
        }
        let key = fields.one("sec-websocket-key")?;
        if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
            return refuse("Sec-WebSocket-Key is not the base64 of 16 bytes");
        }
        if fields.one("sec-websocket-version")? != "13" {
            return refuse("Sec-WebSocket-Version is not 13");
        }
        if !fields
            .all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| tokens(v))
            .any(|t| t == protocol)
        {
            return refuse(format!(
                "the sub-protocol {protocol:?} is not offered (Sec-WebSocket-Protocol)"
            ));
        }
        let origin = match fields.all("origin").as_slice() {
            [] => None,
            [origin] if !origin.contains([' ', '\t']) => Some(origin.to_string()),
            _ => return refuse("an invalid Origin header"),
        };
        Ok(UpgradeRequest {
            path: path.to_string(),
            host: host.to_string(),
            key: key.to_string(),
            protocol: protocol.to_string(),
            origin,
        })
    }

    /// The request that goes on to the server: the checked fields only.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n",
            self.path, self.host, self.key, self.protocol
        );
        if let Some(origin) = &self.origin {
            text.push_str(&format!("Origin: {origin}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    }

    /// The Sec-WebSocket-Accept the server must answer.
    pub fn expected_accept(&self) -> String {
        accept_value(&self.key)
    }
}

/// Checks the server's answer (as [`HeadReader`] returns it) to `request`: a 101 switching to
/// WebSocket with `request`'s sub-protocol and no extension.
pub fn check_upgrade_response(head: &[u8], request: &UpgradeRequest) -> Result<(), HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        Ok(_) => return refuse("an incomplete HTTP response head"),
        Err(e) => return refuse(format!("not an HTTP/1.1 response ({e})")),
    }
    if response.version != Some(1) {
        return refuse("the server's answer is not HTTP/1.1");
    }
    if response.code != Some(101) {
        return refuse(format!(
            "the server answered {} instead of 101 Switching Protocols",
            response.code.unwrap_or_default()
        ));
    }
    let fields = Fields::new(response.headers)?;
    fields.requires_token("upgrade", "websocket")?;
    fields.requires_token("connection", "upgrade")?;
    if fields.one("sec-websocket-accept")? != request.expected_accept() {
        return refuse("Sec-WebSocket-Accept does not match the key");
    }
    if fields.one("sec-websocket-protocol")? != request.protocol {
        return refuse(format!(
            "the server did not choose the sub-protocol {:?}",
            request.protocol
        ));
    }
    if !fields.all("sec-websocket-extensions").is_empty() {
        return refuse("the server chose an extension none was offered");
    }
    Ok(())
}

/// A complete HTTP error answer (`Connection: close`) with a short text body.
pub fn http_error_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Sec-WebSocket-Version: 13\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ------------------------------------------------------------------------------------------
// Frames
// ------------------------------------------------------------------------------------------

/// Frame opcodes (section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Close status codes (section 7.4.1) this codec writes.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Codes a close frame may carry (section 7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Which side's frames a decoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Every frame masked (section 5.1).
    Client,
    /// No frame masked.
    Server,
}

/// Why a frame stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WsError {
    /// The close code that fits (section 7.4.1).
    pub close_code: u16,
    pub message: String,
}

fn ws_error<T>(close_code: u16, message: impl Into<String>) -> Result<T, WsError> {
    Err(WsError {
        close_code,
        message: message.into(),
    })
}

impl WsError {
    pub fn close_code(&self) -> u16 {
        self.close_code
    }
}

/// A control frame, whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlFrame {
    pub opcode: Opcode,
    /// Unmasked.
    pub payload: Vec<u8>,
    /// The frame as it arrived (masked if it was), to be passed on unchanged.
    pub raw: Vec<u8>,
}

impl ControlFrame {
    /// A close frame's status code, if it has one.
    pub fn close_code(&self) -> Option<u16> {
        match (self.opcode, self.payload.as_slice()) {
            (Opcode::Close, [hi, lo, ..]) => Some(u16::from_be_bytes([*hi, *lo])),
            _ => None,
        }
    }
}

/// What a decoder read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Payload bytes of a binary message, unmasked, in order (a frame's payload may come in
    /// several pieces; messages are not delimited: MQTT over WebSockets is a byte stream).
    Data(Vec<u8>),
    Control(ControlFrame),
}

/// The frame being read.
#[derive(Debug)]
struct InFrame {
    opcode: Opcode,
    fin: bool,
    remaining: u64,
    mask: Option<[u8; 4]>,
    /// Payload bytes read so far (for the mask's phase).
    offset: u64,
    /// A control frame: header and payload as received.
    control_raw: Vec<u8>,
}

/// Reads one direction's frames ([module docs](self)).
#[derive(Debug)]
pub struct FrameDecoder {
    sender: Sender,
    max_message_bytes: u64,
    header: Vec<u8>,
    frame: Option<InFrame>,
    /// A binary message whose final frame has not arrived.
    in_message: bool,
    message_bytes: u64,
    /// A close frame was read: nothing may follow.
    closed: bool,
    failed: bool,
    last_mask: Option<[u8; 4]>,
}

/// How many header bytes a frame has, once its first two are known.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

impl FrameDecoder {
    pub fn new(sender: Sender, max_message_bytes: u64) -> FrameDecoder {
        FrameDecoder {
            sender,
            max_message_bytes,
            header: Vec::with_capacity(14),
            frame: None,
            in_message: false,
            message_bytes: 0,
            closed: false,
            failed: false,
            last_mask: None,
        }
    }

    /// The masking key of the last client frame read.
    pub fn last_mask(&self) -> Option<[u8; 4]> {
        self.last_mask
    }

    /// A close frame was read.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads from `input` (consuming what it reads) until one piece is complete: Ok(None) when
    /// `input` is used up first.
    pub fn next_piece(&mut self, input: &mut &[u8]) -> Result<Option<Piece>, WsError> {
        if self.failed {
            return ws_error(close_code::PROTOCOL_ERROR, "the frame stream failed before");
        }
        let result = self.read(input);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Reads everything in `input`: the pieces, or the first error (whatever came before it is
    /// lost with it).
    pub fn decode_all(&mut self, mut input: &[u8]) -> Result<Vec<Piece>, WsError> {
        let mut pieces = Vec::new();
        while let Some(piece) = self.next_piece(&mut input)? {
            pieces.push(piece);
        }
        Ok(pieces)
    }

    fn read(&mut self, input: &mut &[u8]) -> Result<Option<Piece>, WsError> {
        loop {
            // (A zero-length frame is complete with its header.)
            if self.frame.is_none() && !self.read_header(input)? {
                return Ok(None);
            }
            let Some(frame) = self.frame.as_mut() else {
                continue;
            };
            let take = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(input.len());
            let (chunk, rest) = input.split_at(take);
            *input = rest;
            frame.remaining -= take as u64;
            if frame.opcode.is_control() {
                frame.control_raw.extend_from_slice(chunk);
                if frame.remaining > 0 {
                    return Ok(None);
                }
                let Some(frame) = self.frame.take() else {
                    continue;
                };
                return self.control(frame).map(Some);
            }
            let mut data = chunk.to_vec();
            if let Some(mask) = frame.mask {
                for (i, byte) in data.iter_mut().enumerate() {
                    let phase = (frame.offset + i as u64) % 4;
                    *byte ^= mask[phase as usize];
                }
            }
            frame.offset += take as u64;
            if frame.remaining == 0 {
                if frame.fin {
                    self.in_message = false;
                    self.message_bytes = 0;
                }
                self.frame = None;
            }
            if !data.is_empty() {
                return Ok(Some(Piece::Data(data)));
            }
            if input.is_empty() && self.frame.is_some() {
                return Ok(None);
            }
        }
    }

    /// Reads header bytes; true once a frame's header is complete and checked.
    fn read_header(&mut self, input: &mut &[u8]) -> Result<bool, WsError> {
        loop {
            let needed = match self.header.as_slice() {
                [_, second, ..] => header_len(*second),
                _ => 2,
            };
            if self.header.len() == needed {
                break;
            }
            let Some((byte, rest)) = input.split_first() else {
                return Ok(false);
            };
            self.header.push(*byte);
            *input = rest;
        }
        let header = std::mem::take(&mut self.header);
        self.header = Vec::with_capacity(14);
        self.start_frame(header).map(|()| true)
    }

    fn start_frame(&mut self, header: Vec<u8>) -> Result<(), WsError> {
        let (first, second) = match header.as_slice() {
            [first, second, ..] => (*first, *second),
            _ => return ws_error(close_code::PROTOCOL_ERROR, "a frame header cut short"),
        };
        if self.closed {
            return ws_error(close_code::PROTOCOL_ERROR, "a frame after the close frame");
        }
        let fin = first & 0x80 != 0;
        if first & 0x70 != 0 {
            return ws_error(
                close_code::PROTOCOL_ERROR,
                "RSV bits set (no extension was negotiated)",
            );
        }
        let Some(opcode) = Opcode::from_bits(first & 0x0F) else {
            return ws_error(
                close_code::PROTOCOL_ERROR,
                format!("reserved opcode {:#x}", first & 0x0F),
            );
        };
        let masked = second & 0x80 != 0;
        match (self.sender, masked) {
            (Sender::Client, false) => {
                return ws_error(close_code::PROTOCOL_ERROR, "an unmasked client frame")
            }
            (Sender::Server, true) => {
                return ws_error(close_code::PROTOCOL_ERROR, "a masked server frame")
            }
            _ => {}
        }
        let (length, mask_at) = match second & 0x7F {
            126 => {
                let bytes = header.get(2..4).unwrap_or_default();
                let length = u64::from(u16::from_be_bytes([
                    bytes.first().copied().unwrap_or(0),
                    bytes.get(1).copied().unwrap_or(0),
                ]));
                if length < 126 {
                    return ws_error(close_code::PROTOCOL_ERROR, "a non-minimal 16-bit length");
                }
                (length, 4)
            }
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(header.get(2..10).unwrap_or(&[0; 8]));
                let length = u64::from_be_bytes(be);
                if length >> 63 != 0 {
                    return ws_error(
                        close_code::PROTOCOL_ERROR,
                        "a 64-bit length with its top bit set",
                    );
                }
                if length <= 0xFFFF {
                    return ws_error(close_code::PROTOCOL_ERROR, "a non-minimal 64-bit length");
                }
                (length, 10)
            }
            short => (u64::from(short), 2),
        };
        let mask = if masked {
            let mut key = [0u8; 4];
            key.copy_from_slice(header.get(mask_at..mask_at + 4).unwrap_or(&[0; 4]));
            Some(key)
        } else {
            None
        };
        if opcode.is_control() {
            if !fin {
                return ws_error(close_code::PROTOCOL_ERROR, "a fragmented control frame");
            }
            if length > 125 {
                return ws_error(
                    close_code::PROTOCOL_ERROR,
                    "a control frame longer than 125 bytes",
                );
            }
        } else {
            match opcode {
                Opcode::Text => {
                    return ws_error(
                        close_code::UNSUPPORTED_DATA,
                        "a text frame (MQTT goes in binary frames)",
                    )
                }
                Opcode::Continuation if !self.in_message => {
                    return ws_error(
                        close_code::PROTOCOL_ERROR,
                        "a continuation frame without a message",
                    )
                }
                Opcode::Binary if self.in_message => {
                    return ws_error(
                        close_code::PROTOCOL_ERROR,
                        "a new message before the last one's final frame",
                    )
                }
                _ => {}
            }
            let total = self.message_bytes.saturating_add(length);
            if total > self.max_message_bytes {
                return ws_error(
                    close_code::MESSAGE_TOO_BIG,
                    format!("a message of more than {} bytes", self.max_message_bytes),
                );
            }
            self.message_bytes = total;
            self.in_message = !fin;
        }
        if mask.is_some() {
            self.last_mask = mask;
        }
        self.frame = Some(InFrame {
            opcode,
            fin,
            remaining: length,
            mask,
            offset: 0,
            control_raw: if opcode.is_control() {
                header
            } else {
                Vec::new()
            },
        });
        Ok(())
    }

    fn control(&mut self, frame: InFrame) -> Result<Piece, WsError> {
        let header = header_len(frame.control_raw.get(1).copied().unwrap_or(0));
        let mut payload = frame.control_raw.get(header..).unwrap_or_default().to_vec();
        if let Some(mask) = frame.mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        if frame.opcode == Opcode::Close {
            match payload.as_slice() {
                [] => {}
                [_] => return ws_error(close_code::PROTOCOL_ERROR, "a 1-byte close payload"),
                [hi, lo, reason @ ..] => {
                    let code = u16::from_be_bytes([*hi, *lo]);
                    if !valid_close_code(code) {
                        return ws_error(
                            close_code::PROTOCOL_ERROR,
                            format!("invalid close code {code}"),
                        );
                    }
                    if std::str::from_utf8(reason).is_err() {
                        return ws_error(
                            close_code::INVALID_PAYLOAD,
                            "a close reason that is not UTF-8",
                        );
                    }
                }
            }
            self.closed = true;
        }
        Ok(Piece::Control(ControlFrame {
            opcode: frame.opcode,
            payload,
            raw: frame.control_raw,
        }))
    }
}

/// One frame: FIN set, `opcode`, `payload`, masked with `mask` (the client's direction) or not.
pub fn encode_frame(opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode.bits());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let length = payload.len();
    if length < 126 {
        frame.push(mask_bit | length as u8);
    } else if let Ok(short) = u16::try_from(length) {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&short.to_be_bytes());
    } else {
        frame.push(mask_bit | 127);
        frame.extend_from_slice(&(length as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// A close frame with `code` and `reason` (cut to fit 125 bytes at a character boundary).
pub fn encode_close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.get(..end).unwrap_or_default().as_bytes());
    encode_frame(Opcode::Close, &payload, mask)
}
