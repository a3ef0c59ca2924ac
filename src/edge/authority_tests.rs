#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::*;

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn request(authority: &str, path: &str) -> Headers {
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("workload.spiffe.io", "true"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (u32::try_from(payload.len()).unwrap().to_be_bytes()[1..]).to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// HEADERS (+ CONTINUATIONs of `split` bytes), optionally padded and with priority.
fn header_frames(block: &[u8], stream: u32, split: usize, pad: Option<u8>, prio: bool) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(split.max(1)).collect();
    let chunks = if chunks.is_empty() {
        vec![&[][..]]
    } else {
        chunks
    };
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let mut flags = if last { FLAG_END_HEADERS } else { 0 };
        if i == 0 {
            flags |= FLAG_END_STREAM;
            let mut payload = Vec::new();
            if let Some(p) = pad {
                flags |= FLAG_PADDED;
                payload.push(p);
            }
            if prio {
                flags |= FLAG_PRIORITY;
                payload.extend([0, 0, 0, 0, 15]);
            }
            payload.extend(*chunk);
            payload.extend(std::iter::repeat_n(0, usize::from(pad.unwrap_or(0))));
            out.extend(frame(TYPE_HEADERS, flags, stream, &payload));
        } else {
            out.extend(frame(TYPE_CONTINUATION, flags, stream, chunk));
        }
    }
    out
}

fn data_frame(stream: u32, payload: &[u8]) -> Vec<u8> {
    frame(0x0, 0x1, stream, payload)
}

fn settings() -> Vec<u8> {
    frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff])
}

/// A reader that hands out at most `step` bytes per read.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .step
            .min(buf.remaining())
            .min(self.data.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

async fn run(input: Vec<u8>, step: usize) -> io::Result<Vec<u8>> {
    let mut fix = AuthorityFix::new(Trickle {
        data: input,
        pos: 0,
        step,
    });
    let mut out = Vec::new();
    fix.read_to_end(&mut out).await?;
    Ok(out)
}

/// What h2 would see: every frame, and the header lists decoded with one HPACK state.
fn parse_output(out: &[u8]) -> (Vec<(u8, u32)>, Vec<Headers>) {
    assert!(out.starts_with(PREFACE));
    let mut rest = &out[PREFACE.len()..];
    let mut decoder = loona_hpack::Decoder::new();
    let (mut frames, mut lists, mut block) = (Vec::new(), Vec::new(), Vec::new());
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        let payload = &rest[9..9 + len];
        assert!(len <= MAX_FRAME_PAYLOAD, "frame of {len} bytes");
        frames.push((kind, stream));
        if kind == TYPE_HEADERS {
            block.extend(split_headers_payload(flags, payload).unwrap().1);
        } else if kind == TYPE_CONTINUATION {
            block.extend(payload);
        }
        if (kind == TYPE_HEADERS || kind == TYPE_CONTINUATION) && flags & FLAG_END_HEADERS != 0 {
            lists.push(decoder.decode(&block).unwrap());
            block.clear();
        }
        rest = &rest[9 + len..];
    }
    (frames, lists)
}

fn encode(encoder: &mut loona_hpack::Encoder<'_>, headers: &Headers) -> Vec<u8> {
    encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
}

fn authority(list: &Headers) -> &[u8] {
    &list.iter().find(|(n, _)| n == b":authority").unwrap().1
}

#[tokio::test]
async fn compliant_clients_pass_through_byte_for_byte() {
    let mut enc = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    for stream in [1, 3, 5] {
        let block = encode(
            &mut enc,
            &request("localhost", "/SpiffeWorkloadAPI/FetchX509SVID"),
        );
        input.extend(header_frames(&block, stream, 7, Some(3), true));
        input.extend(data_frame(stream, &[0, 0, 0, 0, 0]));
    }
    for step in [1, 5, 9, 4096] {
        assert_eq!(
            run(input.clone(), step).await.unwrap(),
            input,
            "step {step}"
        );
    }
}

