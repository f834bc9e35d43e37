//! Just enough HPACK (RFC 7541) to rewrite one pseudo-header in a client's header blocks without
//! re-encoding the rest: a walker over the representations that mirrors the client encoder's
//! dynamic table (entry sizes and whether an entry's name is `:authority`; nothing else is
//! kept), decodes Huffman strings, and replaces an `:authority` value the `http` crate refuses
//! with a *same-length* valid one.
//!
//! Same length is what keeps this safe: an entry's size in the dynamic table is name length +
//! value length + 32, so the server's decoder evicts exactly what the client's encoder evicts,
//! and later indexed references from the client resolve on the server to the sanitized value.
//! Every other byte of the block is passed on unchanged; the server's own HPACK decoder still
//! validates everything. This module does no I/O.

use std::collections::VecDeque;
use std::sync::OnceLock;

use super::tables::{HUFFMAN, STATIC_NAMES};

/// Why a header block could not be walked (the server will refuse it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block is truncated")]
    Truncated,
    /// An integer does not fit 32 bits.
    #[error("integer overflow in header block")]
    Overflow,
    /// An index names no table entry.
    #[error("header block refers to table index {0}, which does not exist")]
    BadIndex(usize),
    /// A Huffman string is invalid (EOS, bad padding).
    #[error("invalid Huffman string in header block")]
    Huffman,
    /// A dynamic table size update above the protocol's limit for this walker.
    #[error("dynamic table size update to {0} exceeds the limit")]
    TableSize(usize),
}

/// The largest dynamic table a client may ask for. h2 advertises the protocol default (4,096);
/// its decoder refuses anything larger, so larger updates only ever reach an error path.
const MAX_TABLE: usize = 65_536;
/// Per RFC 7541 §4.1.
const ENTRY_OVERHEAD: usize = 32;
const AUTHORITY: &[u8] = b":authority";

#[derive(Debug, Clone, Copy)]
struct Entry {
    authority: bool,
    name_len: usize,
    size: usize,
}

/// The client encoder's dynamic table as far as rewriting needs it.
#[derive(Debug)]
pub struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: 4096,
        }
    }
}

impl Table {
    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }

    fn set_max(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    fn add(&mut self, e: Entry) {
        if e.size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - e.size);
        self.size += e.size;
        self.entries.push_front(e);
    }

    /// The name of entry `index` (1-based over static then dynamic): is it `:authority`, and
    /// how long is it.
    fn name(&self, index: usize) -> Result<(bool, usize), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let n = STATIC_NAMES[index - 1];
                Ok((n == AUTHORITY, n.len()))
            }
            _ => self
                .entries
                .get(index - 62)
                .map(|e| (e.authority, e.name_len))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    /// Number of entries (tests).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Reads an HPACK integer with an `n`-bit prefix at `*pos`.
fn int(b: &[u8], pos: &mut usize, n: u8) -> Result<usize, HpackError> {
    let first = *b.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mask = (1u32 << n) - 1;
    let mut v = u32::from(first) & mask;
    if v < mask {
        return Ok(v as usize);
    }
    let mut shift = 0u32;
    loop {
        let byte = *b.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        let add = (u32::from(byte) & 0x7f)
            .checked_shl(shift)
            .filter(|a| a >> shift == u32::from(byte) & 0x7f)
            .ok_or(HpackError::Overflow)?;
        v = v.checked_add(add).ok_or(HpackError::Overflow)?;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(v as usize);
        }
    }
}

pub(super) fn put_int(out: &mut Vec<u8>, first_bits: u8, n: u8, v: usize) {
    let mask = (1usize << n) - 1;
    if v < mask {
        out.push(first_bits | v as u8);
        return;
    }
    out.push(first_bits | mask as u8);
    let mut rest = v - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A string literal at `*pos`: its decoded bytes.
fn string(b: &[u8], pos: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huffman = b.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = int(b, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Overflow)?;
    let data = b.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        huffman_decode(data)
    } else {
        Ok(data.to_vec())
    }
}

/// Canonical-code decoding tables: per bit length, the first code, how many codes, and where
/// their symbols start in `symbols`.
struct Decoder {
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: Vec<u16>,
}

fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| {
        let mut order: Vec<u16> = (0..=256u16).collect();
        order.sort_by_key(|&s| (HUFFMAN[s as usize].1, HUFFMAN[s as usize].0));
        let mut d = Decoder {
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols: order.clone(),
        };
        for (i, &s) in order.iter().enumerate() {
            let (code, bits) = HUFFMAN[s as usize];
            let l = bits as usize;
            if d.count[l] == 0 {
                d.first[l] = code;
                d.offset[l] = i;
            }
            d.count[l] += 1;
        }
        d
    })
}

/// Decodes an HPACK Huffman string (RFC 7541 §5.2): EOS inside the string and padding that is
/// longer than 7 bits or not all ones are errors.
pub fn huffman_decode(data: &[u8]) -> Result<Vec<u8>, HpackError> {
    let d = decoder();
    let mut out = Vec::with_capacity(data.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in data {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > 30 {
                return Err(HpackError::Huffman);
            }
            if d.count[len] > 0 && code >= d.first[len] && code - d.first[len] < d.count[len] {
                let sym = d.symbols[d.offset[len] + (code - d.first[len]) as usize];
                if sym == 256 {
                    return Err(HpackError::Huffman);
                }
                out.push(sym as u8);
                code = 0;
                len = 0;
            }
        }
    }
    // Padding: at most 7 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// Whether the `http` crate (and so h2) accepts `v` as an authority.
fn acceptable(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// A same-length authority h2 accepts: every byte outside RFC 3986's unreserved set becomes
/// `-` (so `tmp%2Fward%2Fapi.sock` becomes `tmp-2Fward-2Fapi.sock`). `None` when even that is
/// refused (an empty value).
pub fn sanitize_authority(v: &[u8]) -> Option<Vec<u8>> {
    let fixed: Vec<u8> = v
        .iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                c
            } else {
                b'-'
            }
        })
        .collect();
    acceptable(&fixed).then_some(fixed)
}

/// What walking one header block found.
#[derive(Debug, PartialEq, Eq)]
pub enum Walked {
    /// Nothing to change: pass the original frames on.
    Unchanged,
    /// The block with the `:authority` value replaced.
    Rewritten(Vec<u8>),
}

