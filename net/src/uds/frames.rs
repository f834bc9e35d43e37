//! HTTP/2 framing on a gRPC Unix socket, in both directions, as pure state machines over bytes.
//!
//! [`ClientFrames`] sits between the client and h2: it checks the connection preface, passes
//! every frame through unchanged except header blocks (HEADERS + CONTINUATION), which it walks
//! with [`super::hpack`] and, when their `:authority` is one h2 would refuse, re-frames with the
//! sanitized block. Anything it cannot follow (not HTTP/2, a malformed block, a frame larger
//! than every peer must accept) switches it to plain pass-through for the rest of the
//! connection, so h2 sees the original bytes and answers with its own error.
//!
//! [`ServerFrames`] watches what h2 writes back and reports the RST_STREAM and GOAWAY frames
//! that carry an error code, so protocol errors reach the log with the caller's identity.

use bytes::{Buf, BytesMut};

use super::hpack::{self, HpackError, Table, Walked};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (RFC 9113 §4.2): rewritten blocks are framed
/// within it, and larger client frames are left to h2 to refuse.
const MIN_MAX_FRAME: usize = 16_384;
/// The largest header block held back for rewriting.
const MAX_BLOCK: usize = 256 * 1024;

/// Something the client side noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The connection does not start with the HTTP/2 preface.
    NotHttp2,
    /// A request's `:authority` was replaced.
    Rewrote {
        /// The stream.
        stream: u32,
    },
    /// A header block could not be decoded; passed on for h2 to refuse.
    BadBlock {
        /// The stream.
        stream: u32,
        /// Why.
        error: HpackError,
    },
    /// Framing the rewriter does not follow; the rest of the connection passes unchanged.
    GaveUp(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preface,
    Frames,
    Payload(usize),
    Passthrough,
}

#[derive(Debug)]
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    raw: Vec<u8>,
}

/// The client → server direction.
#[derive(Debug)]
pub struct ClientFrames {
    state: State,
    input: BytesMut,
    table: Table,
    pending: Option<Pending>,
}

impl Default for ClientFrames {
    fn default() -> Self {
        Self {
            state: State::Preface,
            input: BytesMut::new(),
            table: Table::default(),
            pending: None,
        }
    }
}

