//! RESP (Redis serialization protocol) parser, incremental and streaming. Pure: no I/O.
//!
//! Format (RESP2 and RESP3), one type byte then a line ending in `\r\n`:
//!
//! ```text
//! +<string>\r\n            simple string        -<error>\r\n         error
//! :<integer>\r\n           integer              $<len>\r\n<bytes>\r\n bulk string ($-1: null)
//! *<n>\r\n<n values>       array (*-1: null)    _\r\n                 null (RESP3)
//! #t\r\n / #f\r\n          boolean              ,<float>\r\n          double
//! (<digits>\r\n            big number           !<len>\r\n<bytes>\r\n bulk error
//! =<len>\r\n<fmt:bytes>\r\n verbatim string     %<n>\r\n<2n values>   map
//! ~<n>\r\n<n values>       set                  ><n>\r\n<n values>    push
//! |<n>\r\n<2n values><value>  attribute, then the value it describes
//! ```
//!
//! A request is an array of bulk strings (`*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n`) or an
//! inline command (`PING\r\n`, words separated by spaces).
//!
//! Bytes are consumed as they arrive, whatever the segmentation: a line split across chunks
//! is kept (capped at [`MAX_LINE`]), bulk payloads are skipped as they stream by, keeping only
//! the first bytes a summary needs, so a 512 MB value never sits in memory. Lines within one
//! chunk are parsed in place, without a copy. Invalid input is an error: the caller resets
//! the parser and resynchronises.

use super::cluster::{self, KeyAt, KeyAtCache, SlotHasher};
use super::templates::KEY_BYTES;
use memchr::memchr;

/// Longest line (type byte to `\n`, or an inline command) held across chunks.
pub const MAX_LINE: usize = 64 * 1024;
/// Deepest nesting of aggregates accepted.
const MAX_DEPTH: usize = 64;
/// Bytes of a request's arguments kept for its summary.
pub const SUMMARY_BYTES: usize = 128;
/// Bytes of a command name kept.
pub const COMMAND_BYTES: usize = 32;
/// Bytes kept of the first element of a reply array (`message`, `subscribe`, …).
const HEAD_BYTES: usize = 16;

/// Which side of the conversation a parser reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Client → server: commands.
    Request,
    /// Server → client: replies and pushes.
    Reply,
}

/// Why the bytes are not RESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// A type byte RESP does not have.
    #[error("unknown type byte {0:#04x}")]
    UnknownType(u8),
    /// A length or count that is not a number in range.
    #[error("bad length")]
    BadLength,
    /// A bulk string not followed by `\r\n`.
    #[error("bulk string not terminated")]
    Unterminated,
    /// A line longer than [`MAX_LINE`].
    #[error("line too long")]
    LineTooLong,
    /// Aggregates nested deeper than the parser follows.
    #[error("nesting too deep")]
    TooDeep,
    /// Not a command: a request must be an array of bulk strings or an inline command.
    #[error("not a command")]
    NotACommand,
}

/// One complete message, borrowed from the parser until the next call.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Bytes of the message on the wire.
    pub bytes: u64,
    /// The type byte of the top-level value (`b'*'` for an inline command).
    pub kind: u8,
    /// An error reply (`-` or `!`).
    pub error: bool,
    /// For a request: the command name as sent (first argument), at most
    /// [`COMMAND_BYTES`]. For a reply: its first 16 bytes when it is a string or an error
    /// (`ERR unknown com…`), or those of the first element of an array.
    pub head: &'a [u8],
    /// For a request: the arguments separated by spaces, at most [`SUMMARY_BYTES`].
    pub summary: &'a [u8],
    /// True when the summary was cut.
    pub truncated: bool,
    /// Number of top-level elements (arguments of a command).
    pub elements: u64,
    /// For a request: the Redis Cluster hash slot of its first key, when it has one
    /// ([`cluster::key_at`]).
    pub slot: Option<u16>,
    /// For a request: its first key's first [`KEY_BYTES`] bytes, when keys are kept
    /// ([`KeyWork::key`]) and it has one.
    pub key: Option<&'a [u8]>,
    /// The key was longer than what is kept.
    pub key_cut: bool,
}

/// What a request parser works out about the first key of each request, beyond the summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyWork {
    /// Its Redis Cluster hash slot ([`Message::slot`]).
    pub slots: bool,
    /// Its first bytes ([`Message::key`]), for its template.
    pub key: bool,
}

impl KeyWork {
    /// True when the first key is looked for at all.
    #[inline(always)]
    pub fn any(self) -> bool {
        self.slots || self.key
    }
}

#[derive(Debug, Clone, Copy)]
struct Open {
    remaining: u64,
    /// An attribute: once complete, the value it describes still follows.
    attribute: bool,
}

/// Bytes a request parser keeps room for: its summary, and 16 spare bytes (short copies are
/// made 16 bytes at once).
pub const REQUEST_KEPT: usize = SUMMARY_BYTES + 16;
/// Bytes a reply parser keeps room for: its head, and 16 spare bytes.
pub const REPLY_KEPT: usize = HEAD_BYTES + 16;

/// A parser of replies: room for their heads alone (112 bytes less per connection).
pub type ReplyParser = RespParser<REPLY_KEPT>;

