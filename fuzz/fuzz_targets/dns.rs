//! DNS messages: a parse result or an error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = tcpkit::l7::dns::parse(data) {
        if let Some((_, name)) = m.question {
            assert!(!name.is_empty());
        }
    }
});