#[tokio::test]
async fn a_socket_path_authority_becomes_localhost_and_hpack_state_follows() {
    // grpc-core: the percent-encoded path; grpc-java: the raw path. The encoder
    // indexes every header, so later requests refer to the dynamic table.
    let mut enc = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    let sent = [
        request("localhost", "/a"),
        request("tmp%2Fsigil-agent%2Fpublic%2Fapi.sock", "/b"),
        request("tmp%2Fsigil-agent%2Fpublic%2Fapi.sock", "/b"),
        request("/tmp/sigil-agent/public/api.sock", "/c"),
        request("example.org:8081", "/d"),
    ];
    for (i, headers) in sent.iter().enumerate() {
        let stream = 1 + 2 * u32::try_from(i).unwrap();
        let block = encode(&mut enc, headers);
        input.extend(header_frames(&block, stream, 10, None, i == 1));
        input.extend(data_frame(stream, b"\0\0\0\0\0"));
    }
    for step in [1, 13, 100_000] {
        let out = run(input.clone(), step).await.unwrap();
        let (frames, lists) = parse_output(&out);
        assert_eq!(lists.len(), sent.len());
        let expected: [&[u8]; 5] = [
            b"localhost",
            b"localhost",
            b"localhost",
            b"localhost",
            b"example.org:8081",
        ];
        for ((got, sent), want) in lists.iter().zip(&sent).zip(expected) {
            assert_eq!(authority(got), want);
            let others = |l: &Headers| -> Headers {
                l.iter()
                    .filter(|(n, _)| n != b":authority")
                    .cloned()
                    .collect()
            };
            assert_eq!(others(got), others(sent), "other headers kept in order");
        }
        // DATA frames stay on their streams, after their headers.
        let streams: Vec<u32> = frames.iter().filter(|f| f.0 == 0).map(|f| f.1).collect();
        assert_eq!(streams, vec![1, 3, 5, 7, 9]);
    }
}

#[tokio::test]
async fn header_lists_up_to_the_cap_pass_and_larger_ones_do_not() {
    // The list cap is hyper's: 16 KiB counted as name + value + 32 per field.
    let base: usize = request("a%2Fb", "/x")
        .iter()
        .map(|(n, v)| n.len() + v.len() + 32)
        .sum();
    let room = MAX_HEADER_LIST - base - "x-big".len() - 32;
    for (value_len, fits) in [(room, true), (room + 1, false)] {
        let mut headers = request("a%2Fb", "/x");
        headers.push((b"x-big".to_vec(), vec![b'v'; value_len]));
        let block = encode(&mut loona_hpack::Encoder::new(), &headers);
        let mut input = PREFACE.to_vec();
        input.extend(header_frames(&block, 1, 4000, Some(0), true));
        match run(input, 4096).await {
            Ok(out) => {
                assert!(fits, "{value_len} bytes accepted");
                let (_, lists) = parse_output(&out);
                assert_eq!(authority(&lists[0]), b"localhost");
                assert_eq!(lists[0].last().unwrap().1.len(), value_len);
            }
            Err(e) => assert!(!fits, "{value_len} bytes refused: {e}"),
        }
    }
}

#[tokio::test]
async fn table_size_updates_are_honoured_and_bounded() {
    // Size updates to 0 then 4096 at the start of a block: allowed (RFC 7541 §4.2).
    let mut block = vec![0x20, 0x3f, 0xe1, 0x1f];
    block.extend(encode(
        &mut loona_hpack::Encoder::new(),
        &request("x%2Fy", "/a"),
    ));
    let mut input = PREFACE.to_vec();
    input.extend(header_frames(&block, 1, 100, None, false));
    let (_, lists) = parse_output(&run(input, 64).await.unwrap());
    assert_eq!(authority(&lists[0]), b"localhost");

    // Above the 4096 the server allows: refused.
    let mut input = PREFACE.to_vec();
    input.extend(header_frames(
        &[0x3f, 0xe2, 0x1f, 0x82],
        1,
        100,
        None,
        false,
    ));
    assert!(run(input, 64).await.is_err());
}

