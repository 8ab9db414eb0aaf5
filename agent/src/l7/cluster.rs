//! Redis Cluster, pure: the hash slot of a key (CRC16 of the key, or of its `{hash tag}`,
//! modulo 16384: the cluster's rule), which argument of a command is its first key, and the
//! redirect replies (`-MOVED slot host:port`, `-ASK slot host:port`).

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster hashes keys.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// `CRC16_SLICES[k][b]`: the CRC of byte `b` followed by `k` zero bytes, so that eight bytes
/// are taken in one step (slicing-by-8: the CRC is linear in its input).
const CRC16_SLICES: [[u16; 256]; 8] = {
    let mut slices = [[0u16; 256]; 8];
    slices[0] = CRC16_TABLE;
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = slices[k - 1][i];
            slices[k][i] = (prev << 8) ^ CRC16_TABLE[(prev >> 8) as usize];
            i += 1;
        }
        k += 1;
    }
    slices
};

#[inline(always)]
fn crc16_bytewise(crc: u16, bytes: &[u8]) -> u16 {
    bytes.iter().fold(crc, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

#[inline(always)]
fn crc16_update(mut crc: u16, bytes: &[u8]) -> u16 {
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        crc = crc16_eight(crc, c);
    }
    crc16_bytewise(crc, chunks.remainder())
}

/// The CRC after eight more bytes (`c` holds at least eight), in one step.
#[inline(always)]
fn crc16_eight(crc: u16, c: &[u8]) -> u16 {
    let t = &CRC16_SLICES;
    let [hi, lo] = crc.to_be_bytes();
    t[7][usize::from(c[0] ^ hi)]
        ^ t[6][usize::from(c[1] ^ lo)]
        ^ t[5][usize::from(c[2])]
        ^ t[4][usize::from(c[3])]
        ^ t[3][usize::from(c[4])]
        ^ t[2][usize::from(c[5])]
        ^ t[1][usize::from(c[6])]
        ^ t[0][usize::from(c[7])]
}

/// Where a key's hash tag stands, as its bytes stream by.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// No `{` yet.
    #[default]
    Seeking,
    /// After the first `{`: the tag's bytes so far, and how many.
    Open { crc: u16, len: u32 },
    /// The first `}` after the first `{` closed a tag of at least one byte.
    Closed { crc: u16 },
    /// `{}`, or a `{` never closed: the whole key is hashed.
    Whole,
}

/// The hash slot of one key whose bytes come in pieces.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SlotHasher {
    whole: u16,
    tag: Tag,
}

impl SlotHasher {
    /// The next bytes of the key.
    pub fn update(&mut self, bytes: &[u8]) {
        self.whole = crc16_update(self.whole, bytes);
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.tag {
                Tag::Seeking => match rest.iter().position(|&b| b == b'{') {
                    Some(i) => {
                        self.tag = Tag::Open { crc: 0, len: 0 };
                        rest = &rest[i + 1..];
                    }
                    None => return,
                },
                Tag::Open { crc, len } => match rest.iter().position(|&b| b == b'}') {
                    Some(0) if len == 0 => {
                        self.tag = Tag::Whole;
                        return;
                    }
                    Some(i) => {
                        self.tag = Tag::Closed {
                            crc: crc16_update(crc, &rest[..i]),
                        };
                        return;
                    }
                    None => {
                        self.tag = Tag::Open {
                            crc: crc16_update(crc, rest),
                            len: len.saturating_add(rest.len() as u32),
                        };
                        return;
                    }
                },
                Tag::Closed { .. } | Tag::Whole => return,
            }
        }
    }

    /// The key's slot.
    pub fn slot(&self) -> u16 {
        let crc = match self.tag {
            Tag::Closed { crc } => crc,
            _ => self.whole,
        };
        crc % SLOTS
    }
}

/// The hash slot of a whole key. Keys rarely hold a `{`: the whole key's CRC is taken while
/// looking for one, eight bytes at a time; only a key with one is looked at again for its
/// hash tag.
#[inline]
pub fn key_slot(key: &[u8]) -> u16 {
    match crc16_unless_brace(key) {
        Some(crc) => crc % SLOTS,
        None => tagged_slot(key),
    }
}

