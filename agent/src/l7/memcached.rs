//! Memcached text protocol parser, incremental and streaming. Pure: no I/O.
//!
//! Requests, one line ending in `\r\n`, storage commands followed by a data block:
//!
//! ```text
//! set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]\r\n<data>\r\n
//! cas <key> <flags> <exptime> <bytes> <cas unique> [noreply]\r\n<data>\r\n
//! get|gets <key>+\r\n                    gat|gats <exptime> <key>+\r\n
//! delete <key> [noreply]\r\n             incr|decr <key> <value> [noreply]\r\n
//! touch <key> <exptime> [noreply]\r\n    stats [<args>]\r\n   version\r\n   quit\r\n
//! flush_all [<delay>] [noreply]\r\n      verbosity <level> [noreply]\r\n
//! mg|md|ma <key> <flag>*\r\n   ms <key> <datalen> <flag>*\r\n<data>\r\n   mn\r\n   me <key>\r\n
//! ```
//!
//! A meta command with the `q` flag is quiet: its success reply (`EN` for `mg`, `HD` for
//! the others) is not sent.
//!
//! Replies, read as units that the matcher groups per request:
//!
//! ```text
//! VALUE <key> <flags> <bytes> [<cas>]\r\n<data>\r\n   (zero or more, then END\r\n)
//! STAT <name> <value>\r\n                             (zero or more, then END\r\n)
//! END | STORED | NOT_STORED | EXISTS | NOT_FOUND | DELETED | TOUCHED | OK | <number>
//! VERSION <version> | ERROR | CLIENT_ERROR <msg> | SERVER_ERROR <msg>
//! VA <size> <flag>*\r\n<data>\r\n | HD | EN | NF | NS | EX | MN | ME <key> <info>   (meta)
//! ```
//!
//! Data blocks stream by without being held; lines are capped at [`MAX_LINE`].

use memchr::memchr;

/// Longest line held across chunks.
pub const MAX_LINE: usize = 8 * 1024;
/// Bytes of a request (command and keys) kept for its summary.
pub const SUMMARY_BYTES: usize = 128;

/// Which side a parser reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Client → server.
    Request,
    /// Server → client.
    Reply,
}

/// Why the bytes are not the memcached text protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum McError {
    /// A line longer than [`MAX_LINE`].
    #[error("line too long")]
    LineTooLong,
    /// A command or reply this parser does not know, or one missing its fields.
    #[error("malformed line")]
    Malformed,
    /// A data block not followed by `\r\n`.
    #[error("data block not terminated")]
    Unterminated,
}

/// What a request expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// One line (`STORED`, `DELETED`, a number, `VERSION …`, `OK`, …).
    Line,
    /// `VALUE` blocks then `END`.
    Values,
    /// `STAT` lines then `END`.
    Stats,
    /// Nothing: `noreply`, or `quit`.
    Nothing,
}

/// One reply unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A `VALUE` line and its data block.
    Value,
    /// A `STAT` line.
    Stat,
    /// `END`.
    End,
    /// A single-line reply that is not an error.
    Line,
    /// `CLIENT_ERROR …`, `SERVER_ERROR …`.
    Error,
    /// `ERROR`: the server knows no such command.
    UnknownCommand,
    /// A meta reply: `VA` (with its data block), `HD`, `EN`, `NF`, `NS`, `EX`, `MN`, `ME`.
    Meta(MetaReply),
}

impl Unit {
    /// An error reply: `ERROR`, `CLIENT_ERROR`, `SERVER_ERROR`.
    pub fn is_error(self) -> bool {
        matches!(self, Unit::Error | Unit::UnknownCommand)
    }
}

/// The meta protocol's reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaReply {
    /// `VA`: a value follows.
    Va,
    /// `HD`: success, no value.
    Hd,
    /// `EN`: miss.
    En,
    /// `NF`: not found.
    Nf,
    /// `NS`: not stored.
    Ns,
    /// `EX`: exists (CAS mismatch).
    Ex,
    /// `MN`: the answer to `mn`.
    Mn,
    /// `ME`: debug information.
    Me,
}