/// A streaming RESP parser for one direction of one connection, with room for `KEPT` bytes
/// of each message ([`REQUEST_KEPT`] by default; a parser of replies needs
/// [`REPLY_KEPT`] only).
#[derive(Debug)]
pub struct RespParser<const KEPT: usize = REQUEST_KEPT> {
    role: Role,
    /// Start of a line that has not ended yet.
    line: Vec<u8>,
    /// Open aggregates, outermost first.
    stack: Vec<Open>,
    /// Bytes of the current bulk string still to come (its `\r\n` excluded).
    bulk_left: u64,
    /// The current bulk string is collected (a request argument, a reply head).
    collecting: bool,
    /// A bulk string ended: its `\r\n` is next.
    expect_crlf: bool,
    // The message being read.
    bytes: u64,
    kind: u8,
    error: bool,
    elements: u64,
    /// Index of the top-level element being read.
    element: u64,
    /// The bytes kept of the message: a request's arguments separated by spaces (its
    /// summary), or a reply's first string (its head); `kept[..kept_len]`.
    /// (16 spare bytes: short copies are made 16 bytes at once.)
    kept: [u8; KEPT],
    kept_len: usize,
    /// How many bytes are kept: [`SUMMARY_BYTES`] of a request, [`HEAD_BYTES`] of a reply.
    keep: usize,
    /// The head is the start of the kept bytes (a request's first element): its length.
    head_len: usize,
    truncated: bool,
    /// What is worked out about first keys ([`RespParser::key_work`]).
    work: KeyWork,
    /// The state of that work, only while there is some: a parser that does none (every
    /// reply parser, and request parsers by default) holds no more than this pointer.
    first_key: Option<Box<FirstKey>>,
}

/// The first key of the request being read.
#[derive(Debug)]
struct FirstKey {
    /// Which argument it is, once the command is known.
    at: KeyAt,
    /// It started (its argument began).
    started: bool,
    /// Its slot so far, while it streams (slots on).
    hasher: Option<SlotHasher>,
    /// Its slot, of a request read whole.
    slot: Option<u16>,
    /// Its first bytes (keys kept), and whether it was longer.
    buf: [u8; KEY_BYTES],
    len: usize,
    cut: bool,
    /// An `EVAL`'s numkeys as its digits come (`None` once a byte is not a digit).
    numkeys: Option<u64>,
    /// Where the first keys of the commands seen last are.
    cache: KeyAtCache,
}

impl Default for FirstKey {
    fn default() -> Self {
        Self {
            at: KeyAt::Nowhere,
            started: false,
            hasher: None,
            slot: None,
            buf: [0; KEY_BYTES],
            len: 0,
            cut: false,
            numkeys: Some(0),
            cache: KeyAtCache::default(),
        }
    }
}

impl FirstKey {
    /// Back to no key, for the next request.
    fn forget(&mut self) {
        self.at = KeyAt::Nowhere;
        self.started = false;
        self.hasher = None;
        self.slot = None;
        self.len = 0;
        self.cut = false;
        self.numkeys = Some(0);
    }

    /// Argument `element` starts: the key's, when it is its place.
    fn argument_starts(&mut self, element: u64, work: KeyWork) {
        if self.at.is_arg(element as usize) {
            self.started = true;
            if work.slots {
                self.hasher = Some(SlotHasher::default());
            }
        }
    }

    /// Bytes of argument `element`: hashed and kept when it is the key, read when it is an
    /// `EVAL`'s numkeys.
    #[inline(always)]
    fn argument_bytes(&mut self, element: u64, work: KeyWork, bytes: &[u8]) {
        if self.started {
            if self.at.is_arg(element as usize) {
                if let Some(hasher) = self.hasher.as_mut() {
                    hasher.update(bytes);
                }
                if work.key {
                    self.keep(bytes);
                }
            }
        } else if self.at == KeyAt::AfterNumkeys && element == 2 {
            self.numkeys = self.numkeys.and_then(|start| {
                bytes.iter().try_fold(start, |n, &b| {
                    b.is_ascii_digit()
                        .then(|| n.saturating_mul(10).saturating_add(u64::from(b - b'0')))
                })
            });
        }
    }

    /// Argument `element` ended (`element` counts it): after the command (`head`), where the
    /// key is; after `numkeys`, whether there is one.
    fn argument_done(&mut self, element: u64, head: &[u8]) {
        match (element, self.at) {
            (1, _) => self.at = self.cache.key_at(head),
            (3, KeyAt::AfterNumkeys) => {
                self.at = match self.numkeys {
                    Some(n) if n > 0 => KeyAt::Arg(3),
                    _ => KeyAt::Nowhere,
                };
            }
            _ => {}
        }
    }

    /// A request read whole: its first arguments.
    fn whole(&mut self, work: KeyWork, args: &[&[u8]]) {
        if let Some(key) = first_key(&mut self.cache, args) {
            self.started = true;
            if work.slots {
                self.slot = Some(cluster::key_slot(key));
            }
            if work.key {
                self.keep(key);
            }
        }
    }

    /// Keeps what fits of the key's next bytes.
    #[inline(always)]
    fn keep(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(KEY_BYTES - self.len);
        copy_short(&mut self.buf, self.len, bytes, take);
        self.len += take;
        self.cut |= take < bytes.len();
    }
}

impl RespParser {
    /// A parser of `role` with room for a request's summary ([`REQUEST_KEPT`]).
    pub fn new(role: Role) -> Self {
        Self::with_room(role)
    }
}