/// A key with a `{`: its hash tag's slot, or the whole key's when the tag is empty or open.
#[cold]
fn tagged_slot(key: &[u8]) -> u16 {
    let hashed = match memchr::memchr(b'{', key) {
        Some(open) => match memchr::memchr(b'}', &key[open + 1..]) {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_update(0, hashed) % SLOTS
}

/// True when one of the eight bytes of `word` is `{` (the classic zero-byte test on
/// `word ^ '{'…`).
#[inline(always)]
fn has_brace(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const BRACES: u64 = ONES * b'{' as u64;
    let x = word ^ BRACES;
    x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
}

/// The CRC of `bytes` from 0, or `None` when they hold a `{`.
#[inline(always)]
fn crc16_unless_brace(bytes: &[u8]) -> Option<u16> {
    let mut crc = 0u16;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let word = u64::from_le_bytes(c.try_into().unwrap_or_default());
        if has_brace(word) {
            return None;
        }
        crc = crc16_eight(crc, c);
    }
    let rest = chunks.remainder();
    if rest.contains(&b'{') {
        return None;
    }
    Some(crc16_bytewise(crc, rest))
}

/// Which argument of a command holds its first key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAt {
    /// None: the command takes no key (`PING`, `INFO`, `CLUSTER …`), or its key's place is
    /// not fixed (`XREAD … STREAMS key`, `MIGRATE`).
    #[default]
    Nowhere,
    /// Argument `n` (the command is argument 0).
    Arg(u8),
    /// Argument 3 when argument 2 (numkeys) is above 0: `EVAL script numkeys key …`.
    AfterNumkeys,
}

/// Commands that take no key, or whose first key has no fixed place. Every other command's
/// first key is its first argument, but for [`SECOND_ARG`] and [`AFTER_NUMKEYS`].
const NO_KEY: [&[u8]; 56] = [
    b"ACL",
    b"ASKING",
    b"AUTH",
    b"BGREWRITEAOF",
    b"BGSAVE",
    b"CLIENT",
    b"CLUSTER",
    b"COMMAND",
    b"CONFIG",
    b"DBSIZE",
    b"DEBUG",
    b"DISCARD",
    b"ECHO",
    b"EXEC",
    b"FAILOVER",
    b"FLUSHALL",
    b"FLUSHDB",
    b"FUNCTION",
    b"HELLO",
    b"INFO",
    b"KEYS",
    b"LASTSAVE",
    b"LATENCY",
    b"LOLWUT",
    b"MEMORY",
    b"MIGRATE",
    b"MODULE",
    b"MONITOR",
    b"MULTI",
    b"OBJECT",
    b"PING",
    b"PSUBSCRIBE",
    b"PSYNC",
    b"PUBLISH",
    b"PUBSUB",
    b"PUNSUBSCRIBE",
    b"QUIT",
    b"RANDOMKEY",
    b"READONLY",
    b"READWRITE",
    b"REPLCONF",
    b"REPLICAOF",
    b"RESET",
    b"ROLE",
    b"SAVE",
    b"SCAN",
    b"SCRIPT",
    b"SELECT",
    b"SHUTDOWN",
    b"SLAVEOF",
    b"SLOWLOG",
    b"SUBSCRIBE",
    b"SWAPDB",
    b"TIME",
    b"UNSUBSCRIBE",
    b"UNWATCH",
];
/// Commands whose first key is their second argument (`OBJECT ENCODING key`, `BITOP AND
/// dest …`); `OBJECT` and `MEMORY` as a whole are in [`NO_KEY`] but for these forms.
const SECOND_ARG: [&[u8]; 2] = [b"BITOP", b"XINFO"];
/// Commands with `numkeys` before their keys.
const AFTER_NUMKEYS: [&[u8]; 6] = [
    b"EVAL",
    b"EVALSHA",
    b"EVAL_RO",
    b"EVALSHA_RO",
    b"FCALL",
    b"FCALL_RO",
];
/// Commands whose keys follow a keyword: their place varies.
const KEY_AFTER_KEYWORD: [&[u8]; 3] = [b"XREAD", b"XREADGROUP", b"WAIT"];

/// Buckets of the commands that are not [`KeyAt::Arg`]`(1)`, by [`bucket_of`].
const BUCKETS: usize = 128;