#[tokio::test]
async fn framing_violations_and_oversized_blocks_close_the_connection() {
    let block = encode(&mut loona_hpack::Encoder::new(), &request("a%2Fb", "/x"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("data inside a header block", {
            let mut v = frame(TYPE_HEADERS, 0, 1, &block[..4]);
            v.extend(data_frame(1, b"x"));
            v
        }),
        ("continuation on another stream", {
            let mut v = frame(TYPE_HEADERS, 0, 1, &block[..4]);
            v.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &block[4..]));
            v
        }),
        (
            "continuation alone",
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block),
        ),
        (
            "padding past the end",
            frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &[200, 1]),
        ),
        (
            "priority cut short",
            frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PRIORITY, 1, &[0, 0]),
        ),
        (
            "index out of range",
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x7f]),
        ),
        ("oversized block", {
            let mut v = frame(TYPE_HEADERS, 0, 1, &vec![0; MAX_FRAME_PAYLOAD]);
            for _ in 0..4 {
                v.extend(frame(TYPE_CONTINUATION, 0, 1, &vec![0; MAX_FRAME_PAYLOAD]));
            }
            v
        }),
        ("decoding bomb", {
            // One 4 KB entry, then referenced 5,000 times: 5 KB that decode to 20 MB.
            let mut b = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
            b.extend(vec![b'v'; 4000]);
            b.extend(std::iter::repeat_n(0xbe, 5_000));
            header_frames(&b, 1, MAX_FRAME_PAYLOAD, None, false)
        }),
    ];
    for (name, frames) in cases {
        let mut input = PREFACE.to_vec();
        input.extend(frames);
        assert!(run(input, 4096).await.is_err(), "{name} was accepted");
    }
}

#[tokio::test]
async fn anything_but_http2_passes_through_untouched() {
    let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(run(input.clone(), 3).await.unwrap(), input);
}

