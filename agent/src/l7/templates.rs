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

impl KeyRules {}

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

/// Writes `key` with its ids folded into `out`: one pass over words (runs of letters and
/// digits), copying the bytes between them and the words without digits whole.
fn fold_ids(key: &[u8], out: &mut Vec<u8>) {
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