impl<const KEPT: usize> RespParser<KEPT> {
    /// Gives back the spare memory of its buffers (what they hold stays).
    pub fn shrink(&mut self) {
        self.line.shrink_to_fit();
        self.stack.shrink_to_fit();
    }

    /// A parser for one direction, with room for `KEPT` bytes of each message (at least the
    /// summary or head it keeps, and 16 spare).
    pub fn with_room(role: Role) -> Self {
        let keep = match role {
            Role::Request => SUMMARY_BYTES,
            Role::Reply => HEAD_BYTES,
        };
        assert!(keep + 16 <= KEPT, "room for {keep} bytes and 16 spare");
        Self {
            role,
            line: Vec::new(),
            // Allocated when a message is first read piece by piece (a whole command is not).
            stack: Vec::new(),
            bulk_left: 0,
            collecting: false,
            expect_crlf: false,
            bytes: 0,
            kind: 0,
            error: false,
            elements: 0,
            element: 0,
            kept: [0; KEPT],
            kept_len: 0,
            keep,
            head_len: 0,
            truncated: false,
            work: KeyWork::default(),
            first_key: None,
        }
    }

    /// What requests get about their first key: its Redis Cluster hash slot
    /// ([`Message::slot`]), its bytes ([`Message::key`]); with neither, the parser does no
    /// work for keys.
    #[inline(always)]
    pub fn key_work(&mut self, work: KeyWork) {
        if self.work != work {
            self.work = work;
            self.first_key = work.any().then(Box::default);
        }
    }

    /// True when part of a message has been read.
    pub fn in_message(&self) -> bool {
        self.kind != 0 || !self.line.is_empty()
    }

    /// Forgets any partial message.
    pub fn reset(&mut self) {
        self.line.clear();
        self.stack.clear();
        self.bulk_left = 0;
        self.collecting = false;
        self.expect_crlf = false;
        self.start_message();
    }

