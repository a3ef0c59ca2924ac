//! Accepts the `:authority` that grpc-core and grpc-java send on Unix sockets.
//!
//! grpc-core (Python, C++, Ruby, PHP) sends the percent-encoded socket path as
//! the HTTP/2 `:authority`, grpc-java the raw path. h2 refuses any value that is
//! not `host[:port]` with `RST_STREAM(PROTOCOL_ERROR)`, so those clients cannot
//! call a tonic server over a Unix socket. This layer sits on the read half of
//! each accepted connection, below h2: it follows the client's HTTP/2 frames,
//! decodes every header block with the client's HPACK state, and replaces an
//! `:authority` that h2 would refuse with `localhost` (what grpc-go sends).
//!
//! A compliant client's bytes pass through unchanged. After the first rewrite
//! the server's HPACK table no longer matches the client's, so from then on
//! every header block of that connection is re-encoded with literals only
//! (never indexed), which never touches the server's dynamic table. Header
//! blocks are capped in size, encoded and decoded; a client that breaks the
//! framing rules has its connection closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// What the client must send first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may advertise: safe for every server.
const MAX_FRAME_PAYLOAD: usize = 16_384;
const _: () = assert!(MAX_HEADER_LIST <= MAX_FRAME_PAYLOAD);
/// The HPACK table size the server allows (h2's default, never changed here).
const HPACK_TABLE_SIZE: usize = 4_096;
/// Cap on one decoded header list (RFC 7541 sizes: name + value + 32 each):
/// hyper's server default, so nothing the server would accept is refused here.
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// Cap on one header block as sent (HEADERS plus CONTINUATION fragments). A
/// block never decodes to less than it encodes minus a few bytes per field, so
/// a larger one could not fit the list cap either.
pub const MAX_HEADER_BLOCK: usize = MAX_HEADER_LIST + 1024;
/// What replaces a refused `:authority`.
const REPLACEMENT: &[u8] = b"localhost";
const READ_CHUNK: usize = 16 * 1024;

enum State {
    /// Bytes of the connection preface still to check.
    Preface(usize),
    /// Waiting for a whole frame header.
    FrameHeader,
    /// Payload bytes of a frame we do not inspect, still to pass through.
    Passthrough(usize),
    /// Not HTTP/2 (bad preface): everything passes through and h2 refuses it.
    Raw,
}

/// A header block being assembled from HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// The frames as received, passed on unchanged when nothing is rewritten.
    raw: BytesMut,
    /// The concatenated HPACK fragments.
    block: Vec<u8>,
}

