//! Memcached text/meta and binary parsers, both directions, fed whole and split at a point the
//! input chooses: no panic, no unbounded state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpkit::l7::memcached::{McParser, Role};
use tcpkit::l7::memcached_binary::BinaryParser;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split) % (rest.len() + 1);
    let pieces = [&rest[..cut], &rest[cut..]];
    for role in [Role::Request, Role::Reply] {
        let mut parser = McParser::new(role);
        for piece in pieces {
            if parser
                .feed(piece, &mut |m| assert!(m.bytes as usize <= rest.len()))
                .is_err()
            {
                parser.reset();
            }
        }
    }
    for request in [true, false] {
        let mut parser = BinaryParser::new(request);
        for piece in pieces {
            if parser
                .feed(piece, &mut |p| assert!(p.key.len() <= 96))
                .is_err()
            {
                parser.reset();
            }
        }
    }
});