    /// Consumes `data`, calling `on_message` for every message it completes. On an error the
    /// parser is reset and the rest of `data` is not read.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Result<(), RespError> {
        while !data.is_empty() {
            if self.at_boundary() {
                // Fast path: a whole small message is buffered; parse it in one go.
                if let Some(used) = self.whole_message(data, on_message) {
                    data = &data[used..];
                    continue;
                }
            }
            if self.bulk_left > 0 {
                // Fast path: the whole bulk and its CRLF are here.
                let whole = usize::try_from(self.bulk_left)
                    .ok()
                    .filter(|n| n + 2 <= data.len());
                if let Some(n) = whole {
                    if self.collecting {
                        self.collect(&data[..n]);
                        self.hash_key(&data[..n]);
                    }
                    if !crlf_at(data, n) {
                        self.reset();
                        return Err(RespError::Unterminated);
                    }
                    self.bulk_left = 0;
                    self.collecting = false;
                    self.bytes += n as u64 + 2;
                    data = &data[n + 2..];
                    if let Err(e) = self.value_done(on_message) {
                        self.reset();
                        return Err(e);
                    }
                    continue;
                }
                let n = usize::try_from(self.bulk_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                if self.collecting {
                    self.collect(&data[..n]);
                    self.hash_key(&data[..n]);
                }
                self.bulk_left -= n as u64;
                self.bytes += n as u64;
                data = &data[n..];
                if self.bulk_left == 0 {
                    self.expect_crlf = true;
                }
                continue;
            }
            let Some(end) = find_newline(data) else {
                if self.line.len() + data.len() > MAX_LINE {
                    self.reset();
                    return Err(RespError::LineTooLong);
                }
                self.line.extend_from_slice(data);
                return Ok(());
            };
            let result = if self.line.is_empty() {
                self.bytes += end as u64 + 1;
                self.line_done(&data[..end], on_message)
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&data[..end]);
                self.bytes += line.len() as u64 + 1;
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

    /// True between messages: nothing of one read.
    pub fn at_boundary(&self) -> bool {
        self.kind == 0 && self.line.is_empty() && self.bulk_left == 0 && !self.expect_crlf
    }

    /// Parses one message that `data` holds whole, the common shapes only (a command as an
    /// array of bulk strings; a simple string, error, integer or bulk reply). Returns the
    /// bytes used, or `None`, having changed nothing, for anything else: an incomplete
    /// message, another shape, invalid bytes; the state machine then takes it.
    fn whole_message(
        &mut self,
        data: &[u8],
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Option<usize> {
        let used = match (self.role, data[0]) {
            // Two copies of the loop: with slots off it does nothing for them.
            (Role::Request, b'*') if self.work.any() => self.whole_command::<true>(data),
            (Role::Request, b'*') => self.whole_command::<false>(data),
            (Role::Reply, b'+' | b'-' | b':') => {
                let end = find_newline(data)?;
                let line_len = end - 1 - usize::from(data[end - 1] == b'\r');
                self.kind = data[0];
                self.error = data[0] == b'-';
                self.keep(&data[1..], line_len);
                Some(end + 1)
            }
            (Role::Reply, b'$') => {
                if data.get(1..5) == Some(b"-1\r\n") {
                    self.kind = b'$';
                    return self.finish_whole(5, on_message); // null bulk
                }
                let (len, start) = parse_count(data, 1)?;
                let end = start + len;
                if !crlf_at(data, end) {
                    return None;
                }
                self.kind = b'$';
                self.collect(&data[start..end]);
                Some(end + 2)
            }
            _ => None,
        };
        match used {
            Some(used) => self.finish_whole(used, on_message),
            None => {
                self.start_message();
                None
            }
        }
    }

    /// `*<n>\r\n` then n bulk strings, all buffered. The hot path of a busy server: the
    /// summary is built in locals and short arguments are copied 16 bytes at once.
    /// With `KEYS`, the first four arguments are remembered, for the first key.
    fn whole_command<const KEYS: bool>(&mut self, data: &[u8]) -> Option<usize> {
        let (n, mut pos) = parse_count(data, 1)?;
        if !(1..=1024).contains(&n) {
            return None;
        }
        let mut kept = 0;
        let mut truncated = false;
        let mut args: [&[u8]; 4] = [&[]; 4];
        for i in 0..n {
            if data.get(pos) != Some(&b'$') {
                return None;
            }
            let (len, start) = parse_count(data, pos + 1)?;
            let end = start + len;
            if !crlf_at(data, end) {
                return None;
            }
            if i > 0 {
                if kept < SUMMARY_BYTES {
                    self.kept[kept] = b' ';
                    kept += 1;
                } else {
                    truncated = true;
                }
            }
            let take = len.min(SUMMARY_BYTES - kept);
            truncated |= take < len;
            copy_short(&mut self.kept, kept, &data[start..], take);
            kept += take;
            if i == 0 {
                self.head_len = kept.min(COMMAND_BYTES);
            }
            if KEYS && i < args.len() {
                args[i] = &data[start..end];
            }
            pos = end + 2;
        }
        self.kept_len = kept;
        self.truncated = truncated;
        self.kind = b'*';
        self.elements = n as u64;
        if KEYS {
            if let Some(first) = self.first_key.as_deref_mut() {
                first.whole(self.work, &args[..n.min(args.len())]);
            }
        }
        Some(pos)
    }

    fn finish_whole(
        &mut self,
        used: usize,
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Option<usize> {
        self.bytes = used as u64;
        self.emit(on_message);
        Some(used)
    }

    /// Handles one line (without its `\n`).
    fn line_done(
        &mut self,
        line: &[u8],
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Result<(), RespError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.expect_crlf {
            if !line.is_empty() {
                return Err(RespError::Unterminated);
            }
            self.expect_crlf = false;
            self.collecting = false;
            return self.value_done(on_message);
        }
        let top_level = self.kind == 0;
        let Some((&type_byte, rest)) = line.split_first() else {
            // Blank lines between commands are ignored, as Redis does.
            return if top_level && self.role == Role::Request {
                self.bytes = 0;
                Ok(())
            } else {
                Err(RespError::UnknownType(b'\n'))
            };
        };
        if top_level {
            self.kind = type_byte;
            if self.role == Role::Request && type_byte != b'*' {
                return self.inline_command(line, on_message);
            }
        }
        if self.role == Role::Request && !top_level && self.stack.len() == 1 && type_byte != b'$' {
            return Err(RespError::NotACommand);
        }
        match type_byte {
            b'+' | b':' | b',' | b'(' | b'#' | b'_' => {
                if self.collects_here() {
                    self.collect(rest);
                }
                self.value_done(on_message)
            }
            b'-' => {
                self.error |= top_level;
                if self.collects_here() {
                    self.collect(rest);
                }
                self.value_done(on_message)
            }
            b'$' | b'!' | b'=' => {
                self.error |= top_level && type_byte == b'!';
                let len = parse_len(rest)?;
                if len < 0 {
                    return self.value_done(on_message); // null bulk
                }
                self.collecting = self.collects_here();
                if self.collecting && self.role == Role::Request && self.element > 0 {
                    self.separate();
                    if let Some(first) = self.first_key.as_deref_mut() {
                        first.argument_starts(self.element, self.work);
                    }
                }
                self.bulk_left = len as u64;
                self.expect_crlf = len == 0;
                Ok(())
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = parse_len(rest)?;
                if top_level {
                    self.elements = n.max(0) as u64;
                }
                if n <= 0 {
                    return if type_byte == b'|' {
                        Ok(())
                    } else {
                        self.value_done(on_message)
                    };
                }
                if self.stack.len() >= MAX_DEPTH {
                    return Err(RespError::TooDeep);
                }
                let pairs = matches!(type_byte, b'%' | b'|');
                let remaining = if pairs { 2 * n as u64 } else { n as u64 };
                self.stack.push(Open {
                    remaining,
                    attribute: type_byte == b'|',
                });
                Ok(())
            }
            other => Err(RespError::UnknownType(other)),
        }
    }

    /// True when the value starting now is one whose bytes are kept: a request's arguments,
    /// the first element of a reply array.
    fn collects_here(&self) -> bool {
        match self.role {
            Role::Request => self.stack.len() == 1,
            Role::Reply => self.stack.is_empty() || (self.stack.len() == 1 && self.element == 0),
        }
    }

    /// The space between two words of a request's summary.
    fn separate(&mut self) {
        if self.kept_len < self.keep {
            self.kept[self.kept_len] = b' ';
            self.kept_len += 1;
        } else {
            self.truncated = true;
        }
    }

    /// Bytes of a request's argument, for its first key.
    #[inline(always)]
    fn hash_key(&mut self, bytes: &[u8]) {
        if let Some(first) = self.first_key.as_deref_mut() {
            first.argument_bytes(self.element, self.work, bytes);
        }
    }

    /// A request's argument ended (`self.element` counts it).
    fn argument_done(&mut self) {
        if let Some(first) = self.first_key.as_deref_mut() {
            first.argument_done(self.element, &self.kept[..self.head_len]);
        }
    }

    /// Keeps what fits of `bytes`; while the first element is read, it is the head.
    fn collect(&mut self, bytes: &[u8]) {
        self.keep(bytes, bytes.len());
    }

    /// Keeps what fits of the first `len` bytes of `src` (which may go on past them).
    #[inline(always)]
    fn keep(&mut self, src: &[u8], len: usize) {
        let take = len.min(self.keep - self.kept_len);
        self.truncated |= take < len;
        copy_short(&mut self.kept, self.kept_len, src, take);
        self.kept_len += take;
        if self.element == 0 {
            self.head_len = self.kept_len.min(COMMAND_BYTES);
        }
    }

    /// A value ended: close the aggregates it completes, and the message when it is whole.
    fn value_done(&mut self, on_message: &mut impl FnMut(&Message<'_>)) -> Result<(), RespError> {
        loop {
            let depth = self.stack.len();
            if depth == 1 {
                self.element += 1;
                if self.role == Role::Request {
                    self.argument_done();
                }
            }
            let Some(open) = self.stack.last_mut() else {
                self.emit(on_message);
                return Ok(());
            };
            open.remaining -= 1;
            if open.remaining > 0 {
                return Ok(());
            }
            let attribute = open.attribute;
            self.stack.pop();
            if attribute {
                return Ok(()); // the value the attribute describes follows
            }
        }
    }

    fn inline_command(
        &mut self,
        line: &[u8],
        on_message: &mut impl FnMut(&Message<'_>),
    ) -> Result<(), RespError> {
        let mut words = line
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|w| !w.is_empty());
        let Some(first) = words.next() else {
            self.start_message();
            return Ok(());
        };
        self.collect(first);
        self.element = 1;
        self.argument_done();
        for word in words {
            self.separate();
            if let Some(first) = self.first_key.as_deref_mut() {
                first.argument_starts(self.element, self.work);
            }
            self.collect(word);
            self.hash_key(word);
            self.element += 1;
            self.argument_done();
        }
        self.elements = self.element;
        self.kind = b'*';
        self.emit(on_message);
        Ok(())
    }

    fn emit(&mut self, on_message: &mut impl FnMut(&Message<'_>)) {
        let (slot, key, key_cut) = match self.first_key.as_deref() {
            Some(f) if f.started => first_key_fields(f, self.work),
            _ => (None, None, false),
        };
        on_message(&Message {
            bytes: self.bytes,
            kind: self.kind,
            error: self.error,
            head: &self.kept[..self.head_len],
            summary: match self.role {
                Role::Request => &self.kept[..self.kept_len],
                Role::Reply => &[],
            },
            truncated: self.truncated,
            elements: self.elements,
            slot,
            key,
            key_cut,
        });
        self.start_message();
    }

    fn start_message(&mut self) {
        self.bytes = 0;
        self.kind = 0;
        self.error = false;
        self.elements = 0;
        self.element = 0;
        self.kept_len = 0;
        self.head_len = 0;
        self.truncated = false;
        if let Some(first) = self.first_key.as_deref_mut() {
            first.forget();
        }
    }
}

/// What a message says of its first key: its slot, its bytes kept, whether they were cut.
#[inline]
fn first_key_fields(f: &FirstKey, work: KeyWork) -> (Option<u16>, Option<&[u8]>, bool) {
    let slot = if work.slots {
        f.slot.or(f.hasher.map(|h| h.slot()))
    } else {
        None
    };
    let key = work.key.then(|| &f.buf[..f.len]);
    (slot, key, f.cut)
}

/// A command's first key, from its first arguments (the command first).
fn first_key<'a>(cache: &mut KeyAtCache, args: &[&'a [u8]]) -> Option<&'a [u8]> {
    let key = match cache.key_at(args.first()?) {
        KeyAt::Arg(i) => usize::from(i),
        KeyAt::AfterNumkeys
            if args
                .get(2)
                .is_some_and(|n| numkeys_then_key(n) == KeyAt::Arg(3)) =>
        {
            3
        }
        _ => return None,
    };
    args.get(key).copied()
}

/// After `numkeys` (an `EVAL`'s third argument): the first key is next when there is one.
fn numkeys_then_key(numkeys: &[u8]) -> KeyAt {
    let digits = !numkeys.is_empty() && numkeys.iter().all(u8::is_ascii_digit);
    if digits && numkeys.iter().any(|&d| d != b'0') {
        KeyAt::Arg(3)
    } else {
        KeyAt::Nowhere
    }
}

/// The position of the first `\n`: RESP lines are short, so the first bytes are looked at
/// one by one before handing longer data to memchr.
fn find_newline(data: &[u8]) -> Option<usize> {
    let head = data.len().min(16);
    match data[..head].iter().position(|&b| b == b'\n') {
        Some(i) => Some(i),
        None => memchr(b'\n', &data[head..]).map(|i| i + head),
    }
}

/// True when `data` holds `\r\n` at `at` (two byte compares: a slice compare would call
/// memcmp, and this runs several times per message).
#[inline]
fn crlf_at(data: &[u8], at: usize) -> bool {
    data.get(at) == Some(&b'\r') && data.get(at.wrapping_add(1)) == Some(&b'\n')
}

/// Reads the count or length that starts at `data[at]` and ends with `\r\n`: the number and
/// where what follows it starts, or `None` when it is not all there, not a non-negative
/// number, or over 2^40 (so that adding it to a position cannot overflow).
#[inline(always)]
fn parse_count(data: &[u8], at: usize) -> Option<(usize, usize)> {
    let digits = data.get(at..)?;
    // One or two digits: nearly every count and length on the wire.
    if let Some(&[a, b, c, d]) = digits.get(..4) {
        let (a, b) = (a.wrapping_sub(b'0'), b.wrapping_sub(b'0'));
        if a <= 9 {
            if b == b'\r'.wrapping_sub(b'0') && c == b'\n' {
                return Some((usize::from(a), at + 3));
            }
            if b <= 9 && c == b'\r' && d == b'\n' {
                return Some((usize::from(a) * 10 + usize::from(b), at + 4));
            }
        }
    }
    let mut n = 0usize;
    let mut i = 0;
    while let Some(&b) = digits.get(i) {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        n = n * 10 + usize::from(d);
        i += 1;
        if i > 13 {
            return None;
        }
    }
    if i == 0 || n > 1 << 40 || !crlf_at(digits, i) {
        return None;
    }
    Some((n, at + i + 2))
}

/// Copies `n` bytes of `src` to `dst[at..]`: at most 16 in one fixed-size move when both
/// sides have 16 bytes there (what follows the `n` in `dst` is scratch), or else exactly.
#[inline(always)]
fn copy_short<const KEPT: usize>(dst: &mut [u8; KEPT], at: usize, src: &[u8], n: usize) {
    if n <= 16 && src.len() >= 16 && at + 16 <= dst.len() {
        dst[at..at + 16].copy_from_slice(&src[..16]);
    } else {
        dst[at..at + n].copy_from_slice(&src[..n]);
    }
}

/// Parses a length or count: `-1` or a non-negative decimal that fits 2^40.
fn parse_len(digits: &[u8]) -> Result<i64, RespError> {
    if digits == b"-1" {
        return Ok(-1);
    }
    if digits.is_empty() || digits.len() > 13 {
        return Err(RespError::BadLength);
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(RespError::BadLength);
        }
        n = n * 10 + i64::from(d - b'0');
    }
    if n > 1 << 40 {
        return Err(RespError::BadLength);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message rendered for comparison.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Got {
        bytes: u64,
        kind: char,
        error: bool,
        head: String,
        summary: String,
        elements: u64,
        slot: Option<u16>,
        key: Option<String>,
    }

    fn got(m: &Message<'_>) -> Got {
        Got {
            bytes: m.bytes,
            kind: m.kind as char,
            error: m.error,
            head: String::from_utf8_lossy(m.head).into_owned(),
            summary: String::from_utf8_lossy(m.summary).into_owned(),
            elements: m.elements,
            slot: m.slot,
            key: m.key.map(|k| {
                String::from_utf8_lossy(k).into_owned() + if m.key_cut { "…" } else { "" }
            }),
        }
    }

    #[test]
    fn requests_get_the_slot_of_their_first_key_however_cut() {
        use crate::l7::cluster::key_slot;
        let arg = |a: &str| format!("${}\r\n{a}\r\n", a.len());
        let cmd = |args: &[&str]| {
            let mut out = format!("*{}\r\n", args.len());
            args.iter().for_each(|a| out.push_str(&arg(a)));
            out
        };
        let long_key = format!("{{user1000}}:{}", "x".repeat(300));
        let script = "return redis.call('GET', KEYS[1]) -- ".to_string() + &"-".repeat(200);
        for (request, slot) in [
            (cmd(&["GET", "foo"]), Some(12182)),
            (cmd(&["mget", "bar", "foo"]), Some(5061)),
            (cmd(&["SET", &long_key, "v"]), Some(key_slot(b"user1000"))),
            (cmd(&["PING"]), None),
            (cmd(&["CLUSTER", "KEYSLOT", "foo"]), None),
            (cmd(&["EVALSHA", "abc", "1", "foo", "x"]), Some(12182)),
            (cmd(&["EVALSHA", "abc", "0", "foo"]), None),
            // A script longer than the summary keeps: numkeys is read all the same.
            (cmd(&["EVAL", &script, "1", "foo"]), Some(12182)),
            (cmd(&["EVAL", &script, "1x", "foo"]), None),
            (cmd(&["EVALSHA", "abc", "+1", "foo"]), None),
            (cmd(&["BITOP", "AND", "bar", "foo"]), Some(5061)),
            ("GET foo\r\n".to_string(), Some(12182)),
            ("ping\r\n".to_string(), None),
        ] {
            let got = parse_every_way(Role::Request, request.as_bytes());
            assert_eq!(got.len(), 1, "{request:?}");
            assert_eq!(got[0].slot, slot, "{request:?}");
            // Off (the default), nothing is hashed.
            let mut off = RespParser::new(Role::Request);
            let mut slots = Vec::new();
            off.feed(request.as_bytes(), &mut |m| slots.push(m.slot))
                .unwrap();
            assert_eq!(slots, [None]);
        }
    }

    /// Feeds `input` in the given pieces; all messages and the first error. Replies are
    /// read by a parser with room for their heads only too ([`ReplyParser`], what the
    /// matcher uses): the same.
    fn parse_pieces(role: Role, pieces: &[&[u8]]) -> (Vec<Got>, Option<RespError>) {
        let roomy = parse_pieces_with(RespParser::new(role), pieces);
        if role == Role::Reply {
            let small = parse_pieces_with(ReplyParser::with_room(role), pieces);
            assert_eq!(small, roomy, "a reply parser of {REPLY_KEPT} bytes");
        }
        roomy
    }

    fn parse_pieces_with<const KEPT: usize>(
        mut p: RespParser<KEPT>,
        pieces: &[&[u8]],
    ) -> (Vec<Got>, Option<RespError>) {
        p.key_work(KeyWork {
            slots: true,
            key: true,
        });
        let mut out = Vec::new();
        for piece in pieces {
            if let Err(e) = p.feed(piece, &mut |m| out.push(got(m))) {
                return (out, Some(e));
            }
        }
        (out, None)
    }

    /// Parses `input` whole, one byte at a time, and split at every offset: all the same.
    fn parse_every_way(role: Role, input: &[u8]) -> Vec<Got> {
        let (whole, err) = parse_pieces(role, &[input]);
        assert_eq!(err, None, "whole: {}", String::from_utf8_lossy(input));
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            parse_pieces(role, &bytes),
            (whole.clone(), None),
            "byte by byte"
        );
        for at in 1..input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(
                parse_pieces(role, &[a, b]),
                (whole.clone(), None),
                "split at {at}"
            );
        }
        whole
    }

    const REPLIES: &[(&[u8], char, bool)] = &[
        (b"+OK\r\n", '+', false),
        (b"-ERR unknown command 'foo'\r\n", '-', true),
        (b":1000\r\n", ':', false),
        (b"$5\r\nhello\r\n", '$', false),
        (b"$0\r\n\r\n", '$', false),
        (b"$-1\r\n", '$', false),
        (b"*-1\r\n", '*', false),
        (b"*0\r\n", '*', false),
        (b"*2\r\n$3\r\nfoo\r\n:7\r\n", '*', false),
        (b"*2\r\n*2\r\n+a\r\n+b\r\n*1\r\n$1\r\nc\r\n", '*', false),
        (b"_\r\n", '_', false),
        (b"#t\r\n", '#', false),
        (b",3.14\r\n", ',', false),
        (b",inf\r\n", ',', false),
        (
            b"(3492890328409238509324850943850943825024385\r\n",
            '(',
            false,
        ),
        (b"!21\r\nSYNTAX invalid syntax\r\n", '!', true),
        (b"=15\r\ntxt:Some string\r\n", '=', false),
        (b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", '%', false),
        (b"~3\r\n+a\r\n+b\r\n+c\r\n", '~', false),
        (
            b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n",
            '>',
            false,
        ),
        (
            b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*1\r\n:2039123\r\n",
            '|',
            false,
        ),
        (b"*3\r\n$-1\r\n_\r\n*-1\r\n", '*', false),
    ];

    #[test]
    fn every_reply_type_whole_bytewise_and_split() {
        for (input, kind, error) in REPLIES {
            let got = parse_every_way(Role::Reply, input);
            assert_eq!(got.len(), 1, "{}", String::from_utf8_lossy(input));
            assert_eq!((got[0].kind, got[0].error), (*kind, *error));
            assert_eq!(got[0].bytes, input.len() as u64);
        }
    }

    #[test]
    fn all_replies_back_to_back() {
        let all: Vec<u8> = REPLIES.iter().flat_map(|(r, _, _)| r.to_vec()).collect();
        let got = parse_every_way(Role::Reply, &all);
        assert_eq!(got.len(), REPLIES.len());
        assert_eq!(got.iter().map(|g| g.bytes).sum::<u64>(), all.len() as u64);
    }

    #[test]
    fn reply_head_is_the_first_array_element() {
        let got = parse_every_way(Role::Reply, b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n");
        assert_eq!(got[0].head, "subscribe");
        let got = parse_every_way(Role::Reply, b"+RESET\r\n:5\r\n");
        assert_eq!((got[0].head.as_str(), got[1].head.as_str()), ("RESET", "5"));
    }

    #[test]
    fn requests_multibulk_and_inline() {
        let got = parse_every_way(
            Role::Request,
            b"*3\r\n$3\r\nSET\r\n$3\r\nfoo\r\n$3\r\nbar\r\n",
        );
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].head.as_str(), got[0].summary.as_str()),
            ("SET", "SET foo bar")
        );
        assert_eq!(got[0].elements, 3);
        let got = parse_every_way(Role::Request, b"PING\r\nset  a   b\r\n\r\nGET a\n");
        let summaries: Vec<&str> = got.iter().map(|g| g.summary.as_str()).collect();
        assert_eq!(summaries, ["PING", "set a b", "GET a"]);
        assert_eq!(got[1].elements, 3);
    }