/// One parsed request or reply unit, borrowed until the next call.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Bytes on the wire, data block included.
    pub bytes: u64,
    /// For a request: the command (`get`); empty for a reply.
    pub command: &'a [u8],
    /// For a request: command and keys as sent, cut at [`SUMMARY_BYTES`].
    pub summary: &'a [u8],
    /// For a request: the number of keys (retrievals), else 1.
    pub keys: u32,
    /// For a request: what it expects back.
    pub expect: Expect,
    /// For a meta request: its letter (`g`, `s`, `d`, `a`, `n`, `e`) and whether it is quiet.
    pub meta: Option<(u8, bool)>,
    /// Meta: a hash of the opaque (`O…` flag), on a request or the reply that echoes it.
    pub opaque: Option<u64>,
    /// Meta: a hash of the key, on a request with the `k` flag or a reply that returns it.
    pub key: Option<u64>,
    /// For a reply: which unit.
    pub unit: Unit,
}

/// A streaming parser for one direction of one memcached connection.
#[derive(Debug)]
pub struct McParser {
    role: Role,
    line: Vec<u8>,
    /// Bytes of the current data block still to come, its `\r\n` included.
    block_left: u64,
    /// The message waiting for its data block.
    pending: Option<Pending>,
    summary: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    bytes: u64,
    command_len: usize,
    keys: u32,
    expect: Expect,
    unit: Unit,
    meta: Option<(u8, bool)>,
    opaque: Option<u64>,
    key: Option<u64>,
}

impl McParser {
    /// Gives back the spare memory of its buffers (what they hold stays).
    pub fn shrink(&mut self) {
        self.line.shrink_to_fit();
        self.summary.shrink_to_fit();
    }