/// A command name's bucket: from its length and its first and last letters, any case.
#[inline(always)]
fn bucket_of(command: &[u8]) -> usize {
    let (first, last) = match (command.first(), command.last()) {
        (Some(f), Some(l)) => (f.to_ascii_uppercase(), l.to_ascii_uppercase()),
        _ => return 0,
    };
    (command.len() * 31 + usize::from(first) * 7 + usize::from(last)) % BUCKETS
}

/// Commands and where their first key is, in [`bucket_of`] buckets.
type Exceptions = [Vec<(&'static [u8], KeyAt)>; BUCKETS];

/// The commands that are not [`KeyAt::Arg`]`(1)`, in buckets: a lookup compares one or two
/// names, not every one (this runs for every request).
fn exceptions() -> &'static Exceptions {
    static TABLE: std::sync::OnceLock<Exceptions> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table: Exceptions = std::array::from_fn(|_| Vec::new());
        let all = NO_KEY
            .iter()
            .chain(&KEY_AFTER_KEYWORD)
            .map(|c| (*c, KeyAt::Nowhere))
            .chain(SECOND_ARG.iter().map(|c| (*c, KeyAt::Arg(2))))
            .chain(AFTER_NUMKEYS.iter().map(|c| (*c, KeyAt::AfterNumkeys)));
        for (name, at) in all {
            table[bucket_of(name)].push((name, at));
        }
        table
    })
}

/// The last two commands looked up (names of at most 8 bytes, as sent) and where their keys
/// are: consecutive requests mostly repeat a few commands, so most lookups are a compare.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyAtCache {
    entries: [(u64, usize, KeyAt); 2],
    next: usize,
}

impl KeyAtCache {
    /// [`key_at`] of `command`.
    #[inline(always)]
    pub fn key_at(&mut self, command: &[u8]) -> KeyAt {
        if command.is_empty() || command.len() > 8 {
            return key_at(command);
        }
        let mut bytes = [0u8; 8];
        bytes[..command.len()].copy_from_slice(command);
        let (word, len) = (u64::from_le_bytes(bytes), command.len());
        if let Some(&(_, _, at)) = self.entries.iter().find(|e| e.0 == word && e.1 == len) {
            return at;
        }
        let at = key_at(command);
        self.entries[self.next] = (word, len, at);
        self.next ^= 1;
        at
    }
}

/// Where the first key of `command` (any case) is.
#[inline]
pub fn key_at(command: &[u8]) -> KeyAt {
    exceptions()[bucket_of(command)]
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(command))
        .map_or(KeyAt::Arg(1), |&(_, at)| at)
}

impl KeyAt {
    /// True when argument `i` is the key.
    #[inline(always)]
    pub fn is_arg(self, i: usize) -> bool {
        matches!(self, KeyAt::Arg(n) if usize::from(n) == i)
    }
}

/// Commands whose every argument is a key (`MGET k1 k2`), and those of key and value pairs
/// (`MSET k1 v1 k2 v2`).
const ALL_KEYS: [&[u8]; 10] = [
    b"MGET", b"DEL", b"UNLINK", b"EXISTS", b"TOUCH", b"WATCH", b"SINTER", b"SUNION", b"SDIFF",
    b"PFCOUNT",
];
const KEY_VALUE_PAIRS: [&[u8]; 3] = [b"MSET", b"MSETNX", b"MSETEX"];

/// The keys a request of `command` with `elements` arguments (the command included) names,
/// when it has a first key: its fan-out (1 for a single-key command).
pub fn keys_of(command: &[u8], elements: u64) -> u32 {
    let is = |list: &[&[u8]]| list.iter().any(|c| c.eq_ignore_ascii_case(command));
    let n = if is(&ALL_KEYS) {
        elements.saturating_sub(1)
    } else if is(&KEY_VALUE_PAIRS) {
        elements.saturating_sub(1) / 2
    } else {
        1
    };
    n.clamp(1, u64::from(u32::MAX)) as u32
}

/// A cluster redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// `-MOVED slot host:port`: the slot lives on another node.
    Moved,
    /// `-ASK slot host:port`: the slot is migrating; this key is asked of the other node.
    Ask,
}