    #[test]
    fn summaries_are_cut_and_big_values_are_not_kept() {
        let value = vec![b'x'; 1 << 20];
        let mut req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n".to_vec();
        req.extend_from_slice(&value);
        req.extend_from_slice(b"\r\n");
        let mut p = RespParser::new(Role::Request);
        let mut out = Vec::new();
        for chunk in req.chunks(1448) {
            p.feed(chunk, &mut |m| out.push(got(m))).unwrap();
            assert!(p.line.capacity() < 4096);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].summary.len(), SUMMARY_BYTES);
        assert!(out[0].summary.starts_with("SET k xxx"));
        assert_eq!(out[0].bytes, req.len() as u64);
    }

    #[test]
    fn a_thousand_pipelined_requests_in_one_buffer() {
        let mut buf = Vec::new();
        for i in 0..1000 {
            let key = format!("key:{i}");
            buf.extend_from_slice(
                format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes(),
            );
        }
        let (got, err) = parse_pieces(Role::Request, &[&buf]);
        assert_eq!(err, None);
        assert_eq!(got.len(), 1000);
        assert_eq!(got[999].summary, "GET key:999");
        // And across arbitrary segment sizes.
        for size in [1, 7, 1448] {
            let pieces: Vec<&[u8]> = buf.chunks(size).collect();
            assert_eq!(parse_pieces(Role::Request, &pieces).0.len(), 1000);
        }
    }

    #[test]
    fn garbage_is_an_error_then_parsing_goes_on_after_reset() {
        for (role, garbage) in [
            (Role::Reply, &b"@@@\r\n"[..]),
            (Role::Reply, b"$abc\r\n"),
            (Role::Reply, b"$3\r\nfoobar\r\n"),
            (Role::Request, b"*2\r\n+not-bulk\r\n"),
            (Role::Reply, b"*99999999999999\r\n"),
        ] {
            let mut p = RespParser::new(role);
            assert!(
                p.feed(garbage, &mut |_| {}).is_err(),
                "{}",
                String::from_utf8_lossy(garbage)
            );
            assert!(!p.in_message());
            let mut n = 0;
            let ok: &[u8] = if role == Role::Reply {
                b"+OK\r\n"
            } else {
                b"*1\r\n$4\r\nPING\r\n"
            };
            p.feed(ok, &mut |_| n += 1).unwrap();
            assert_eq!(n, 1);
        }
    }

    #[test]
    fn endless_lines_and_nesting_are_bounded() {
        let mut p = RespParser::new(Role::Reply);
        let long = vec![b'+'; MAX_LINE + 1];
        assert_eq!(p.feed(&long, &mut |_| {}), Err(RespError::LineTooLong));
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert_eq!(p.feed(&deep, &mut |_| {}), Err(RespError::TooDeep));
    }
}

