//! Key templates, pure: a key folded into the shape it shares with its kind (`user:1234:cart`
//! → `user:{id}:cart`), so that hot keys show as the few shapes a workload has rather than as
//! millions of keys. Runs of digits, hexadecimal ids (8 hex digits or more, a digit among
//! them) and UUIDs become `{id}`; a user's rules (`session:*`, globs with `*` and `?`) come
//! first and name the template themselves.

/// Bytes of a key folded; the rest of a longer key is left out (the template ends in `…`).
pub const KEY_BYTES: usize = 64;

/// The placeholder of an id.
const ID: &[u8] = b"{id}";

/// Bytes of a template at most (a user's rule may be longer: it is cut).
pub const TEMPLATE_BYTES: usize = 96;

/// The user's rules: a key that matches one has that rule as its template.
#[derive(Debug, Clone, Default)]
pub struct KeyRules {
    globs: Vec<Vec<u8>>,
    /// DNS zones (`example.com.`): names below one fold into `*.example.com.`.
    zones: Vec<Vec<u8>>,
    /// Templates tracked per port; the rest count under `{other}`.
    pub max_templates: usize,
}

impl KeyRules {
    /// Rules from globs (`session:*`); checked in order, the first match wins.
    pub fn new(globs: &[String]) -> Self {
        Self {
            globs: globs.iter().map(|g| g.as_bytes().to_vec()).collect(),
            zones: Vec::new(),
            max_templates: 256,
        }
    }

    /// With DNS zones: a name below one (any case) has the template `*.zone.`.
    pub fn with_zones(mut self, zones: &[String]) -> Self {
        self.zones = zones
            .iter()
            .map(|z| {
                let z = z.trim_start_matches('.').trim_end_matches('.');
                format!("{z}.").to_ascii_lowercase().into_bytes()
            })
            .collect();
        self
    }

    /// The template of a DNS name (`host12.svc.example.com.`): `*.` and the zone it is
    /// below, the zone itself, or the name with its ids folded.
    pub fn fold_name(&self, name: &[u8], out: &mut Vec<u8>) {
        let below = |zone: &[u8]| {
            name.len() > zone.len()
                && name[name.len() - zone.len() - 1] == b'.'
                && name[name.len() - zone.len()..].eq_ignore_ascii_case(zone)
        };
        if let Some(zone) = self.zones.iter().find(|z| name.eq_ignore_ascii_case(z)) {
            out.extend_from_slice(zone);
        } else if let Some(zone) = self.zones.iter().find(|z| below(z)) {
            out.extend_from_slice(b"*.");
            out.extend_from_slice(zone);
        } else {
            fold_ids(name, out);
        }
        out.truncate(TEMPLATE_BYTES);
    }

    /// The template of `key` (its first [`KEY_BYTES`] bytes, `cut` when it was longer),
    /// added to `out`: at most [`TEMPLATE_BYTES`].
    pub fn fold(&self, key: &[u8], cut: bool, out: &mut Vec<u8>) {
        let start = out.len();
        if let Some(rule) = self.globs.iter().find(|g| glob_matches(g, key, cut)) {
            out.extend_from_slice(rule);
        } else {
            fold_ids(key, out);
            if cut {
                out.extend_from_slice("…".as_bytes());
            }
        }
        out.truncate(start + TEMPLATE_BYTES);
    }
}

impl KeyRules {
    /// Calls `f` with the template of `key` (as [`KeyRules::fold`]), folded into a buffer
    /// the thread reuses: for a protocol that folds at pairing time.
    pub fn with_template<R>(&self, key: &[u8], cut: bool, f: impl FnOnce(&[u8]) -> R) -> R {
        scratch(|out| self.fold(key, cut, out), f)
    }

    /// Calls `f` with the template of a DNS name (as [`KeyRules::fold_name`]).
    pub fn with_name_template<R>(&self, name: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
        scratch(|out| self.fold_name(name, out), f)
    }
}

/// Runs `fill` on a buffer the thread reuses, then `f` on what it holds.
fn scratch<R>(fill: impl FnOnce(&mut Vec<u8>), f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        fill(&mut scratch);
        f(&scratch)
    })
}

/// A memcached text request's first key, from its `summary` (command and arguments as sent:
/// keys hold no spaces), and whether it was cut with the summary: the word after the
/// command, or after `gat`'s exptime; none for the commands without keys (`stats`,
/// `version`, `flush_all`, `verbosity`, `mn`, …).
pub fn memcached_key(summary: &[u8], summary_cut: bool) -> Option<(&[u8], bool)> {
    let mut words = summary.split(|&b| b == b' ');
    let at = match words.next()? {
        b"gat" | b"gats" => 1,
        b"get" | b"gets" | b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas"
        | b"delete" | b"incr" | b"decr" | b"touch" | b"mg" | b"ms" | b"md" | b"ma" | b"me" => 0,
        _ => return None,
    };
    let key = words.nth(at)?;
    let last = key.as_ptr_range().end == summary.as_ptr_range().end;
    (!key.is_empty()).then_some((key, summary_cut && last))
}

