//! Protocol parsers: pure, no I/O. Each takes the bytes of one direction of a connection,
//! as reassembled, and yields complete messages; "need more" is not an error.

pub mod dns;
pub mod memcached;
pub mod memcached_binary;
pub mod redis;
