//! DNS message parser: the header and the first question. Pure: no I/O.
//!
//! ```text
//! header: id(2) flags(2: QR opcode(4) AA TC RD RA Z(3) RCODE(4)) qdcount(2) ancount(2)
//!         nscount(2) arcount(2)
//! question: name (labels, or a pointer 0b11 + 14-bit offset), type(2), class(2)
//! ```
//!
//! Over UDP one datagram is one message; over TCP each message has a 2-byte length prefix
//! ([`DnsTcpFramer`] splits the stream).
//! Names with pointer loops, labels past the end or names over 255 bytes are errors.

/// Why the bytes are not a DNS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Shorter than its header or question.
    #[error("truncated message")]
    Truncated,
    /// A name that loops, runs past the message or is too long.
    #[error("bad name")]
    BadName,
}

/// What tcpkit reads of a DNS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    /// Transaction id.
    pub id: u16,
    /// A response (QR set).
    pub response: bool,
    /// Response code (0 NOERROR, 3 NXDOMAIN, …).
    pub rcode: u8,
    /// Answer records.
    pub answers: u16,
    /// The first question: type and name (dotted, with the final dot), when present.
    pub question: Option<(u16, String)>,
}

/// Longest name, as RFC 1035 sets it.
const MAX_NAME: usize = 255;
/// Pointers followed at most while reading one name.
const MAX_POINTERS: usize = 32;

/// The fixed header of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Transaction id.
    pub id: u16,
    /// A response (QR set).
    pub response: bool,
    /// Response code.
    pub rcode: u8,
    /// Questions.
    pub questions: u16,
    /// Answer records.
    pub answers: u16,
}

/// Reads the header only (no allocation).
pub fn header(msg: &[u8]) -> Result<Header, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Truncated);
    }
    let be16 = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    let flags = be16(2);
    Ok(Header {
        id: be16(0),
        response: flags & 0x8000 != 0,
        rcode: (flags & 0x000f) as u8,
        questions: be16(4),
        answers: be16(6),
    })
}

/// Reads the first question: its type, and its name (dotted, final dot included).
#[inline(always)]
pub fn question(msg: &[u8]) -> Result<Option<(u16, String)>, DnsError> {
    let mut name = String::new();
    Ok(question_into(msg, &mut name)?.map(|qtype| (qtype, name)))
}

/// Reads the first question: its type, and its name added to `name` (a buffer the caller
/// reuses: no allocation per message).
#[inline(always)]
pub fn question_into(msg: &[u8], name: &mut String) -> Result<Option<u16>, DnsError> {
    if header(msg)?.questions == 0 {
        return Ok(None);
    }
    let end = read_name_into(msg, 12, name)?;
    let qtype = msg.get(end..end + 2).ok_or(DnsError::Truncated)?;
    Ok(Some(u16::from_be_bytes([qtype[0], qtype[1]])))
}

/// Parses one whole message.
pub fn parse(msg: &[u8]) -> Result<DnsMessage, DnsError> {
    let h = header(msg)?;
    Ok(DnsMessage {
        id: h.id,
        response: h.response,
        rcode: h.rcode,
        answers: h.answers,
        question: question(msg)?,
    })
}

/// Reads the name at `start`; returns it and where the data after it (in place) begins.
#[cfg(test)]
fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let end = read_name_into(msg, start, &mut name)?;
    Ok((name, end))
}

/// Reads the name at `start` into `out` (added to what it holds); returns where the data
/// after it (in place) begins.
fn read_name_into(msg: &[u8], start: usize, out: &mut String) -> Result<usize, DnsError> {
    let from = out.len();
    let mut pos = start;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated)? as usize;
        match len {
            0 => {
                if out.len() == from {
                    out.push('.');
                }
                return Ok(end.unwrap_or(pos + 1));
            }
            l if l & 0xc0 == 0xc0 => {
                let low = *msg.get(pos + 1).ok_or(DnsError::Truncated)? as usize;
                end.get_or_insert(pos + 2);
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return Err(DnsError::BadName);
                }
                pos = ((l & 0x3f) << 8) | low;
            }
            l if l & 0xc0 != 0 => return Err(DnsError::BadName),
            l => {
                let label = msg.get(pos + 1..pos + 1 + l).ok_or(DnsError::Truncated)?;
                out.reserve(label.len() + 1);
                for &b in label {
                    match b {
                        b'.' | b'\\' => {
                            out.push('\\');
                            out.push(b as char);
                        }
                        0x21..=0x7e => out.push(b as char),
                        _ => {
                            use std::fmt::Write;
                            let _ = write!(out, "\\{b:03}");
                        }
                    }
                }
                out.push('.');
                if out.len() - from > MAX_NAME * 4 {
                    return Err(DnsError::BadName);
                }
                pos += 1 + l;
            }
        }
    }
}