/// An accepted connection whose client → server HTTP/2 header blocks are fixed up.
pub struct AuthorityFix<IO> {
    io: IO,
    input: BytesMut,
    output: BytesMut,
    state: State,
    pending: Option<PendingBlock>,
    hpack: loona_hpack::Decoder<'static>,
    /// The re-encoded header block (kept to reuse its allocation).
    encoded: Vec<u8>,
    /// Set at the first rewrite: every later header block is re-encoded.
    rewriting: bool,
    /// The workload attestation shared by the connection's requests.
    attested: std::sync::Arc<crate::attest::ConnectionAttestation>,
    eof: bool,
    /// Until the first request arrives: the connection is closed at this deadline.
    first_request: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> AuthorityFix<IO> {
    /// Wraps a freshly accepted connection.
    pub fn new(io: IO) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            io,
            input: BytesMut::new(),
            output: BytesMut::new(),
            state: State::Preface(PREFACE.len()),
            pending: None,
            hpack,
            encoded: Vec::new(),
            rewriting: false,
            attested: std::sync::Arc::default(),
            eof: false,
            first_request: None,
        }
    }

    /// Closes the connection if no request (header block) arrives within
    /// `timeout`: a peer may not hold a connection it never uses.
    pub fn with_first_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.first_request = Some(Box::pin(tokio::time::sleep(timeout)));
        self
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Moves as much of `input` to `output` as the framing allows.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Raw => {
                    self.output.unsplit(self.input.split());
                    return Ok(());
                }
                State::Preface(left) => {
                    let n = left.min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    let offset = PREFACE.len() - left;
                    if self.input[..n] != PREFACE[offset..offset + n] {
                        self.state = State::Raw;
                        continue;
                    }
                    self.output.unsplit(self.input.split_to(n));
                    self.state = match left - n {
                        0 => State::FrameHeader,
                        rest => State::Preface(rest),
                    };
                }
                State::Passthrough(left) => {
                    let n = left.min(self.input.len());
                    if n == 0 && left > 0 {
                        return Ok(());
                    }
                    self.output.unsplit(self.input.split_to(n));
                    self.state = match left - n {
                        0 => State::FrameHeader,
                        rest => State::Passthrough(rest),
                    };
                }
                State::FrameHeader => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let len = usize::from(self.input[0]) << 16
                        | usize::from(self.input[1]) << 8
                        | usize::from(self.input[2]);
                    let kind = self.input[3];
                    if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                        if self.pending.is_some() {
                            return Err(protocol(
                                "a header block was interrupted by another frame",
                            ));
                        }
                        self.output.unsplit(self.input.split_to(FRAME_HEADER_LEN));
                        self.state = State::Passthrough(len);
                        continue;
                    }
                    if len > MAX_HEADER_BLOCK {
                        return Err(protocol("header frame larger than the header block cap"));
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        self.input
                            .reserve(FRAME_HEADER_LEN + len - self.input.len());
                        return Ok(());
                    }
                    let frame = self.input.split_to(FRAME_HEADER_LEN + len);
                    self.header_frame(frame)?;
                }
            }
        }
    }

    /// Adds one HEADERS or CONTINUATION frame to the block being assembled.
    fn header_frame(&mut self, frame: BytesMut) -> io::Result<()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        match (kind, &mut self.pending) {
            (TYPE_HEADERS, None) => {
                let (priority, fragment) = split_headers_payload(flags, payload)?;
                let block = fragment.to_vec();
                self.pending = Some(PendingBlock {
                    stream,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority,
                    raw: frame,
                    block,
                });
            }
            (TYPE_CONTINUATION, Some(p)) if p.stream == stream => {
                p.block.extend_from_slice(payload);
                p.raw.unsplit(frame);
            }
            (TYPE_CONTINUATION, _) => {
                return Err(protocol(
                    "CONTINUATION without a header block on its stream",
                ));
            }
            _ => return Err(protocol("HEADERS inside another header block")),
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.block.len() > MAX_HEADER_BLOCK)
        {
            return Err(protocol("header block larger than the cap"));
        }
        if flags & FLAG_END_HEADERS != 0 {
            if let Some(p) = self.pending.take() {
                self.finish_block(p)?;
            }
        }
        Ok(())
    }

    /// Decodes a complete header block and passes it on, rewritten if needed.
    fn finish_block(&mut self, p: PendingBlock) -> io::Result<()> {
        self.first_request = None;
        let plain = plain_strings(&p.block)?;
        let mut encoded = std::mem::take(&mut self.encoded);
        encoded.clear();
        let mut list_size = 0usize;
        let mut refused_authority = false;
        let mut too_large = false;
        self.hpack
            .decode_with_cb(plain.as_deref().unwrap_or(&p.block), |name, value| {
                list_size += name.len() + value.len() + 32;
                if list_size > MAX_HEADER_LIST {
                    too_large = true;
                    return;
                }
                let value: &[u8] = if &*name == b":authority" && !authority_ok(&value) {
                    refused_authority = true;
                    REPLACEMENT
                } else {
                    &value
                };
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| protocol_owned(format!("HPACK: {e}")))?;
        if too_large {
            return Err(protocol("decoded header list larger than the cap"));
        }
        if refused_authority && !self.rewriting {
            tracing::debug!("rewriting a non-host :authority on this connection");
            self.rewriting = true;
        }
        let written = if self.rewriting {
            self.write_block(&p, &encoded)
        } else {
            self.output.unsplit(p.raw);
            Ok(())
        };
        self.encoded = encoded;
        written
    }

    /// Writes a re-encoded block as one HEADERS frame. Literals take fewer
    /// bytes than the RFC 7541 size of their field (name + value + 32), so a
    /// block within the list cap always fits one frame.
    fn write_block(&mut self, p: &PendingBlock, block: &[u8]) -> io::Result<()> {
        let prio = p.priority.as_ref().map_or(&[][..], |b| &b[..]);
        if prio.len() + block.len() > MAX_FRAME_PAYLOAD {
            return Err(protocol("re-encoded header block larger than one frame"));
        }
        let mut flags = FLAG_END_HEADERS;
        if p.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if p.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        self.frame_header(prio.len() + block.len(), TYPE_HEADERS, flags, p.stream);
        self.output.put_slice(prio);
        self.output.put_slice(block);
        Ok(())
    }

    fn frame_header(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
        self.output.put_slice(&len[1..]);
        self.output.put_u8(kind);
        self.output.put_u8(flags);
        self.output.put_u32(stream);
    }
}

/// Splits a HEADERS payload into its priority fields and its block fragment.
fn split_headers_payload(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        let (&len, tail) = rest
            .split_first()
            .ok_or_else(|| protocol("PADDED HEADERS without a pad length"))?;
        pad = usize::from(len);
        rest = tail;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let fields: [u8; 5] = rest
            .get(..5)
            .and_then(|f| f.try_into().ok())
            .ok_or_else(|| protocol("PRIORITY HEADERS shorter than its priority fields"))?;
        priority = Some(fields);
        rest = &rest[5..];
    }
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or_else(|| protocol("HEADERS padding longer than the frame"))?;
    Ok((priority, &rest[..end]))
}