#[cfg(test)]
mod roundtrip {
    use super::*;
    use proptest::prelude::*;

    /// A RESP value, to be encoded.
    #[derive(Debug, Clone)]
    enum Value {
        Simple(String),
        Error(String),
        Int(i64),
        Bulk(Vec<u8>),
        Null,
        Bool(bool),
        Double(f64),
        Array(Vec<Value>),
        Map(Vec<(Value, Value)>),
        Set(Vec<Value>),
        Push(Vec<Value>),
    }

    fn encode(v: &Value, out: &mut Vec<u8>) {
        let agg = |out: &mut Vec<u8>, t: char, items: &[Value]| {
            out.extend_from_slice(format!("{t}{}\r\n", items.len()).as_bytes());
            items.iter().for_each(|i| encode(i, out));
        };
        match v {
            Value::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Value::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
            Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Value::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Null => out.extend_from_slice(b"_\r\n"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Value::Double(d) => out.extend_from_slice(format!(",{d}\r\n").as_bytes()),
            Value::Array(items) => agg(out, '*', items),
            Value::Set(items) => agg(out, '~', items),
            Value::Push(items) => agg(out, '>', items),
            Value::Map(pairs) => {
                out.extend_from_slice(format!("%{}\r\n", pairs.len()).as_bytes());
                for (k, v) in pairs {
                    encode(k, out);
                    encode(v, out);
                }
            }
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        let line = "[a-zA-Z0-9 :._-]{0,20}";
        let leaf = prop_oneof![
            line.prop_map(Value::Simple),
            line.prop_map(Value::Error),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bulk),
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-1e9f64..1e9).prop_map(Value::Double),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Set),
                proptest::collection::vec(inner.clone(), 1..8).prop_map(Value::Push),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn encoded_values_parse_back_whole_and_split(values in proptest::collection::vec(value(), 1..5), cut in 0usize..4096) {
            let mut wire = Vec::new();
            let mut sizes = Vec::new();
            for v in &values {
                let before = wire.len();
                encode(v, &mut wire);
                sizes.push((wire.len() - before) as u64);
            }
            let cut = cut % (wire.len() + 1);
            let mut parser = RespParser::new(Role::Reply);
            let mut got = Vec::new();
            for piece in [&wire[..cut], &wire[cut..]] {
                parser.feed(piece, &mut |m| got.push((m.bytes, m.error, m.kind))).unwrap();
            }
            prop_assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), sizes);
            for (g, v) in got.iter().zip(&values) {
                prop_assert_eq!(g.1, matches!(v, Value::Error(_)));
            }
            prop_assert!(!parser.in_message());
        }
    }
}
