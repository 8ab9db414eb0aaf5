//! Memcached binary protocol parser, incremental and streaming. Pure: no I/O.
//!
//! Every packet is a 24-byte header and a body:
//!
//! ```text
//! magic(1: 0x80 request, 0x81 response) opcode(1) key_length(2) extras_length(1)
//! data_type(1) vbucket_or_status(2) total_body_length(4) opaque(4) cas(8)
//! body: extras, key, value (total_body_length bytes)
//! ```
//!
//! Bodies stream by; only the first bytes of the key are kept, for the summary.

/// Bytes of a key kept for the summary.
pub const KEY_BYTES: usize = 96;
/// Largest body accepted (memcached's item limit is far below).
const MAX_BODY: u32 = 1 << 30;

/// Why the bytes are not the binary protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BinaryError {
    /// The first byte is not the magic of this direction.
    #[error("bad magic {0:#04x}")]
    BadMagic(u8),
    /// Lengths that do not add up, or a body beyond [`MAX_BODY`].
    #[error("bad length")]
    BadLength,
}

/// One parsed packet, borrowed until the next call.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The opcode.
    pub opcode: u8,
    /// Response status (0 for requests).
    pub status: u16,
    /// The opaque, copied by the server from request to response.
    pub opaque: u32,
    /// The first bytes of the key ([`KEY_BYTES`] at most).
    pub key: &'a [u8],
    /// The key was longer than what [`Packet::key`] holds.
    pub key_cut: bool,
    /// Bytes on the wire.
    pub bytes: u64,
}

/// A streaming parser for one direction of a binary-protocol connection.
#[derive(Debug)]
pub struct BinaryParser {
    magic: u8,
    header: [u8; 24],
    have: usize,
    /// Body bytes still to come; the key's position within what is left.
    body_left: u32,
    key_skip: u32,
    key_left: u32,
    key: Vec<u8>,
}

impl BinaryParser {
    /// A parser for requests (`request`) or responses.
    pub fn new(request: bool) -> Self {
        Self {
            magic: if request { 0x80 } else { 0x81 },
            header: [0; 24],
            have: 0,
            body_left: 0,
            key_skip: 0,
            key_left: 0,
            key: Vec::with_capacity(KEY_BYTES),
        }
    }

    /// True when part of a packet has been read.
    pub fn in_message(&self) -> bool {
        self.have > 0
    }

    /// Forgets any partial packet.
    pub fn reset(&mut self) {
        self.have = 0;
        self.body_left = 0;
        self.key.clear();
    }

    /// Consumes `data`, calling `on_packet` for every packet it completes. On an error the
    /// parser is reset and the rest of `data` is not read.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_packet: &mut impl FnMut(&Packet<'_>),
    ) -> Result<(), BinaryError> {
        while !data.is_empty() {
            if self.have < 24 {
                let n = (24 - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                if self.have == 0 && self.header[0] != self.magic {
                    let magic = self.header[0];
                    self.reset();
                    return Err(BinaryError::BadMagic(magic));
                }
                self.have += n;
                data = &data[n..];
                if self.have < 24 {
                    return Ok(());
                }
                if let Err(e) = self.start_body() {
                    self.reset();
                    return Err(e);
                }
            }
            let n = (self.body_left as usize).min(data.len());
            self.keep_key(&data[..n]);
            self.body_left -= n as u32;
            data = &data[n..];
            if self.body_left == 0 {
                self.emit(on_packet);
            }
        }
        Ok(())
    }

    fn start_body(&mut self) -> Result<(), BinaryError> {
        let h = &self.header;
        let key_len = u32::from(u16::from_be_bytes([h[2], h[3]]));
        let extras_len = u32::from(h[4]);
        let body = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        if body > MAX_BODY || key_len + extras_len > body {
            return Err(BinaryError::BadLength);
        }
        self.body_left = body;
        self.key_skip = extras_len;
        self.key_left = key_len;
        self.key.clear();
        Ok(())
    }

    /// Keeps the key's bytes among `bytes`, the next of the body.
    fn keep_key(&mut self, mut bytes: &[u8]) {
        let skip = (self.key_skip as usize).min(bytes.len());
        self.key_skip -= skip as u32;
        bytes = &bytes[skip..];
        let take = (self.key_left as usize).min(bytes.len());
        self.key_left -= take as u32;
        let room = KEY_BYTES - self.key.len();
        self.key.extend_from_slice(&bytes[..take.min(room)]);
    }

    fn emit(&mut self, on_packet: &mut impl FnMut(&Packet<'_>)) {
        let h = &self.header;
        let body = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        on_packet(&Packet {
            opcode: h[1],
            status: if self.magic == 0x81 {
                u16::from_be_bytes([h[6], h[7]])
            } else {
                0
            },
            opaque: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
            key: &self.key,
            key_cut: usize::from(u16::from_be_bytes([h[2], h[3]])) > self.key.len(),
            bytes: 24 + u64::from(body),
        });
        self.have = 0;
        self.key.clear();
    }
}

/// The name of an opcode, for summaries and per-command stats.
pub fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        0x00 => "GET",
        0x01 => "SET",
        0x02 => "ADD",
        0x03 => "REPLACE",
        0x04 => "DELETE",
        0x05 => "INCREMENT",
        0x06 => "DECREMENT",
        0x07 => "QUIT",
        0x08 => "FLUSH",
        0x09 => "GETQ",
        0x0a => "NOOP",
        0x0b => "VERSION",
        0x0c => "GETK",
        0x0d => "GETKQ",
        0x0e => "APPEND",
        0x0f => "PREPEND",
        0x10 => "STAT",
        0x11 => "SETQ",
        0x12 => "ADDQ",
        0x13 => "REPLACEQ",
        0x14 => "DELETEQ",
        0x15 => "INCREMENTQ",
        0x16 => "DECREMENTQ",
        0x17 => "QUITQ",
        0x18 => "FLUSHQ",
        0x19 => "APPENDQ",
        0x1a => "PREPENDQ",
        0x1c => "TOUCH",
        0x1d => "GAT",
        0x1e => "GATQ",
        0x23 => "GATK",
        0x24 => "GATKQ",
        _ => "OTHER",
    }
}