/// Walks one complete header block, updating `table` as the server's decoder will, and
/// replaces an `:authority` value h2 would refuse. On an error the table is no longer in step
/// with the client's and must not be used again.
pub fn walk(table: &mut Table, block: &[u8]) -> Result<Walked, HpackError> {
    let mut out: Option<Vec<u8>> = None;
    let mut pos = 0;
    while pos < block.len() {
        let start = pos;
        let b = block[pos];
        if b & 0x80 != 0 {
            // Indexed field: the entry must exist; nothing changes.
            let idx = int(block, &mut pos, 7)?;
            table.name(idx)?;
        } else if b & 0xe0 == 0x20 {
            let max = int(block, &mut pos, 5)?;
            if max > MAX_TABLE {
                return Err(HpackError::TableSize(max));
            }
            table.set_max(max);
        } else {
            let (indexing, prefix) = if b & 0x40 != 0 { (true, 6) } else { (false, 4) };
            let name_idx = int(block, &mut pos, prefix)?;
            let (authority, name_len) = if name_idx == 0 {
                let n = string(block, &mut pos)?;
                (n == AUTHORITY, n.len())
            } else {
                table.name(name_idx)?
            };
            let value_start = pos;
            let value = string(block, &mut pos)?;
            if indexing {
                table.add(Entry {
                    authority,
                    name_len,
                    size: name_len + value.len() + ENTRY_OVERHEAD,
                });
            }
            if authority && value.is_empty() && !indexing {
                // An empty authority cannot be replaced at the same length, but one outside
                // the table can simply be left out: h2 treats a missing one as absent.
                out.get_or_insert_with(|| block[..start].to_vec());
                continue;
            }
            if authority
                && !acceptable(&value)
                && let Some(fixed) = sanitize_authority(&value)
            {
                let o = out.get_or_insert_with(|| {
                    let mut v = Vec::with_capacity(block.len() + 16);
                    v.extend_from_slice(&block[..start]);
                    v
                });
                o.extend_from_slice(&block[start..value_start]);
                put_int(o, 0, 7, fixed.len());
                o.extend_from_slice(&fixed);
                continue;
            }
        }
        if let Some(o) = out.as_mut() {
            o.extend_from_slice(&block[start..pos]);
        }
    }
    Ok(match out {
        Some(v) => Walked::Rewritten(v),
        None => Walked::Unchanged,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_code_is_canonical_and_decodes_rfc_examples() {
        // Codes of one length are consecutive, which the decoder relies on.
        let d = decoder();
        for l in 1..31 {
            let mut codes: Vec<u32> = HUFFMAN
                .iter()
                .filter(|(_, b)| *b as usize == l)
                .map(|(c, _)| *c)
                .collect();
            codes.sort_unstable();
            for w in codes.windows(2) {
                assert_eq!(w[1], w[0] + 1, "length {l}");
            }
            assert_eq!(d.count[l] as usize, codes.len());
        }
        // RFC 7541 C.4.1 and C.4.3.
        assert_eq!(
            huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")).unwrap(),
            b"www.example.com"
        );
        assert_eq!(
            huffman_decode(&hex("25a8 49e9 5bb8 e8b4 bf")).unwrap(),
            b"custom-value"
        );
        assert_eq!(huffman_decode(&hex("a8eb 1064 9cbf")).unwrap(), b"no-cache");
        // Padding of 8 bits, padding with a zero, and an EOS inside are refused.
        assert!(huffman_decode(&hex("a8eb 1064 9cbf ff")).is_err());
        assert!(huffman_decode(&hex("a8eb 1064 9cbe")).is_err());
        assert!(huffman_decode(&hex("ffff fffc")).is_err());
    }

    #[test]
    fn integers_follow_rfc_c1() {
        let mut p = 0;
        assert_eq!(int(&[0b0000_1010], &mut p, 5).unwrap(), 10);
        let mut p = 0;
        assert_eq!(int(&[0x1f, 0x9a, 0x0a], &mut p, 5).unwrap(), 1337);
        assert_eq!(p, 3);
        let mut v = Vec::new();
        put_int(&mut v, 0, 5, 1337);
        assert_eq!(v, [0x1f, 0x9a, 0x0a]);
        let mut p = 0;
        assert_eq!(
            int(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f], &mut p, 7),
            Err(HpackError::Overflow)
        );
        let mut p = 0;
        assert_eq!(int(&[0x7f, 0xff], &mut p, 7), Err(HpackError::Truncated));
    }

    #[test]
    fn rfc_c3_requests_walk_unchanged_and_fill_the_table() {
        // RFC 7541 C.3: three requests on one connection, no Huffman.
        let mut t = Table::default();
        let r1 = hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d");
        assert_eq!(walk(&mut t, &r1).unwrap(), Walked::Unchanged);
        assert_eq!((t.len(), t.size), (1, 57));
        let r2 = hex("8286 84be 5808 6e6f 2d63 6163 6865");
        assert_eq!(walk(&mut t, &r2).unwrap(), Walked::Unchanged);
        assert_eq!((t.len(), t.size), (2, 110));
        let r3 = hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65");
        assert_eq!(walk(&mut t, &r3).unwrap(), Walked::Unchanged);
        assert_eq!((t.len(), t.size), (3, 164));
        // An index past the table is refused.
        assert_eq!(walk(&mut t, &[0xc2]), Err(HpackError::BadIndex(66)));
    }

    /// A literal with incremental indexing of `:authority` (static name index 1), raw value.
    fn authority_literal(v: &[u8]) -> Vec<u8> {
        let mut b = vec![0x41];
        put_int(&mut b, 0, 7, v.len());
        b.extend_from_slice(v);
        b
    }

    #[test]
    fn a_percent_encoded_authority_is_replaced_in_place_and_indexed_copies_follow() {
        let mut t = Table::default();
        let path = b"tmp%2Fward%2Fagent%2Fapi.sock";
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.extend(authority_literal(path));
        block.extend([0x44, 0x03, b'/', b'a', b'b']); // :path literal, indexed
        let Walked::Rewritten(out) = walk(&mut t, &block).unwrap() else {
            panic!("expected a rewrite")
        };
        let mut want = vec![0x83, 0x86];
        want.extend(authority_literal(b"tmp-2Fward-2Fagent-2Fapi.sock"));
        want.extend([0x44, 0x03, b'/', b'a', b'b']);
        assert_eq!(out, want);
        // Both entries are in the mirrored table with the sizes the client computes.
        assert_eq!(t.len(), 2);
        assert_eq!(t.size, (10 + path.len() + 32) + (5 + 3 + 32));
        // A second request indexes both: nothing to rewrite (the server's table already holds
        // the sanitized value).
        assert_eq!(
            walk(&mut t, &[0x83, 0x86, 0xbf, 0xbe]).unwrap(),
            Walked::Unchanged
        );
    }

    #[test]
    fn huffman_and_literal_name_authorities_are_rewritten_too() {
        // Literal without indexing, literal name ":authority", Huffman value "a%b".
        let mut t = Table::default();
        // Huffman of "a%b": a=00011(5) %=010101(6) b=100011(6) → 17 bits, pad with 1s to 24.
        let value = [0b0001_1010, 0b1011_0001, 0b1111_1111];
        assert_eq!(huffman_decode(&value).unwrap(), b"a%b");
        let mut block = vec![0x00, 0x0a];
        block.extend_from_slice(b":authority");
        block.push(0x80 | 3);
        block.extend_from_slice(&value);
        let Walked::Rewritten(out) = walk(&mut t, &block).unwrap() else {
            panic!("expected a rewrite")
        };
        let mut want = vec![0x00, 0x0a];
        want.extend_from_slice(b":authority");
        want.extend([0x03, b'a', b'-', b'b']);
        assert_eq!(out, want);
        assert!(t.is_empty());
    }

    #[test]
    fn valid_authorities_and_other_headers_are_left_alone() {
        let mut t = Table::default();
        for v in [
            &b"localhost"[..],
            b"localhost:50051",
            b"[::1]:80",
            b"a.b-c_d~e",
        ] {
            assert_eq!(
                walk(&mut t, &authority_literal(v)).unwrap(),
                Walked::Unchanged
            );
        }
        // A header that is not :authority keeps its odd value.
        let mut b = vec![0x40, 0x01, b'x', 0x03];
        b.extend_from_slice(b"a%b");
        assert_eq!(walk(&mut t, &b).unwrap(), Walked::Unchanged);
        // An empty authority entering the table cannot be fixed at the same length: passed on
        // for h2 to refuse. Outside the table it is dropped.
        assert_eq!(
            walk(&mut t, &authority_literal(b"")).unwrap(),
            Walked::Unchanged
        );
        assert_eq!(
            walk(&mut t, &[0x82, 0x01, 0x00, 0x84]).unwrap(),
            Walked::Rewritten(vec![0x82, 0x84])
        );
    }

    #[test]
    fn size_updates_evict_like_the_encoder() {
        let mut t = Table::default();
        walk(&mut t, &authority_literal(b"x%y")).unwrap();
        assert_eq!(t.len(), 1);
        walk(&mut t, &[0x20]).unwrap(); // size 0: everything evicted
        assert!(t.is_empty());
        assert_eq!(walk(&mut t, &[0xbe]), Err(HpackError::BadIndex(62)));
        let mut big = vec![0x3f];
        let mut tail = Vec::new();
        put_int(&mut tail, 0, 5, 1 << 20);
        big.extend_from_slice(&tail[1..]);
        assert_eq!(walk(&mut t, &big), Err(HpackError::TableSize(1 << 20)));
        // An entry larger than the table empties it.
        let mut t = Table::default();
        walk(&mut t, &[0x3f, 0x21]).unwrap(); // max 31 + 33 = 64
        walk(&mut t, &authority_literal(b"abcdefghijklmnopqrstuvwxyz")).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn truncated_blocks_are_errors() {
        let mut t = Table::default();
        assert_eq!(
            walk(&mut t, &[0x41, 0x05, b'a']),
            Err(HpackError::Truncated)
        );
        assert_eq!(walk(&mut t, &[0x40]), Err(HpackError::Truncated));
    }
}