/// The header block with every Huffman-coded string literal replaced by its
/// plain octets (RFC 7541 §5.2), or `None` when it has none. The field
/// representations, indexes and order are unchanged, so the HPACK decoder's
/// table follows exactly as it would on the original block.
fn plain_strings(block: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut out: Option<Vec<u8>> = None;
    let mut decoded = Vec::new();
    let mut copied = 0;
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        // (prefix bits of the index, string literals when the index is 0)
        let (prefix, literals) = match first {
            f if f & 0x80 != 0 => (7, 0), // indexed field
            f if f & 0x40 != 0 => (6, 2), // literal, incremental indexing
            f if f & 0x20 != 0 => (5, 0), // dynamic table size update
            _ => (4, 2),                  // literal, not or never indexed
        };
        let (index, n) = hpack_integer(&block[at..], prefix)?;
        at += n;
        let strings = if literals == 2 && index != 0 {
            1
        } else {
            literals
        };
        for _ in 0..strings {
            let start = at;
            let huffman = block.get(at).is_some_and(|b| b & 0x80 != 0);
            let (len, n) = hpack_integer(&block[at..], 7)?;
            let end = (at + n)
                .checked_add(len)
                .filter(|&end| end <= block.len())
                .ok_or_else(|| protocol("HPACK string longer than its header block"))?;
            if huffman {
                decoded.clear();
                super::huffman::decode(&block[at + n..end], &mut decoded).map_err(protocol)?;
                let out = out.get_or_insert_with(|| Vec::with_capacity(block.len() * 2));
                out.extend_from_slice(&block[copied..start]);
                // Writing to a Vec cannot fail.
                let _ = loona_hpack::encoder::encode_integer_into(decoded.len(), 7, 0, out);
                out.extend_from_slice(&decoded);
                copied = end;
            }
            at = end;
        }
    }
    Ok(out.map(|mut out| {
        out.extend_from_slice(&block[copied..]);
        out
    }))
}

/// An HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1) at the start
/// of `buf`, and the octets it took; at most 5 octets, as `loona-hpack` allows.
fn hpack_integer(buf: &[u8], prefix: u8) -> io::Result<(usize, usize)> {
    let mask = u8::MAX >> (8 - prefix);
    let first = buf
        .first()
        .ok_or_else(|| protocol("truncated HPACK integer"))?
        & mask;
    if first < mask {
        return Ok((usize::from(first), 1));
    }
    let mut value = usize::from(mask);
    for (k, &b) in buf.iter().skip(1).take(4).enumerate() {
        value += usize::from(b & 0x7f) << (7 * k);
        if b & 0x80 == 0 {
            return Ok((value, k + 2));
        }
    }
    Err(protocol("truncated or overlong HPACK integer"))
}

/// Whether h2 accepts this `:authority` (it parses it as an RFC 3986 authority).
fn authority_ok(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field never indexed" with a literal name (RFC 7541 §6.2.3).
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x10);
    for s in [name, value] {
        // Writing to a Vec cannot fail.
        let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

fn protocol(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn protocol_owned(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.first_request.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the first-request timeout",
                )));
            }
        }
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.input.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.input
            ))?;
            if n == 0 {
                // h2 reports the truncated frame, if any.
                this.eof = true;
                this.output.unsplit(this.input.split());
                continue;
            }
            if let Err(e) = this.process() {
                tracing::debug!(error = %e, "closing a connection that broke HTTP/2 framing");
                return Poll::Ready(Err(e));
            }
        }
    }
}

forward_write!(AuthorityFix);

/// What each request on a Unix socket connection carries (tonic puts it in
/// the request's extensions): the peer's credentials as tonic reads them at
/// accept, and the workload attestation the connection's requests share.
#[derive(Debug, Clone)]
pub struct UnixConnInfo {
    /// Peer credentials (SO_PEERCRED, taken when the peer connected).
    pub uds: tonic::transport::server::UdsConnectInfo,
    /// The attestation of the connection's process, once made.
    pub attested: std::sync::Arc<crate::attest::ConnectionAttestation>,
}

impl<IO> tonic::transport::server::Connected for AuthorityFix<IO>
where
    IO: tonic::transport::server::Connected<ConnectInfo = tonic::transport::server::UdsConnectInfo>,
{
    type ConnectInfo = UnixConnInfo;

    fn connect_info(&self) -> UnixConnInfo {
        UnixConnInfo {
            uds: self.io.connect_info(),
            attested: self.attested.clone(),
        }
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;