fn frame_header(len: usize, ty: u8, flags: u8, stream: u32, out: &mut BytesMut) {
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&l[1..]);
    out.extend_from_slice(&[ty, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

impl ClientFrames {
    /// True once the rewriter only passes bytes through.
    pub fn passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Takes `data` from the client and appends what the server should read to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut BytesMut, on: &mut dyn FnMut(ClientEvent)) {
        if self.state == State::Passthrough && self.input.is_empty() {
            out.extend_from_slice(data);
            return;
        }
        self.input.extend_from_slice(data);
        loop {
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(&self.input.split());
                    return;
                }
                State::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        on(ClientEvent::NotHttp2);
                        self.state = State::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    out.extend_from_slice(&self.input.split_to(PREFACE.len()));
                    self.state = State::Frames;
                }
                State::Payload(left) => {
                    let n = left.min(self.input.len());
                    out.extend_from_slice(&self.input.split_to(n));
                    if n < left {
                        self.state = State::Payload(left - n);
                        return;
                    }
                    self.state = State::Frames;
                }
                State::Frames => {
                    if self.input.len() < 9 {
                        return;
                    }
                    let h = &self.input[..9];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (ty, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if ty != HEADERS && ty != CONTINUATION {
                        if self.pending.is_some() {
                            self.give_up(out, on, "a frame inside a header block");
                            continue;
                        }
                        out.extend_from_slice(&self.input.split_to(9));
                        self.state = State::Payload(len);
                        continue;
                    }
                    if len > MIN_MAX_FRAME {
                        self.give_up(out, on, "a header frame above 16 KiB");
                        continue;
                    }
                    if self.input.len() < 9 + len {
                        return;
                    }
                    let frame = self.input.split_to(9 + len);
                    self.header_frame(&frame, ty, flags, stream, out, on);
                }
            }
        }
    }

    /// The client closed its side: whatever is held back goes out as it came.
    pub fn finish(&mut self, out: &mut BytesMut) {
        if let Some(p) = self.pending.take() {
            out.extend_from_slice(&p.raw);
        }
        out.extend_from_slice(&self.input.split());
        self.state = State::Passthrough;
    }

    fn give_up(&mut self, out: &mut BytesMut, on: &mut dyn FnMut(ClientEvent), why: &'static str) {
        if let Some(p) = self.pending.take() {
            out.extend_from_slice(&p.raw);
        }
        self.state = State::Passthrough;
        on(ClientEvent::GaveUp(why));
    }

    fn header_frame(
        &mut self,
        frame: &[u8],
        ty: u8,
        flags: u8,
        stream: u32,
        out: &mut BytesMut,
        on: &mut dyn FnMut(ClientEvent),
    ) {
        let payload = &frame[9..];
        if ty == HEADERS {
            if self.pending.is_some() {
                self.give_up(out, on, "HEADERS inside a header block");
                out.extend_from_slice(frame);
                return;
            }
            let mut start = 0;
            let mut pad = 0;
            if flags & PADDED != 0 {
                pad = usize::from(payload.first().copied().unwrap_or(0));
                start = 1;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                priority = payload
                    .get(start..start + 5)
                    .and_then(|p| <[u8; 5]>::try_from(p).ok());
                start += 5;
            }
            if start + pad > payload.len() || (flags & PRIORITY != 0 && priority.is_none()) {
                self.give_up(out, on, "a HEADERS frame shorter than its padding");
                out.extend_from_slice(frame);
                return;
            }
            self.pending = Some(Pending {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: payload[start..payload.len() - pad].to_vec(),
                raw: frame.to_vec(),
            });
        } else {
            match self.pending.as_mut() {
                Some(p) if p.stream == stream => {
                    p.fragment.extend_from_slice(payload);
                    p.raw.extend_from_slice(frame);
                    if p.fragment.len() > MAX_BLOCK {
                        self.give_up(out, on, "a header block above 256 KiB");
                        return;
                    }
                }
                _ => {
                    self.give_up(out, on, "CONTINUATION outside a header block");
                    out.extend_from_slice(frame);
                    return;
                }
            }
        }
        if flags & END_HEADERS != 0
            && let Some(p) = self.pending.take()
        {
            match hpack::walk(&mut self.table, &p.fragment) {
                Ok(Walked::Unchanged) => out.extend_from_slice(&p.raw),
                Ok(Walked::Rewritten(block)) => {
                    write_block(&p, &block, out);
                    on(ClientEvent::Rewrote { stream: p.stream });
                }
                Err(error) => {
                    out.extend_from_slice(&p.raw);
                    self.state = State::Passthrough;
                    on(ClientEvent::BadBlock {
                        stream: p.stream,
                        error,
                    });
                }
            }
        }
    }
}