/// True for the quiet opcodes: no response on success (on a miss, for the gets).
pub fn is_quiet(opcode: u8) -> bool {
    matches!(opcode, 0x09 | 0x0d | 0x11..=0x1a | 0x1e | 0x24)
}

/// True for the retrievals (hits and misses are counted from their status).
pub fn is_retrieval(opcode: u8) -> bool {
    matches!(
        opcode,
        0x00 | 0x09 | 0x0c | 0x0d | 0x1d | 0x1e | 0x23 | 0x24
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A packet with the given fields.
    pub(crate) fn packet(
        magic: u8,
        opcode: u8,
        status: u16,
        opaque: u32,
        extras: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![magic, opcode];
        p.extend_from_slice(&(key.len() as u16).to_be_bytes());
        p.push(extras.len() as u8);
        p.push(0);
        p.extend_from_slice(&status.to_be_bytes());
        p.extend_from_slice(&((extras.len() + key.len() + value.len()) as u32).to_be_bytes());
        p.extend_from_slice(&opaque.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(extras);
        p.extend_from_slice(key);
        p.extend_from_slice(value);
        p
    }

    fn parse(request: bool, pieces: &[&[u8]]) -> Vec<(u8, u16, u32, Vec<u8>, u64)> {
        let mut parser = BinaryParser::new(request);
        let mut out = Vec::new();
        for piece in pieces {
            parser
                .feed(piece, &mut |p| {
                    out.push((p.opcode, p.status, p.opaque, p.key.to_vec(), p.bytes))
                })
                .unwrap();
        }
        out
    }

    #[test]
    fn requests_and_responses_whole_bytewise_and_split() {
        let mut requests = packet(0x80, 0x01, 0, 7, &[0; 8], b"key", b"value");
        requests.extend(packet(0x80, 0x09, 0, 8, &[], b"k2", b""));
        requests.extend(packet(0x80, 0x0a, 0, 9, &[], b"", b""));
        let whole = parse(true, &[&requests]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], (0x01, 0, 7, b"key".to_vec(), 24 + 16));
        let bytes: Vec<&[u8]> = requests.chunks(1).collect();
        assert_eq!(parse(true, &bytes), whole);
        for at in 1..requests.len() {
            let (a, b) = requests.split_at(at);
            assert_eq!(parse(true, &[a, b]), whole, "split at {at}");
        }
        let response = packet(0x81, 0x00, 1, 7, &[], b"", b"Not found");
        assert_eq!(parse(false, &[&response])[0].1, 1);
    }

    #[test]
    fn bad_magic_and_lengths_are_errors() {
        let mut p = BinaryParser::new(true);
        assert_eq!(
            p.feed(b"get k\r\n", &mut |_| {}),
            Err(BinaryError::BadMagic(b'g'))
        );
        let mut bad = packet(0x80, 0x01, 0, 1, &[0; 8], b"key", b"");
        bad[8..12].copy_from_slice(&2u32.to_be_bytes()); // body shorter than extras + key
        assert_eq!(p.feed(&bad, &mut |_| {}), Err(BinaryError::BadLength));
        assert!(!p.in_message());
    }
}