/// True when `glob` (`*` any run, `?` any byte) matches `key`; a key cut short matches when
/// what is known of it can start a match of a glob that ends in `*`.
fn glob_matches(glob: &[u8], key: &[u8], cut: bool) -> bool {
    // The classic backtracking match, on bytes.
    let (mut g, mut k) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while k < key.len() {
        match glob.get(g) {
            Some(b'*') => {
                star = Some(g);
                mark = k;
                g += 1;
            }
            Some(&c) if c == b'?' || c == key[k] => {
                g += 1;
                k += 1;
            }
            _ => match star {
                Some(s) => {
                    g = s + 1;
                    mark += 1;
                    k = mark;
                }
                None => return false,
            },
        }
    }
    let rest = &glob[g.min(glob.len())..];
    rest.iter().all(|&c| c == b'*') && (!cut || glob.ends_with(b"*"))
}

/// Byte classes for [`fold_ids`]: letters and digits make words.
const WORD: u8 = 1;
const DIGIT: u8 = 2;
const HEX: u8 = 4;
static CLASSES: [u8; 256] = {
    let mut classes = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        classes[b] = if c.is_ascii_digit() {
            WORD | DIGIT | HEX
        } else if c.is_ascii_hexdigit() {
            WORD | HEX
        } else if c.is_ascii_alphabetic() {
            WORD
        } else {
            0
        };
        b += 1;
    }
    classes
};

/// Writes `key` with its ids folded into `out`, in one pass: the bytes between words (runs
/// of letters and digits) and the words without digits are copied; a UUID is `{id}`, so is a
/// hex word of 8 or more with a digit; in any other word each run of digits is.
///
/// The word by word fold, for the few keys with a hex id, is a function of its own: this one
/// stays small.
fn fold_ids(key: &[u8], out: &mut Vec<u8>) {
    // Most keys of a hot template hold an id; those that do not are their own template (a
    // UUID without a digit among its 32 hex digits stays too: one in 10^13).
    if !has_digit(key) {
        out.extend_from_slice(key);
        return;
    }
    out.reserve(key.len() + ID.len());
    if !fold_digits_unless_hex_id(key, out) {
        fold_words(key, out);
    }
}

/// [`fold_ids`] word by word, for a key that holds a run of 8 hex digits.
#[inline(never)]
fn fold_words(key: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < key.len() {
        if CLASSES[usize::from(key[i])] & WORD == 0 {
            out.push(key[i]);
            i += 1;
            continue;
        }
        let start = i;
        let mut all = WORD | DIGIT | HEX;
        let mut any = 0;
        while let Some(&b) = key.get(i) {
            let class = CLASSES[usize::from(b)];
            if class == 0 {
                break;
            }
            all &= class;
            any |= class;
            i += 1;
        }
        let word = &key[start..i];
        let hex = all & HEX != 0;
        // A UUID's first group is a hex word of 8 before a `-`.
        if hex && word.len() == 8 && key.get(i) == Some(&b'-') {
            if let Some(len) = uuid_at(&key[start..]) {
                out.extend_from_slice(ID);
                i = start + len;
                continue;
            }
        }
        if any & DIGIT == 0 {
            out.extend_from_slice(word);
        } else if hex && word.len() >= 8 {
            out.extend_from_slice(ID);
        } else {
            fold_digit_runs(word, out);
        }
    }
}

/// The fold of most keys, byte by byte: with no run of 8 hex digits (so no hex id, no UUID),
/// [`fold_ids`] makes each run of digits `{id}` and keeps every other byte. False, with
/// `out` as it was, at the first such run: the word by word fold decides.
#[inline]
fn fold_digits_unless_hex_id(key: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let (mut hex_run, mut in_digits) = (0, false);
    for &b in key {
        let class = CLASSES[usize::from(b)];
        hex_run = if class & HEX != 0 { hex_run + 1 } else { 0 };
        if hex_run == 8 {
            out.truncate(start);
            return false;
        }
        if class & DIGIT == 0 {
            out.push(b);
            in_digits = false;
        } else if !in_digits {
            out.extend_from_slice(ID);
            in_digits = true;
        }
    }
    true
}

/// True when `bytes` hold an ASCII digit: eight bytes at once (Bit Twiddling Hacks' "has a
/// byte between m and n", bytes from 0x80 up never in it), then the rest one by one.
#[inline]
fn has_digit(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut chunks = bytes.chunks_exact(8);
    let any = chunks.any(|c| {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        let x = u64::from_le_bytes(word);
        let low = x & (ONES * 0x7f);
        // Between b'0' - 1 and b'9' + 1.
        (ONES * (127 + 0x3a) - low) & !x & (low + ONES * (127 - 0x2f)) & (ONES * 0x80) != 0
    });
    any || chunks.remainder().iter().any(u8::is_ascii_digit)
}