    /// A parser for one direction.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            line: Vec::new(),
            block_left: 0,
            pending: None,
            summary: Vec::with_capacity(SUMMARY_BYTES),
        }
    }

    /// True when part of a message has been read.
    pub fn in_message(&self) -> bool {
        !self.line.is_empty() || self.pending.is_some()
    }

    /// True between messages: nothing of one read, no value block to come.
    pub fn at_boundary(&self) -> bool {
        !self.in_message() && self.block_left == 0
    }

    /// Forgets any partial message.
    pub fn reset(&mut self) {
        self.line.clear();
        self.block_left = 0;
        self.pending = None;
        self.summary.clear();
    }

    /// Consumes `data`, calling `on_message` for every request or reply unit it completes.
    /// On an error the parser is reset and the rest of `data` is not read.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Result<(), McError> {
        while !data.is_empty() {
            if let Some(p) = self.pending.as_mut() {
                let n = usize::try_from(self.block_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                // The block's last two bytes must be its CRLF.
                let crlf_from = self.block_left.saturating_sub(2) as usize;
                for (i, &b) in data[..n].iter().enumerate().skip(crlf_from.min(n)) {
                    let expected = if self.block_left - i as u64 == 2 {
                        b'\r'
                    } else {
                        b'\n'
                    };
                    if b != expected {
                        self.reset();
                        return Err(McError::Unterminated);
                    }
                }
                p.bytes += n as u64;
                self.block_left -= n as u64;
                data = &data[n..];
                if self.block_left == 0 {
                    if let Some(p) = self.pending.take() {
                        self.emit(p, on_message);
                    }
                }
                continue;
            }
            let Some(end) = memchr(b'\n', data) else {
                if self.line.len() + data.len() > MAX_LINE {
                    self.reset();
                    return Err(McError::LineTooLong);
                }
                self.line.extend_from_slice(data);
                return Ok(());
            };
            let result = if self.line.is_empty() {
                self.line_done(&data[..end], on_message)
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&data[..end]);
                let result = self.line_done(&line, on_message);
                line.clear();
                self.line = line;
                result
            };
            if let Err(e) = result {
                self.reset();
                return Err(e);
            }
            data = &data[end + 1..];
        }
        Ok(())
    }

    fn line_done(
        &mut self,
        raw: &[u8],
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Result<(), McError> {
        let bytes = raw.len() as u64 + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() > MAX_LINE {
            return Err(McError::LineTooLong);
        }
        let (pending, block) = match self.role {
            Role::Request => self.request_line(line, bytes)?,
            Role::Reply => reply_line(line, bytes)?,
        };
        match block {
            Some(len) => {
                self.block_left = len + 2;
                self.pending = Some(pending);
            }
            None => self.emit(pending, on_message),
        }
        Ok(())
    }

    /// Parses a command line; keeps its summary; returns the data block length if any.
    fn request_line(&mut self, line: &[u8], bytes: u64) -> Result<(Pending, Option<u64>), McError> {
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let command = words.next().ok_or(McError::Malformed)?;
        // On the stack for the usual few words (a multi-get of many keys spills to the heap).
        let args: smallvec::SmallVec<[&[u8]; 8]> = words.collect();
        let noreply = args.last() == Some(&&b"noreply"[..]);
        let reply = |expect| if noreply { Expect::Nothing } else { expect };
        let (expect, keys, block, summary_words) = match command {
            b"get" | b"gets" if !args.is_empty() => (Expect::Values, args.len(), None, args.len()),
            b"gat" | b"gats" if args.len() >= 2 => {
                (Expect::Values, args.len() - 1, None, args.len())
            }
            b"set" | b"add" | b"replace" | b"append" | b"prepend" if args.len() >= 4 => {
                (reply(Expect::Line), 1, Some(parse_u64(args[3])?), 1)
            }
            b"cas" if args.len() >= 5 => (reply(Expect::Line), 1, Some(parse_u64(args[3])?), 1),
            b"delete" if !args.is_empty() => (reply(Expect::Line), 1, None, 1),
            b"incr" | b"decr" if args.len() >= 2 => (reply(Expect::Line), 1, None, 2),
            b"touch" if args.len() >= 2 => (reply(Expect::Line), 1, None, 2),
            b"flush_all" | b"verbosity" => (reply(Expect::Line), 1, None, args.len()),
            b"version" => (Expect::Line, 1, None, 0),
            b"stats" => (Expect::Stats, 1, None, args.len()),
            b"quit" => (Expect::Nothing, 1, None, 0),
            b"mg" | b"md" | b"ma" | b"me" if !args.is_empty() => (Expect::Line, 1, None, 1),
            b"ms" if args.len() >= 2 => (Expect::Line, 1, Some(parse_u64(args[1])?), 1),
            b"mn" => (Expect::Line, 1, None, 0),
            // A command this parser does not know: the server answers it with one line
            // (`ERROR` if it does not know it either).
            other if is_word(other) => (reply(Expect::Line), 1, None, args.len()),
            _ => return Err(McError::Malformed),
        };
        self.summary.clear();
        self.summary
            .extend_from_slice(&command[..command.len().min(SUMMARY_BYTES)]);
        for word in args.iter().take(summary_words) {
            if *word == b"noreply" {
                continue;
            }
            let room = SUMMARY_BYTES.saturating_sub(self.summary.len() + 1);
            if room == 0 {
                break;
            }
            self.summary.push(b' ');
            self.summary
                .extend_from_slice(&word[..word.len().min(room)]);
        }
        let meta = match command {
            [b'm', letter @ (b'g' | b's' | b'd' | b'a' | b'n' | b'e')] => {
                Some((*letter, args.iter().skip(1).any(|flag| *flag == b"q")))
            }
            _ => None,
        };
        let flags = if meta.is_some() {
            args.get(1..).unwrap_or_default()
        } else {
            &[]
        };
        let opaque = flags.iter().find_map(|f| f.strip_prefix(b"O")).map(tag);
        let key = flags
            .iter()
            .any(|f| *f == b"k")
            .then(|| args.first().map(|k| tag(k)))
            .flatten();
        let pending = Pending {
            bytes,
            command_len: command.len().min(SUMMARY_BYTES),
            keys: keys as u32,
            expect,
            unit: Unit::Line,
            meta,
            opaque,
            key,
        };
        Ok((pending, block))
    }

    fn emit(&mut self, p: Pending, on_message: &mut impl FnMut(&Message<'_>)) {
        let (command, summary): (&[u8], &[u8]) = match self.role {
            Role::Request => (&self.summary[..p.command_len], &self.summary),
            Role::Reply => (b"", b""),
        };
        on_message(&Message {
            bytes: p.bytes,
            command,
            summary,
            keys: p.keys,
            expect: p.expect,
            meta: p.meta,
            opaque: p.opaque,
            key: p.key,
            unit: p.unit,
        });
    }
}

/// Parses a reply line; returns the data block length for `VALUE`.
fn reply_line(line: &[u8], bytes: u64) -> Result<(Pending, Option<u64>), McError> {
    let first = line.split(|&b| b == b' ').next().unwrap_or_default();
    let (unit, block) = match first {
        b"VALUE" => {
            let len = line
                .split(|&b| b == b' ')
                .nth(3)
                .ok_or(McError::Malformed)?;
            (Unit::Value, Some(parse_u64(len)?))
        }
        b"STAT" => (Unit::Stat, None),
        b"END" => (Unit::End, None),
        b"ERROR" => (Unit::UnknownCommand, None),
        b"CLIENT_ERROR" | b"SERVER_ERROR" => (Unit::Error, None),
        b"STORED" | b"NOT_STORED" | b"EXISTS" | b"NOT_FOUND" | b"DELETED" | b"TOUCHED" | b"OK"
        | b"VERSION" => (Unit::Line, None),
        number if !number.is_empty() && number.iter().all(u8::is_ascii_digit) => (Unit::Line, None),
        b"VA" => {
            let len = line
                .split(|&b| b == b' ')
                .nth(1)
                .ok_or(McError::Malformed)?;
            (Unit::Meta(MetaReply::Va), Some(parse_u64(len)?))
        }
        b"HD" => (Unit::Meta(MetaReply::Hd), None),
        b"EN" => (Unit::Meta(MetaReply::En), None),
        b"NF" => (Unit::Meta(MetaReply::Nf), None),
        b"NS" => (Unit::Meta(MetaReply::Ns), None),
        b"EX" => (Unit::Meta(MetaReply::Ex), None),
        b"MN" => (Unit::Meta(MetaReply::Mn), None),
        b"ME" => (Unit::Meta(MetaReply::Me), None),
        _ => return Err(McError::Malformed),
    };
    let mut pending = Pending {
        bytes,
        command_len: 0,
        keys: 0,
        expect: Expect::Line,
        unit,
        meta: None,
        opaque: None,
        key: None,
    };
    if let Unit::Meta(code) = unit {
        // Flags follow the code (and the size, for VA).
        let skip = if code == MetaReply::Va { 2 } else { 1 };
        for flag in line.split(|&b| b == b' ').skip(skip) {
            match flag.split_first() {
                Some((b'O', token)) => pending.opaque = Some(tag(token)),
                Some((b'k', key)) => pending.key = Some(tag(key)),
                _ => {}
            }
        }
    }
    Ok((pending, block))
}

/// A plausible command name: 1 to 32 lower-case letters, digits or `_`.
fn is_word(w: &[u8]) -> bool {
    (1..=32).contains(&w.len())
        && w.iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

/// A hash of an opaque or key, to compare a reply with its request without keeping either.
fn tag(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = rustc_hash::FxHasher::default();
    h.write(bytes);
    h.finish()
}

fn parse_u64(digits: &[u8]) -> Result<u64, McError> {
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(McError::Malformed);
    }
    Ok(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Got {
        bytes: u64,
        summary: String,
        keys: u32,
        expect: Expect,
        unit: Unit,
        meta: Option<(u8, bool)>,
    }

    fn parse(role: Role, pieces: &[&[u8]]) -> (Vec<Got>, Option<McError>) {
        let mut p = McParser::new(role);
        let mut out = Vec::new();
        for piece in pieces {
            let r = p.feed(piece, &mut |m| {
                out.push(Got {
                    bytes: m.bytes,
                    summary: String::from_utf8_lossy(m.summary).into_owned(),
                    keys: m.keys,
                    expect: m.expect,
                    unit: m.unit,
                    meta: m.meta,
                })
            });
            if let Err(e) = r {
                return (out, Some(e));
            }
        }
        (out, None)
    }

    /// Whole, byte by byte, and split at every offset: all the same.
    fn every_way(role: Role, input: &[u8]) -> Vec<Got> {
        let (whole, err) = parse(role, &[input]);
        assert_eq!(err, None, "{}", String::from_utf8_lossy(input));
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(parse(role, &bytes), (whole.clone(), None));
        for at in 1..input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(parse(role, &[a, b]), (whole.clone(), None), "split at {at}");
        }
        whole
    }

    const REQUESTS: &[u8] = b"set k 0 0 5\r\nhello\r\nget a b c\r\ngets a\r\ngat 10 a b\r\n\
        add k 1 2 3 noreply\r\nabc\r\ncas k 0 0 1 99\r\nx\r\nincr n 5\r\ndecr n 1 noreply\r\n\
        delete k\r\ntouch k 10\r\nstats\r\nstats slabs\r\nversion\r\nflush_all noreply\r\n\
        verbosity 1\r\nappend k 0 0 0\r\n\r\nmg k v t q\r\nms k 2 T0 q\r\nhi\r\nmd k\r\n\
        ma n N0\r\nmn\r\nme k\r\nquit\r\n";

    #[test]
    fn every_request_form() {
        let got = every_way(Role::Request, REQUESTS);
        let summaries: Vec<&str> = got.iter().map(|g| g.summary.as_str()).collect();
        assert_eq!(
            summaries,
            [
                "set k",
                "get a b c",
                "gets a",
                "gat 10 a b",
                "add k",
                "cas k",
                "incr n 5",
                "decr n 1",
                "delete k",
                "touch k 10",
                "stats",
                "stats slabs",
                "version",
                "flush_all",
                "verbosity 1",
                "append k",
                "mg k",
                "ms k",
                "md k",
                "ma n",
                "mn",
                "me k",
                "quit"
            ]
        );
        assert_eq!(got[0].bytes, 20);
        assert_eq!((got[1].keys, got[1].expect), (3, Expect::Values));
        assert_eq!((got[3].keys, got[3].expect), (2, Expect::Values));
        assert_eq!(got[4].expect, Expect::Nothing);
        assert_eq!(got[7].expect, Expect::Nothing);
        assert_eq!(got[10].expect, Expect::Stats);
        assert_eq!(got[16].meta, Some((b'g', true)));
        assert_eq!(got[17].meta, Some((b's', true)));
        assert_eq!(got[18].meta, Some((b'd', false)));
        assert_eq!(
            got.iter().map(|g| g.bytes).sum::<u64>(),
            REQUESTS.len() as u64
        );
    }

    #[test]
    fn every_reply_form() {
        let replies: &[u8] = b"VALUE a 0 5\r\nhello\r\nVALUE b 3 0 77\r\n\r\nEND\r\nSTORED\r\n\
            NOT_STORED\r\nEXISTS\r\nNOT_FOUND\r\nDELETED\r\nTOUCHED\r\nOK\r\n42\r\n\
            VERSION 1.6.18\r\nSTAT pid 1\r\nSTAT uptime 2\r\nEND\r\nERROR\r\n\
            CLIENT_ERROR bad data chunk\r\nSERVER_ERROR out of memory\r\nVA 2 t-1\r\nhi\r\n\
            HD\r\nEN\r\nNF\r\nNS\r\nEX\r\nMN\r\nME k exp=-1 la=3\r\n";
        let got = every_way(Role::Reply, replies);
        let units: Vec<Unit> = got.iter().map(|g| g.unit).collect();
        use Unit::*;
        assert_eq!(
            units,
            [
                Value,
                Value,
                End,
                Line,
                Line,
                Line,
                Line,
                Line,
                Line,
                Line,
                Line,
                Line,
                Stat,
                Stat,
                End,
                UnknownCommand,
                Error,
                Error,
                Meta(MetaReply::Va),
                Meta(MetaReply::Hd),
                Meta(MetaReply::En),
                Meta(MetaReply::Nf),
                Meta(MetaReply::Ns),
                Meta(MetaReply::Ex),
                Meta(MetaReply::Mn),
                Meta(MetaReply::Me)
            ]
        );
        assert_eq!(got[0].bytes, 20);
        assert_eq!(
            got.iter().map(|g| g.bytes).sum::<u64>(),
            replies.len() as u64
        );
    }

    #[test]
    fn big_values_are_not_held() {
        let mut reply = b"VALUE k 0 1048576\r\n".to_vec();
        reply.extend(vec![b'x'; 1 << 20]);
        reply.extend_from_slice(b"\r\nEND\r\n");
        let mut p = McParser::new(Role::Reply);
        let mut n = 0;
        for chunk in reply.chunks(1448) {
            p.feed(chunk, &mut |_| n += 1).unwrap();
            assert!(p.line.capacity() <= 4096);
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn garbage_is_an_error_then_parsing_goes_on() {
        for (role, garbage) in [
            (Role::Request, &b"\x00\x01 k\r\n"[..]),
            (Role::Request, b"set k 0 0 2\r\nabc\r\n"),
            (Role::Reply, b"WHAT\r\n"),
            (Role::Reply, b"VALUE k 0 x\r\n"),
        ] {
            let mut p = McParser::new(role);
            assert!(
                p.feed(garbage, &mut |_| {}).is_err(),
                "{}",
                String::from_utf8_lossy(garbage)
            );
            let ok: &[u8] = if role == Role::Reply {
                b"STORED\r\n"
            } else {
                b"get k\r\n"
            };
            let mut n = 0;
            p.feed(ok, &mut |_| n += 1).unwrap();
            assert_eq!(n, 1);
        }
        let mut p = McParser::new(Role::Reply);
        assert_eq!(
            p.feed(&vec![b'S'; MAX_LINE + 1], &mut |_| {}),
            Err(McError::LineTooLong)
        );
    }
}