/// The name of a query type, or its number.
pub fn type_name(qtype: u16) -> std::borrow::Cow<'static, str> {
    match qtype {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        other => format!("TYPE{other}").into(),
    }
}

/// The name of a response code.
pub fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "RCODE?",
    }
}

/// Splits a TCP stream into DNS messages: a 2-byte length, then the message. Keeps at most
/// [`KEPT_MESSAGE`] bytes of each (header and question are at its start).
#[derive(Debug, Default)]
pub struct DnsTcpFramer {
    len: [u8; 2],
    have_len: usize,
    left: usize,
    msg: Vec<u8>,
}

/// Bytes of a DNS-over-TCP message kept for parsing.
pub const KEPT_MESSAGE: usize = 4096;

impl DnsTcpFramer {
    /// Forgets a message partly read.
    pub fn reset(&mut self) {
        self.have_len = 0;
        self.left = 0;
        self.msg.clear();
    }

    /// True when part of a message has been read.
    pub fn in_message(&self) -> bool {
        self.have_len > 0
    }

    /// Consumes `data`, calling `on_message` with each message (its first bytes).
    pub fn feed(&mut self, mut data: &[u8], on_message: &mut impl FnMut(&[u8])) {
        while !data.is_empty() {
            if self.have_len < 2 {
                self.len[self.have_len] = data[0];
                self.have_len += 1;
                data = &data[1..];
                if self.have_len == 2 {
                    self.left = usize::from(u16::from_be_bytes(self.len));
                    self.msg.clear();
                }
            } else {
                let n = self.left.min(data.len());
                let room = KEPT_MESSAGE.saturating_sub(self.msg.len());
                self.msg.extend_from_slice(&data[..n.min(room)]);
                self.left -= n;
                data = &data[n..];
            }
            if self.have_len == 2 && self.left == 0 {
                on_message(&self.msg);
                self.have_len = 0;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` (dotted, no final dot) of type `qtype`, with the given flags.
    pub(crate) fn message(id: u16, flags: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn queries_and_responses() {
        let q = parse(&message(0x1234, 0x0100, "www.example.com", 1)).unwrap();
        assert_eq!(
            (q.id, q.response, q.question.clone()),
            (0x1234, false, Some((1, "www.example.com.".into())))
        );
        let r = parse(&message(0x1234, 0x8183, "nope.example", 28)).unwrap();
        assert_eq!(
            (r.response, r.rcode, rcode_name(r.rcode)),
            (true, 3, "NXDOMAIN")
        );
        assert_eq!(type_name(28), "AAAA");
        assert_eq!(
            parse(&message(1, 0, "", 2)).unwrap().question,
            Some((2, ".".into()))
        );
    }

    #[test]
    fn compression_pointers_and_loops() {
        // A name at 12, then a second question-like name that points back to it.
        let mut m = message(1, 0x8180, "example.com", 1);
        m.extend_from_slice(&[3, b'w', b'w', b'w', 0xc0, 12]);
        let (name, end) = read_name(&m, m.len() - 6).unwrap();
        assert_eq!((name.as_str(), end), ("www.example.com.", m.len()));
        // A pointer to itself never ends.
        let mut looped = message(1, 0, "a", 1);
        looped[12] = 0xc0;
        looped[13] = 12;
        assert_eq!(parse(&looped), Err(DnsError::BadName));
    }

    #[test]
    fn truncations_are_errors_never_panics() {
        let m = message(7, 0x0100, "www.example.com", 1);
        for cut in 0..m.len() - 4 {
            assert!(parse(&m[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(&m[..m.len() - 2]).is_ok(), "class is not needed");
    }
}

#[cfg(test)]
mod framing_tests {
    use super::tests::message;
    use super::*;

    /// Two length-prefixed messages, one of them long enough to span segments.
    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        for m in [
            message(1, 0x0100, "a.test", 1),
            message(2, 0x0100, &"x".repeat(60), 28),
        ] {
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(&m);
        }
        out
    }

    fn frame(pieces: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut framer = DnsTcpFramer::default();
        let mut out = Vec::new();
        for piece in pieces {
            framer.feed(piece, &mut |m| out.push(m.to_vec()));
        }
        assert!(!framer.in_message());
        out
    }

    #[test]
    fn messages_whole_bytewise_and_split_at_every_offset() {
        let s = stream();
        let whole = frame(&[&s]);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0], message(1, 0x0100, "a.test", 1));
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(frame(&bytes), whole);
        for at in 1..s.len() {
            let (a, b) = s.split_at(at);
            assert_eq!(frame(&[a, b]), whole, "split at {at}");
        }
    }
}