/// The redirect an error reply's first bytes (without the `-`) say, with its slot when the
/// bytes hold it.
pub fn redirect_of(head: &[u8]) -> Option<(Redirect, Option<u16>)> {
    let (kind, rest) = if let Some(rest) = head.strip_prefix(b"MOVED ") {
        (Redirect::Moved, rest)
    } else if let Some(rest) = head.strip_prefix(b"ASK ") {
        (Redirect::Ask, rest)
    } else {
        return None;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let whole = digits > 0 && rest.get(digits) == Some(&b' ');
    let slot = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|&s| whole && s < SLOTS);
    Some((kind, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem_and_slots_follow_redis() {
        assert_eq!(crc16_update(0, b"123456789"), 0x31c3);
        // CLUSTER KEYSLOT, as Redis answers it.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"foo{}{bar}"),
            crc16_update(0, b"foo{}{bar}") % SLOTS
        );
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(
            key_slot(b"{never closed"),
            crc16_update(0, b"{never closed") % SLOTS
        );
    }

    #[test]
    fn the_cache_answers_as_the_table() {
        let mut cache = KeyAtCache::default();
        let names: [&[u8]; 10] = [
            b"GET",
            b"get",
            b"PING",
            b"ping",
            b"EVALSHA",
            b"Set",
            b"BITOP",
            b"x",
            b"CLUSTERS",
            b"CLUSTER",
        ];
        for _ in 0..3 {
            for name in names {
                assert_eq!(
                    cache.key_at(name),
                    key_at(name),
                    "{}",
                    String::from_utf8_lossy(name)
                );
            }
        }
        // Braces anywhere, in keys of every length: the fast path hands them to the slow one.
        for len in 0..40 {
            for at in 0..len {
                let mut key = vec![b'k'; len];
                key[at] = b'{';
                if at + 2 < len {
                    key[at + 2] = b'}';
                }
                let mut h = SlotHasher::default();
                h.update(&key);
                assert_eq!(
                    key_slot(&key),
                    h.slot(),
                    "{}",
                    String::from_utf8_lossy(&key)
                );
            }
        }
    }

    #[test]
    fn slicing_by_8_is_the_bytewise_crc() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7919 % 251) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(
                crc16_update(0, &data[..len]),
                crc16_bytewise(0, &data[..len]),
                "{len}"
            );
            assert_eq!(
                crc16_update(0x1234, &data[..len]),
                crc16_bytewise(0x1234, &data[..len])
            );
        }
    }

    #[test]
    fn a_key_split_anywhere_hashes_the_same() {
        for key in [
            &b"user:1000:cart"[..],
            b"{user1000}.following",
            b"foo{}{bar}",
            b"a{b}c{d}",
            b"{",
            b"}{x}",
            b"",
        ] {
            let whole = key_slot(key);
            for cut in 0..=key.len() {
                let mut h = SlotHasher::default();
                h.update(&key[..cut]);
                h.update(&key[cut..]);
                assert_eq!(
                    h.slot(),
                    whole,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(key)
                );
            }
        }
    }

    #[test]
    fn first_keys_and_redirects() {
        assert_eq!(key_at(b"get"), KeyAt::Arg(1));
        assert_eq!(key_at(b"MGET"), KeyAt::Arg(1));
        assert_eq!(key_at(b"ping"), KeyAt::Nowhere);
        assert_eq!(key_at(b"EVALSHA"), KeyAt::AfterNumkeys);
        assert_eq!(key_at(b"bitop"), KeyAt::Arg(2));
        for name in NO_KEY.iter().chain(&KEY_AFTER_KEYWORD) {
            assert_eq!(
                key_at(name),
                KeyAt::Nowhere,
                "{}",
                String::from_utf8_lossy(name)
            );
            assert_eq!(key_at(&name.to_ascii_lowercase()), KeyAt::Nowhere);
        }
        let longest = exceptions().iter().map(Vec::len).max();
        assert!(longest <= Some(4), "buckets of {longest:?} names");
        assert_eq!(
            redirect_of(b"MOVED 3999 127.0.0.1:6381"),
            Some((Redirect::Moved, Some(3999)))
        );
        assert_eq!(
            redirect_of(b"ASK 3999 127.0.0.1:6381"),
            Some((Redirect::Ask, Some(3999)))
        );
        // Cut short by the kept head: the kind is known, the slot only when whole.
        assert_eq!(redirect_of(b"MOVED 39"), Some((Redirect::Moved, None)));
        assert_eq!(redirect_of(b"MOVED 99999 x"), Some((Redirect::Moved, None)));
        assert_eq!(redirect_of(b"ERR unknown command"), None);
    }
}