/// A word's runs of digits each become `{id}`; its letters stay.
fn fold_digit_runs(word: &[u8], out: &mut Vec<u8>) {
    let mut in_run = false;
    for &b in word {
        if b.is_ascii_digit() {
            if !in_run {
                out.extend_from_slice(ID);
            }
            in_run = true;
        } else {
            out.push(b);
            in_run = false;
        }
    }
}

/// The length of a UUID (`8-4-4-4-12` hex digits) starting `bytes`, if one does.
fn uuid_at(bytes: &[u8]) -> Option<usize> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let mut at = 0;
    for (n, &len) in GROUPS.iter().enumerate() {
        if n > 0 {
            if bytes.get(at) != Some(&b'-') {
                return None;
            }
            at += 1;
        }
        let group = bytes.get(at..at + len)?;
        if !group.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        at += len;
    }
    // Not the start of a longer hex run.
    (!bytes.get(at).is_some_and(u8::is_ascii_alphanumeric)).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition [`fold_ids`] keeps: word by word, each word looked at apart (the
    /// implementation before the one pass).
    fn fold_ids_by_words(key: &[u8], out: &mut Vec<u8>) {
        // Most keys of a hot template hold an id; those that do not are their own template (a
        // UUID without a digit among its 32 hex digits stays too: one in 10^13).
        if !key.iter().any(u8::is_ascii_digit) {
            out.extend_from_slice(key);
            return;
        }
        let mut i = 0;
        while i < key.len() {
            // The bytes up to the next word.
            let gap = key[i..]
                .iter()
                .position(u8::is_ascii_alphanumeric)
                .unwrap_or(key.len() - i);
            out.extend_from_slice(&key[i..i + gap]);
            i += gap;
            if i == key.len() {
                break;
            }
            if key[i].is_ascii_hexdigit() {
                if let Some(len) = uuid_at(&key[i..]) {
                    out.extend_from_slice(ID);
                    i += len;
                    continue;
                }
            }
            let word = key[i..]
                .iter()
                .position(|b| !b.is_ascii_alphanumeric())
                .unwrap_or(key.len() - i);
            fold_word(&key[i..i + word], out);
            i += word;
        }
    }

    /// A word (letters and digits): a hex id of 8 or more with a digit is `{id}` whole; else
    /// each run of digits is.
    fn fold_word(word: &[u8], out: &mut Vec<u8>) {
        let (mut digits, mut hex) = (false, true);
        for b in word {
            digits |= b.is_ascii_digit();
            hex &= b.is_ascii_hexdigit();
        }
        if !digits {
            out.extend_from_slice(word);
            return;
        }
        if hex && word.len() >= 8 {
            out.extend_from_slice(ID);
            return;
        }
        let mut i = 0;
        while i < word.len() {
            let letters = word[i..]
                .iter()
                .position(u8::is_ascii_digit)
                .unwrap_or(word.len() - i);
            out.extend_from_slice(&word[i..i + letters]);
            i += letters;
            if i < word.len() {
                let run = word[i..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .unwrap_or(word.len() - i);
                out.extend_from_slice(ID);
                i += run;
            }
        }
    }

    #[test]
    fn has_digit_finds_every_digit_wherever_it_is() {
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    // Every byte at every place, among bytes on both sides of the digits.
                    let mut bytes: Vec<u8> =
                        (0..len).map(|i| [b'/', b':', 0xb0, 0xb9][i % 4]).collect();
                    bytes[at] = b;
                    assert_eq!(has_digit(&bytes), b.is_ascii_digit(), "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn the_one_pass_folds_as_word_by_word_does() {
        // Keys from an alphabet that makes every case: digits, hex and other letters, UUID
        // dashes, separators, braces; every key of up to 4 bytes, then random longer ones.
        let alphabet = b"09afAFgz-:{}.";
        let check = |key: &[u8]| {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            fold_ids(key, &mut fast);
            fold_ids_by_words(key, &mut slow);
            assert_eq!(fast, slow, "{}", String::from_utf8_lossy(key));
        };
        // Ids of every kind, where the byte by byte fold hands over to the word by word one or not.
        for key in [
            &b"user:12345678"[..],
            b"user:123456789:cart",
            b"12345678abc",
            b"abc12345678",
            b"g12345678abcd",
            b"x12345678-1",
            b"12345678-1234-1234-1234-123456789abc",
            b"12345678-1234-1234-1234-123456789012",
            b"ts:1700000000123-7",
            b"a1b2c3d4",
            b"a1b2c3d",
            b"k:1234567",
        ] {
            check(key);
        }
        // The keys whose fold is longest (a digit alone becomes {id}), at the length kept and past.
        for shape in [&b"0-"[..], b"0g", b"-0", b"g0"] {
            for len in [KEY_BYTES - 1, KEY_BYTES, KEY_BYTES + 1, 4 * KEY_BYTES] {
                check(&shape.iter().copied().cycle().take(len).collect::<Vec<u8>>());
            }
        }
        let mut key = Vec::new();
        for len in 0..=4u32 {
            for n in 0..alphabet.len().pow(len) {
                key.clear();
                let mut n = n;
                for _ in 0..len {
                    key.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                check(&key);
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let uuid = b"550e8400-e29b-41d4-a716-446655440000";
        for _ in 0..100_000 {
            key.clear();
            let len = 5 + next() % 60;
            while (key.len() as u64) < len {
                match next() % 20 {
                    0 => key.extend_from_slice(uuid),
                    1 => key.extend_from_slice(&uuid[..13]),
                    _ => key.push(alphabet[(next() % alphabet.len() as u64) as usize]),
                }
            }
            check(&key);
        }
    }

    fn fold(rules: &KeyRules, key: &str) -> String {
        let mut out = Vec::new();
        rules.fold(key.as_bytes(), false, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ids_fold_and_words_stay() {
        let none = KeyRules::default();
        for (key, template) in [
            ("user:1234:cart", "user:{id}:cart"),
            ("user1234", "user{id}"),
            ("key:000000012345", "key:{id}"),
            ("session:9f86d081884c7d65", "session:{id}"),
            (
                "obj:550e8400-e29b-41d4-a716-446655440000:meta",
                "obj:{id}:meta",
            ),
            ("obj/550E8400-E29B-41D4-A716-446655440000", "obj/{id}"),
            ("cafe:deadbeef", "cafe:deadbeef"), // hex letters only: words
            ("v2.config", "v{id}.config"),
            ("{user1000}.following", "{user{id}}.following"),
            ("plain", "plain"),
            ("", ""),
        ] {
            assert_eq!(fold(&none, key), template, "{key}");
        }
    }

    #[test]
    fn rules_come_first_and_name_the_template() {
        let rules = KeyRules::new(&["session:*".into(), "cache:?:*".into()]);
        assert_eq!(fold(&rules, "session:9f86d081884c7d65"), "session:*");
        assert_eq!(fold(&rules, "cache:a:x1"), "cache:?:*");
        assert_eq!(fold(&rules, "cache:ab:x1"), "cache:ab:x{id}");
        assert_eq!(fold(&rules, "sessions"), "sessions");
        // A key cut short: folded as far as it goes, marked.
        let mut out = Vec::new();
        rules.fold(b"session:12", true, &mut out);
        assert_eq!(out, b"session:*");
        out.clear();
        KeyRules::default().fold(b"user:12", true, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "user:{id}…");
    }

    #[test]
    fn memcached_keys_are_found_where_each_command_has_them() {
        for (summary, key) in [
            ("get a b c", Some("a")),
            ("gat 100 k1 k2", Some("k1")),
            ("mg user:1 v f", Some("user:1")),
            ("set k 0 0 3", Some("k")),
            ("stats items", None),
            ("version", None),
            ("flush_all 0", None),
            ("get", None),
        ] {
            let got = memcached_key(summary.as_bytes(), false).map(|(k, _)| k);
            assert_eq!(got, key.map(str::as_bytes), "{summary}");
        }
        assert_eq!(memcached_key(b"get abc", true), Some((&b"abc"[..], true)));
        assert_eq!(
            memcached_key(b"get abc de", true),
            Some((&b"abc"[..], false))
        );
    }

    #[test]
    fn dns_names_fold_below_their_zone() {
        let rules = KeyRules::default().with_zones(&["example.test".into(), ".Svc.Local.".into()]);
        let fold = |name: &str| {
            let mut out = Vec::new();
            rules.fold_name(name.as_bytes(), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(fold("host12.example.test."), "*.example.test.");
        assert_eq!(fold("a.b.EXAMPLE.test."), "*.example.test.");
        assert_eq!(fold("example.test."), "example.test.");
        assert_eq!(fold("api.svc.local."), "*.svc.local.");
        assert_eq!(fold("notexample.test."), "notexample.test.");
        assert_eq!(fold("node42.other.org."), "node{id}.other.org.");
    }

    #[test]
    fn globs_match_as_globs() {
        for (glob, key, matches) in [
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*:*:x", "u:1:x", true),
        ] {
            assert_eq!(
                glob_matches(glob.as_bytes(), key.as_bytes(), false),
                matches,
                "{glob} {key}"
            );
        }
    }
}