/// Frames a rewritten header block: one HEADERS (END_STREAM and PRIORITY kept, padding
/// dropped) and as many CONTINUATIONs as it takes.
fn write_block(p: &Pending, block: &[u8], out: &mut BytesMut) {
    let prio_len = if p.priority.is_some() { 5 } else { 0 };
    let first = block.len().min(MIN_MAX_FRAME - prio_len);
    let mut flags = 0;
    if p.end_stream {
        flags |= END_STREAM;
    }
    if p.priority.is_some() {
        flags |= PRIORITY;
    }
    if first == block.len() {
        flags |= END_HEADERS;
    }
    frame_header(prio_len + first, HEADERS, flags, p.stream, out);
    if let Some(prio) = &p.priority {
        out.extend_from_slice(prio);
    }
    out.extend_from_slice(&block[..first]);
    let mut rest = &block[first..];
    while !rest.is_empty() {
        let n = rest.len().min(MIN_MAX_FRAME);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        frame_header(n, CONTINUATION, flags, p.stream, out);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// An error frame the server sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// RST_STREAM.
    Reset {
        /// The stream.
        stream: u32,
        /// The HTTP/2 error code.
        code: u32,
    },
    /// GOAWAY.
    GoAway {
        /// The last stream the server processed.
        last_stream: u32,
        /// The HTTP/2 error code.
        code: u32,
    },
}

/// The server → client direction: only frame headers and the error codes are read.
#[derive(Debug, Default)]
pub struct ServerFrames {
    head: [u8; 9],
    have: usize,
    in_payload: bool,
    left: usize,
    ty: u8,
    stream: u32,
    capture: [u8; 8],
    captured: usize,
    want: usize,
}

impl ServerFrames {
    /// Reads what the server wrote; calls `on` for each complete RST_STREAM or GOAWAY.
    pub fn observe(&mut self, mut data: &[u8], on: &mut dyn FnMut(ServerEvent)) {
        while !data.is_empty() {
            if !self.in_payload {
                let n = (9 - self.have).min(data.len());
                self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data.advance(n);
                if self.have < 9 {
                    return;
                }
                let h = self.head;
                self.have = 0;
                self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.ty = h[3];
                self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.want = match self.ty {
                    RST_STREAM => 4,
                    GOAWAY => 8,
                    _ => 0,
                };
                self.captured = 0;
                self.in_payload = true;
            } else {
                let n = self.left.min(data.len());
                let c = (self.want - self.captured).min(n);
                self.capture[self.captured..self.captured + c].copy_from_slice(&data[..c]);
                self.captured += c;
                self.left -= n;
                data.advance(n);
            }
            if self.in_payload && self.left == 0 {
                self.in_payload = false;
                if self.want > 0 && self.captured == self.want {
                    let word = |i: usize| {
                        u32::from_be_bytes([
                            self.capture[i],
                            self.capture[i + 1],
                            self.capture[i + 2],
                            self.capture[i + 3],
                        ])
                    };
                    on(match self.ty {
                        RST_STREAM => ServerEvent::Reset {
                            stream: self.stream,
                            code: word(0),
                        },
                        _ => ServerEvent::GoAway {
                            last_stream: word(0) & 0x7fff_ffff,
                            code: word(4),
                        },
                    });
                }
            }
        }
    }
}

/// The name of an HTTP/2 error code (RFC 9113 §7).
pub fn error_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown error code",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        frame_header(payload.len(), ty, flags, stream, &mut b);
        b.extend_from_slice(payload);
        b.to_vec()
    }

    fn auth_block(v: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86, 0x41, v.len() as u8];
        b.extend_from_slice(v);
        b.extend_from_slice(&[0x44, 0x02, b'/', b'x']);
        b
    }

    /// Feeds `input` one byte at a time (the worst split) and all at once; both must agree.
    fn run(input: &[u8]) -> (Vec<u8>, Vec<ClientEvent>) {
        let mut whole = (BytesMut::new(), Vec::new());
        let mut c = ClientFrames::default();
        c.feed(input, &mut whole.0, &mut |e| whole.1.push(e));
        let mut bytewise = (BytesMut::new(), Vec::new());
        let mut c = ClientFrames::default();
        for b in input {
            c.feed(std::slice::from_ref(b), &mut bytewise.0, &mut |e| {
                bytewise.1.push(e)
            });
        }
        assert_eq!(whole.0, bytewise.0);
        assert_eq!(whole.1, bytewise.1);
        (whole.0.to_vec(), whole.1)
    }

    #[test]
    fn frames_other_than_bad_authorities_pass_unchanged() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &auth_block(b"localhost")));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
        let (out, events) = run(&input);
        assert_eq!(out, input);
        assert!(events.is_empty());
    }

    #[test]
    fn a_bad_authority_is_reframed_with_padding_dropped_and_priority_kept() {
        let mut input = PREFACE.to_vec();
        let block = auth_block(b"tmp%2Fa.sock");
        // HEADERS, padded (3) with priority, block split over a CONTINUATION.
        let mut p = vec![3, 0, 0, 0, 0, 16];
        p.extend_from_slice(&block[..5]);
        p.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &p));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &block[5..]));
        input.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        let (out, events) = run(&input);
        let mut want = PREFACE.to_vec();
        let mut p = vec![0, 0, 0, 0, 16];
        p.extend(auth_block(b"tmp-2Fa.sock"));
        want.extend(frame(HEADERS, PRIORITY | END_STREAM | END_HEADERS, 3, &p));
        want.extend(frame(0x8, 0, 0, &[0, 0, 1, 0]));
        assert_eq!(out, want);
        assert_eq!(events, vec![ClientEvent::Rewrote { stream: 3 }]);
    }

    #[test]
    fn a_block_longer_than_one_frame_is_split_into_continuations() {
        // :authority to rewrite, then a :path literal (without indexing) of 20,000 bytes.
        let mut block = auth_block(b"a%b");
        block.push(0x04);
        hpack::put_int(&mut block, 0, 7, 20_000);
        block.extend(std::iter::repeat_n(b'p', 20_000));
        let mut input = PREFACE.to_vec();
        for (i, chunk) in block.chunks(MIN_MAX_FRAME).enumerate() {
            let last = (i + 1) * MIN_MAX_FRAME >= block.len();
            let ty = if i == 0 { HEADERS } else { CONTINUATION };
            input.extend(frame(ty, if last { END_HEADERS } else { 0 }, 1, chunk));
        }
        let (out, events) = run(&input);
        assert_eq!(events, vec![ClientEvent::Rewrote { stream: 1 }]);
        // Reassemble: every frame within 16 KiB, the block equals the sanitized one.
        let mut pos = PREFACE.len();
        let mut got = Vec::new();
        while pos < out.len() {
            let n = usize::from(out[pos]) << 16
                | usize::from(out[pos + 1]) << 8
                | usize::from(out[pos + 2]);
            assert!(n <= MIN_MAX_FRAME);
            got.extend_from_slice(&out[pos + 9..pos + 9 + n]);
            pos += 9 + n;
        }
        let mut want = block.clone();
        want[5] = b'-';
        assert_eq!(got, want);
    }

    #[test]
    fn what_it_cannot_follow_passes_through_unchanged() {
        let (out, events) = run(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(events, vec![ClientEvent::NotHttp2]);
        // A broken block: the original frame goes on, later frames too, untouched.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff]));
        input.extend(frame(HEADERS, END_HEADERS, 3, &auth_block(b"a%b")));
        let (out, events) = run(&input);
        assert_eq!(out, input);
        assert_eq!(
            events,
            vec![ClientEvent::BadBlock {
                stream: 1,
                error: HpackError::Truncated
            }]
        );
        // A DATA frame inside a header block.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &auth_block(b"a%b")));
        input.extend(frame(0x0, 0, 1, b"x"));
        let (out, events) = run(&input);
        assert_eq!(out, input);
        assert_eq!(
            events,
            vec![ClientEvent::GaveUp("a frame inside a header block")]
        );
        // An oversized header frame.
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &vec![0x82; MIN_MAX_FRAME + 1],
        ));
        let (out, _) = run(&input);
        assert_eq!(out, input);
    }

    #[test]
    fn finish_releases_a_held_back_block() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &auth_block(b"a%b")));
        let mut c = ClientFrames::default();
        let mut out = BytesMut::new();
        c.feed(&input, &mut out, &mut |_| {});
        assert_eq!(out.len(), PREFACE.len());
        c.finish(&mut out);
        assert_eq!(out.to_vec(), input);
    }

    #[test]
    fn server_error_frames_are_reported_across_any_split() {
        let mut bytes = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        bytes.extend(frame(RST_STREAM, 0, 5, &1u32.to_be_bytes()));
        bytes.extend(frame(0x0, 0, 5, &[9; 40]));
        let mut g = 7u32.to_be_bytes().to_vec();
        g.extend(11u32.to_be_bytes());
        g.extend(b"debug data");
        bytes.extend(frame(GOAWAY, 0, 0, &g));
        for split in [1, 2, 7, 9, 10, 1000] {
            let mut s = ServerFrames::default();
            let mut seen = Vec::new();
            for chunk in bytes.chunks(split) {
                s.observe(chunk, &mut |e| seen.push(e));
            }
            assert_eq!(
                seen,
                vec![
                    ServerEvent::Reset { stream: 5, code: 1 },
                    ServerEvent::GoAway {
                        last_stream: 7,
                        code: 11
                    }
                ],
                "split {split}"
            );
        }
        assert_eq!(error_name(1), "PROTOCOL_ERROR");
    }
}
