use super::*;
use proptest::prelude::*;

const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request_text(extra: &str) -> String {
    format!(
        "GET /mqtt HTTP/1.1\r\nHost: broker.example:9001\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {RFC_KEY}\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n{extra}\r\n"
    )
}

fn parse(text: &str) -> Result<UpgradeRequest, HandshakeError> {
    UpgradeRequest::parse(text.as_bytes(), "mqtt")
}

#[test]
fn accept_value_is_rfc_6455_section_1_3() {
    assert_eq!(accept_value(RFC_KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn a_browser_upgrade_is_rebuilt_without_cookies_or_extensions() {
    let request = parse(&request_text(
        "Origin: https://app.example\r\nCookie: session=secret\r\nAuthorization: Bearer x\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
         User-Agent: Mozilla/5.0\r\n",
    ))
    .unwrap();
    assert_eq!(request.path, "/mqtt");
    assert_eq!(request.host, "broker.example:9001");
    assert_eq!(request.origin.as_deref(), Some("https://app.example"));
    assert_eq!(
        String::from_utf8(request.to_bytes()).unwrap(),
        "GET /mqtt HTTP/1.1\r\nHost: broker.example:9001\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\
         Origin: https://app.example\r\n\r\n"
    );
}

#[test]
fn bad_upgrade_requests_are_refused() {
    let good = request_text("");
    let cases: Vec<(String, &str)> = vec![
        (good.replacen("GET", "POST", 1), "not GET"),
        (good.replacen("HTTP/1.1", "HTTP/1.0", 1), "HTTP/1.1"),
        (good.replacen("/mqtt", "http://x/mqtt", 1), "not a path"),
        (
            good.replacen("Upgrade: websocket", "Upgrade: h2c", 1),
            "websocket",
        ),
        (
            good.replacen("keep-alive, Upgrade", "keep-alive", 1),
            "upgrade",
        ),
        (
            good.replacen("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8", 1),
            "not 13",
        ),
        (good.replacen(RFC_KEY, "c2hvcnQ=", 1), "16 bytes"),
        (
            good.replacen("mqttv3.1, mqtt", "mqttv3.1", 1),
            "not offered",
        ),
        (
            good.replacen("Host: broker.example:9001\r\n", "", 1),
            "no host",
        ),
        (request_text("Host: other\r\n"), "more than one host"),
        (
            request_text(&format!("Sec-WebSocket-Key: {RFC_KEY}\r\n")),
            "more than one",
        ),
        (request_text("Content-Length: 5\r\n"), "body"),
        (request_text("Transfer-Encoding: chunked\r\n"), "body"),
        (
            request_text("X-Folded: a\r\n b\r\n"),
            "not an HTTP/1.1 request",
        ),
        (request_text("Origin: a b\r\n"), "Origin"),
        (
            "\u{16}\u{3}\u{1}\u{2}\u{0}\r\n\r\n".to_string(),
            "not an HTTP/1.1 request",
        ),
    ];
    for (text, why) in cases {
        let error = parse(&text).expect_err(&text);
        assert!(
            error.0.to_lowercase().contains(&why.to_lowercase()),
            "{text:?}: {error}"
        );
    }
    let mut many = String::new();
    for i in 0..MAX_HEADERS {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    assert!(parse(&request_text(&many))
        .unwrap_err()
        .0
        .contains("header fields"));
    let obs_text = request_text("X-Bin: \u{e9}\r\n");
    assert!(parse(&obs_text).is_err());
}

#[test]
fn head_reader_splits_head_and_rest_at_any_point_and_bounds_its_buffer() {
    let mut bytes = request_text("").into_bytes();
    bytes.extend_from_slice(&[0x82, 0x80]);
    for cut in 0..bytes.len() {
        let mut reader = HeadReader::default();
        let (head, rest) = match reader.feed(&bytes[..cut]).unwrap() {
            Some(Head { head, mut rest }) => {
                rest.extend_from_slice(&bytes[cut..]);
                (head, rest)
            }
            None => {
                let done = reader.feed(&bytes[cut..]).unwrap().unwrap();
                (done.head, done.rest)
            }
        };
        assert_eq!(head, request_text("").as_bytes(), "cut at {cut}");
        assert_eq!(rest, [0x82, 0x80]);
    }
    let mut reader = HeadReader::default();
    assert_eq!(reader.feed(&[b'a'; MAX_HEAD_BYTES]).unwrap(), None);
    assert!(reader.feed(b"\r\n\r\n").is_err());
    assert_eq!(reader.buffered_len(), 0);
}

fn response_text(extra: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\
         {extra}\r\n"
    )
}

#[test]
fn the_servers_101_is_checked() {
    let request = parse(&request_text("")).unwrap();
    let check = |text: &str| check_upgrade_response(text.as_bytes(), &request);
    assert_eq!(check(&response_text("Server: libwebsockets\r\n")), Ok(()));
    let good = response_text("");
    for (text, why) in [
        (
            good.replacen("101 Switching Protocols", "404 Not Found", 1),
            "404",
        ),
        (
            good.replacen("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAA", 1),
            "does not match",
        ),
        (
            good.replacen("Protocol: mqtt", "Protocol: mqttv3.1", 1),
            "sub-protocol",
        ),
        (
            good.replacen("Sec-WebSocket-Protocol: mqtt\r\n", "", 1),
            "no sec-websocket-protocol",
        ),
        (
            response_text("Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            "extension",
        ),
        (
            good.replacen("Upgrade: websocket", "Upgrade: h2c", 1),
            "websocket",
        ),
    ] {
        let error = check(&text).expect_err(&text);
        assert!(
            error.0.to_lowercase().contains(&why.to_lowercase()),
            "{text:?}: {error}"
        );
    }
}

#[test]
fn http_error_response_is_complete() {
    let bytes = http_error_response(400, "Bad Request", "refused\n");
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Sec-WebSocket-Version: 13\r\nContent-Length: 8\r\n\r\nrefused\n"
    );
}

// ---- frames: the examples of RFC 6455 section 5.7 --------------------------------------------

const HELLO_MASKED: [u8; 11] = [
    0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
];

#[test]
fn rfc_examples_text_frames_are_refused_masked_or_not() {
    let mut client = FrameDecoder::new(Sender::Client, 1 << 20);
    let error = client.decode_all(&HELLO_MASKED).unwrap_err();
    assert_eq!(error.close_code(), close_code::UNSUPPORTED_DATA);
    let mut server = FrameDecoder::new(Sender::Server, 1 << 20);
    let error = server
        .decode_all(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o'])
        .unwrap_err();
    assert_eq!(error.close_code(), close_code::UNSUPPORTED_DATA);
    // Failed for good.
    assert!(server.decode_all(&[0x82, 0x00]).is_err());
}

#[test]
fn rfc_examples_ping_and_masked_pong() {
    let mut server = FrameDecoder::new(Sender::Server, 1 << 20);
    let ping = [0x89, 0x05, b'H', b'e', b'l', b'l', b'o'];
    assert_eq!(
        server.decode_all(&ping).unwrap(),
        vec![Piece::Control(ControlFrame {
            opcode: Opcode::Ping,
            payload: b"Hello".to_vec(),
            raw: ping.to_vec(),
        })]
    );
    let mut pong = HELLO_MASKED;
    pong[0] = 0x8a;
    let mut client = FrameDecoder::new(Sender::Client, 1 << 20);
    assert_eq!(
        client.decode_all(&pong).unwrap(),
        vec![Piece::Control(ControlFrame {
            opcode: Opcode::Pong,
            payload: b"Hello".to_vec(),
            raw: pong.to_vec(),
        })]
    );
    assert_eq!(client.last_mask(), Some([0x37, 0xfa, 0x21, 0x3d]));
}

#[test]
fn rfc_examples_fragmented_message_and_long_lengths() {
    // "Hel" + "lo" as binary: first frame without FIN, then a continuation.
    let stream = [0x02, 0x03, b'H', b'e', b'l', 0x80, 0x02, b'l', b'o'];
    let mut server = FrameDecoder::new(Sender::Server, 1 << 20);
    assert_eq!(
        server.decode_all(&stream).unwrap(),
        vec![Piece::Data(b"Hel".to_vec()), Piece::Data(b"lo".to_vec())]
    );
    let payload: Vec<u8> = (0..=255u8).collect();
    let mut frame = vec![0x82, 0x7E, 0x01, 0x00];
    frame.extend_from_slice(&payload);
    assert_eq!(encode_frame(Opcode::Binary, &payload, None), frame);
    let mut server = FrameDecoder::new(Sender::Server, 1 << 20);
    assert_eq!(
        server.decode_all(&frame).unwrap(),
        vec![Piece::Data(payload)]
    );
    let big = vec![7u8; 65536];
    let frame = encode_frame(Opcode::Binary, &big, None);
    assert_eq!(&frame[..10], &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
    let mut server = FrameDecoder::new(Sender::Server, 1 << 20);
    assert_eq!(server.decode_all(&frame).unwrap(), vec![Piece::Data(big)]);
}

#[test]
fn encode_masks_like_the_rfc_example() {
    let mut frame = encode_frame(Opcode::Binary, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d]));
    frame[0] = 0x81;
    assert_eq!(frame, HELLO_MASKED);
}

fn refused(sender: Sender, bytes: &[u8]) -> WsError {
    FrameDecoder::new(sender, 1000)
        .decode_all(bytes)
        .unwrap_err()
}

#[test]
fn frame_rules_are_enforced() {
    let m = [1, 2, 3, 4];
    // Masking per direction.
    assert!(refused(Sender::Client, &[0x82, 0x01, 0x00])
        .message
        .contains("unmasked"));
    assert!(
        refused(Sender::Server, &encode_frame(Opcode::Binary, b"x", Some(m)))
            .message
            .contains("masked server")
    );
    // RSV bits, reserved opcodes.
    assert!(refused(Sender::Server, &[0xC2, 0x00])
        .message
        .contains("RSV"));
    assert!(refused(Sender::Server, &[0x83, 0x00])
        .message
        .contains("reserved opcode"));
    assert!(refused(Sender::Server, &[0x8B, 0x00])
        .message
        .contains("reserved opcode"));
    // Control frames: not fragmented, at most 125 bytes.
    assert!(refused(Sender::Server, &[0x09, 0x00])
        .message
        .contains("fragmented control"));
    let mut long_ping = vec![0x89, 0x7E, 0x00, 0x7E];
    long_ping.extend_from_slice(&[0; 126]);
    assert!(refused(Sender::Server, &long_ping).message.contains("125"));
    // Fragmentation order.
    assert!(refused(Sender::Server, &[0x80, 0x00])
        .message
        .contains("continuation"));
    assert!(refused(Sender::Server, &[0x02, 0x00, 0x82, 0x00])
        .message
        .contains("new message"));
    // Non-minimal lengths.
    assert!(refused(Sender::Server, &[0x82, 0x7E, 0x00, 0x05])
        .message
        .contains("non-minimal"));
    assert!(
        refused(Sender::Server, &[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF])
            .message
            .contains("non-minimal")
    );
    assert!(
        refused(Sender::Server, &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 1, 0, 0])
            .message
            .contains("top bit")
    );
    // Size: per message, across its fragments.
    let error = refused(Sender::Server, &[0x82, 0x7E, 0x03, 0xE9]);
    assert_eq!(error.close_code(), close_code::MESSAGE_TOO_BIG);
    let mut two = encode_frame(Opcode::Binary, &[0; 600], None);
    two[0] = 0x02;
    let mut cont = encode_frame(Opcode::Continuation, &[0; 401], None);
    cont[0] = 0x80;
    two.extend_from_slice(&cont);
    assert_eq!(
        refused(Sender::Server, &two).close_code(),
        close_code::MESSAGE_TOO_BIG
    );
    // Close payloads.
    assert!(refused(Sender::Server, &[0x88, 0x01, 0x03])
        .message
        .contains("1-byte"));
    assert!(refused(Sender::Server, &[0x88, 0x02, 0x03, 0xED])
        .message
        .contains("close code"));
    assert!(refused(Sender::Server, &[0x88, 0x02, 0x03, 0xEC])
        .message
        .contains("close code"));
    let bad_reason = [0x88, 0x04, 0x03, 0xE8, 0xC3, 0x28];
    assert_eq!(
        refused(Sender::Server, &bad_reason).close_code(),
        close_code::INVALID_PAYLOAD
    );
    // Nothing after a close.
    let mut after = encode_close(close_code::NORMAL, "bye", None);
    after.extend_from_slice(&[0x82, 0x00]);
    assert!(refused(Sender::Server, &after)
        .message
        .contains("after the close"));
}

#[test]
fn a_control_frame_between_fragments_is_passed_in_order() {
    let m = [9, 8, 7, 6];
    let mut stream = encode_frame(Opcode::Binary, b"ab", Some(m));
    stream[0] = 0x02;
    let ping = encode_frame(Opcode::Ping, b"p", Some(m));
    stream.extend_from_slice(&ping);
    let mut last = encode_frame(Opcode::Continuation, b"cd", Some([1, 1, 1, 1]));
    last[0] = 0x80;
    stream.extend_from_slice(&last);
    let close = encode_close(close_code::NORMAL, "", Some(m));
    stream.extend_from_slice(&close);
    let mut client = FrameDecoder::new(Sender::Client, 100);
    let pieces = client.decode_all(&stream).unwrap();
    assert_eq!(
        pieces,
        vec![
            Piece::Data(b"ab".to_vec()),
            Piece::Control(ControlFrame {
                opcode: Opcode::Ping,
                payload: b"p".to_vec(),
                raw: ping
            }),
            Piece::Data(b"cd".to_vec()),
            Piece::Control(ControlFrame {
                opcode: Opcode::Close,
                payload: vec![0x03, 0xE8],
                raw: close
            }),
        ]
    );
    assert!(client.is_closed());
    match &pieces[3] {
        Piece::Control(frame) => assert_eq!(frame.close_code(), Some(1000)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn encode_close_cuts_its_reason_at_a_character() {
    let frame = encode_close(close_code::POLICY_VIOLATION, &"é".repeat(100), None);
    assert!(frame.len() <= 127);
    let mut server = FrameDecoder::new(Sender::Server, 10);
    let pieces = server.decode_all(&frame).unwrap();
    assert!(matches!(&pieces[0], Piece::Control(c) if c.close_code() == Some(1008)));
}

// ---- any split of a stream reads the same ------------------------------------------------------

/// Data pieces joined: how a stream is read is independent of where its data pieces end.
fn normalized(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for piece in pieces {
        match (out.last_mut(), piece) {
            (Some(Piece::Data(joined)), Piece::Data(more)) => joined.extend_from_slice(&more),
            (_, piece) => out.push(piece),
        }
    }
    out
}

/// Reads `stream` in the chunks `cuts` makes; the error, if any, ends it.
fn read_split(sender: Sender, stream: &[u8], cuts: &[usize]) -> (Vec<Piece>, Option<WsError>) {
    let mut decoder = FrameDecoder::new(sender, 1 << 16);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    let mut pieces = Vec::new();
    for window in points.windows(2) {
        let mut input = &stream[window[0]..window[1]];
        loop {
            match decoder.next_piece(&mut input) {
                Ok(Some(piece)) => pieces.push(piece),
                Ok(None) => break,
                Err(e) => return (normalized(pieces), Some(e)),
            }
        }
        assert!(input.is_empty());
    }
    (normalized(pieces), None)
}

#[derive(Debug, Clone)]
enum Part {
    Message(Vec<Vec<u8>>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        4 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..4)
            .prop_map(Part::Message),
        1 => prop::collection::vec(any::<u8>(), 0..126).prop_map(Part::Ping),
        1 => prop::collection::vec(any::<u8>(), 0..126).prop_map(Part::Pong),
    ]
}

/// Frames for `parts` (a message's fragments, control frames between messages or fragments).
fn stream_of(parts: &[Part], masks: &[[u8; 4]], control_inside: bool) -> Vec<u8> {
    let mut stream = Vec::new();
    let mut m = masks.iter().cycle();
    let mut mask = || m.next().copied();
    for part in parts {
        match part {
            Part::Message(fragments) => {
                for (i, fragment) in fragments.iter().enumerate() {
                    let opcode = if i == 0 {
                        Opcode::Binary
                    } else {
                        Opcode::Continuation
                    };
                    let mut frame = encode_frame(opcode, fragment, mask());
                    if i + 1 < fragments.len() {
                        frame[0] &= 0x7F;
                        if control_inside {
                            frame.extend_from_slice(&encode_frame(Opcode::Ping, b"in", mask()));
                        }
                    }
                    stream.extend_from_slice(&frame);
                }
            }
            Part::Ping(payload) => stream.extend(encode_frame(Opcode::Ping, payload, mask())),
            Part::Pong(payload) => stream.extend(encode_frame(Opcode::Pong, payload, mask())),
        }
    }
    stream.extend(encode_close(close_code::NORMAL, "done", mask()));
    stream
}

proptest! {
    #[test]
    fn any_split_of_a_client_stream_reads_the_same(
        parts in prop::collection::vec(part(), 0..8),
        masks in prop::collection::vec(any::<[u8; 4]>(), 1..4),
        control_inside in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let stream = stream_of(&parts, &masks, control_inside);
        let (whole, error) = read_split(Sender::Client, &stream, &[]);
        prop_assert!(error.is_none(), "{error:?}");
        let (split, error) = read_split(Sender::Client, &stream, &cuts);
        prop_assert!(error.is_none());
        prop_assert_eq!(&split, &whole);
        // And it is what was framed: the messages' bytes in order, controls in place.
        let data: Vec<u8> = parts.iter().flat_map(|p| match p {
            Part::Message(fragments) => fragments.concat(),
            _ => Vec::new(),
        }).collect();
        let read: Vec<u8> = whole.iter().flat_map(|p| match p {
            Piece::Data(bytes) => bytes.clone(),
            Piece::Control(_) => Vec::new(),
        }).collect();
        prop_assert_eq!(read, data);
        prop_assert!(matches!(whole.last(), Some(Piece::Control(c)) if c.opcode == Opcode::Close));
    }

    #[test]
    fn any_split_of_arbitrary_bytes_reads_the_same_or_fails_the_same(
        stream in prop::collection::vec(any::<u8>(), 0..400),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        for sender in [Sender::Client, Sender::Server] {
            let (whole, whole_error) = read_split(sender, &stream, &[]);
            let (split, split_error) = read_split(sender, &stream, &cuts);
            prop_assert_eq!(whole_error, split_error);
            prop_assert_eq!(split, whole);
        }
    }
}