proptest! {
    #[test]
    fn arbitrary_frames_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048), step in 1usize..64) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut input = PREFACE.to_vec();
        input.extend(body);
        let _ = rt.block_on(run(input, step));
    }

    #[test]
    fn arbitrary_header_blocks_never_panic(block in proptest::collection::vec(any::<u8>(), 0..512)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut input = PREFACE.to_vec();
        input.extend(header_frames(&block, 1, 100, None, false));
        let _ = rt.block_on(run(input, 4096));
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_no_request_is_closed_at_the_deadline() {
    let (client, server) = tokio::io::duplex(1024);
    let mut fix = AuthorityFix::new(server).with_first_request_timeout(Duration::from_secs(10));
    let mut out = Vec::new();
    let err = fix.read_to_end(&mut out).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    drop(client);

    // One request disarms it.
    let (mut client, server) = tokio::io::duplex(4096);
    let mut fix = AuthorityFix::new(server).with_first_request_timeout(Duration::from_secs(10));
    let block = encode(
        &mut loona_hpack::Encoder::new(),
        &request("localhost", "/a"),
    );
    let mut input = PREFACE.to_vec();
    input.extend(header_frames(&block, 1, 100, None, false));
    tokio::io::AsyncWriteExt::write_all(&mut client, &input)
        .await
        .unwrap();
    let mut buf = vec![0u8; input.len()];
    fix.read_exact(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(client);
    fix.read_to_end(&mut out).await.unwrap();
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 7541 C.4.1-C.4.3: three requests on one connection, Huffman-coded.
fn rfc7541_huffman_requests() -> Vec<Vec<u8>> {
    [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]
    .iter()
    .map(|h| hex(h))
    .collect()
}

/// `:method POST`, `:scheme http`, `:path /`, then `:authority` "a b"
/// Huffman-coded (' ' 010100, 'a' 00011, 'b' 100011, EOS padding): h2
/// refuses a space.
fn huffman_refused_authority() -> Vec<u8> {
    vec![0x83, 0x86, 0x84, 0x01, 0x83, 0x1a, 0x91, 0xff]
}

/// Decodes blocks in order with one state: loona-hpack on the original, and
/// loona-hpack on what `plain_strings` made of it.
type Decoded = Vec<Result<Headers, String>>;

fn decode_both(blocks: &[Vec<u8>]) -> (Decoded, Decoded) {
    let (mut original, mut plain) = (loona_hpack::Decoder::new(), loona_hpack::Decoder::new());
    let mut a = Vec::new();
    let mut b = Vec::new();
    for block in blocks {
        a.push(original.decode(block).map_err(|e| format!("{e:?}")));
        b.push(match plain_strings(block) {
            Ok(p) => plain
                .decode(p.as_deref().unwrap_or(block))
                .map_err(|e| format!("{e:?}")),
            Err(e) => Err(e.to_string()),
        });
    }
    (a, b)
}

#[test]
fn huffman_strings_are_decoded_once_and_decode_alike() {
    let blocks = rfc7541_huffman_requests();
    let (original, plain) = decode_both(&blocks);
    let lists: Vec<Headers> = plain.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        lists,
        original.into_iter().map(Result::unwrap).collect::<Vec<_>>()
    );
    assert_eq!(authority(&lists[2]), b"www.example.com");
    assert!(lists[2].contains(&(b"custom-key".to_vec(), b"custom-value".to_vec())));
    assert!(lists[1].contains(&(b"cache-control".to_vec(), b"no-cache".to_vec())));
    // A block without Huffman strings is used as it is.
    let raw = encode(
        &mut loona_hpack::Encoder::new(),
        &request("localhost", "/x"),
    );
    assert!(plain_strings(&raw).unwrap().is_none());
    // Broken strings and integers are errors, not panics.
    for bad in [
        vec![0x01, 0x83, 0x1a, 0x91],             // string longer than the block
        vec![0x01, 0x81, 0x00],                   // Huffman padding of zeros
        vec![0xff],                               // truncated integer
        vec![0xff, 0x80, 0x80, 0x80, 0x80, 0x01], // integer over 5 octets
    ] {
        assert!(plain_strings(&bad).is_err(), "{bad:02x?}");
    }
}

#[tokio::test]
async fn huffman_coded_requests_pass_through_or_are_rewritten() {
    // Compliant (RFC 7541's requests): byte for byte.
    let mut input = PREFACE.to_vec();
    for (i, block) in rfc7541_huffman_requests().iter().enumerate() {
        input.extend(header_frames(block, 1 + 2 * i as u32, 16_384, None, false));
    }
    assert_eq!(run(input.clone(), 7).await.unwrap(), input);
    // A Huffman-coded socket-path-like authority is replaced, and the
    // requests after it follow the client's table.
    let mut input = PREFACE.to_vec();
    input.extend(header_frames(
        &huffman_refused_authority(),
        1,
        16_384,
        None,
        false,
    ));
    for (i, block) in rfc7541_huffman_requests().iter().enumerate() {
        input.extend(header_frames(block, 3 + 2 * i as u32, 5, None, false));
    }
    let (_, lists) = parse_output(&run(input, 3).await.unwrap());
    assert_eq!(lists.len(), 4);
    assert_eq!(authority(&lists[0]), b"localhost");
    assert_eq!(lists[0][2], (b":path".to_vec(), b"/".to_vec()));
    assert_eq!(authority(&lists[3]), b"www.example.com");
    assert!(lists[3].contains(&(b"custom-key".to_vec(), b"custom-value".to_vec())));
}

proptest! {
    /// Any sequence of field representations (valid or not, Huffman or
    /// not): decoding after `plain_strings` gives what decoding the original
    /// gives, table state included.
    #[test]
    fn plain_strings_never_change_what_a_block_means(
        picks in proptest::collection::vec(proptest::collection::vec(0usize..16, 0..8), 1..6),
        noise in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut pieces: Vec<Vec<u8>> = vec![
            vec![0x82], vec![0x86], vec![0x84], vec![0xbe], vec![0xbf], vec![0xc0],
            hex("41 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
            hex("58 86a8 eb10 649c bf"),
            hex("40 8825 a849 e95b a97d 7f89 25a8 49e9 5bb8 e8b4 bf"),
            vec![0x01, 0x83, 0x1a, 0x91, 0xff],
            vec![0x10, 0x01, b'x', 0x81, 0x1a],
            vec![0x3f, 0xe1, 0x1f], // table size update to 4,096
            vec![0x20],             // table size update to 0
            vec![0x44, 0x02, b'/', b'y'],
            vec![0x0f, 0x2b, 0x01, b'z'],
        ];
        pieces.push(noise);
        let blocks: Vec<Vec<u8>> = picks
            .iter()
            .map(|p| p.iter().flat_map(|&i| pieces[i].clone()).collect())
            .collect();
        let (original, plain) = decode_both(&blocks);
        for (a, b) in original.iter().zip(&plain) {
            match (a, b) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => break, // the connection closes at the first error
                _ => prop_assert!(false, "{a:?} vs {b:?}"),
            }
        }
    }
}
