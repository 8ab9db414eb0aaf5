//! Protocol parsers: pure, no I/O. Each takes the bytes of one direction of a connection,
//! as reassembled, and yields complete messages; "need more" is not an error. Every TCP
//! parser is a [`StreamParser`].

pub mod cluster;
pub mod dns;
pub mod memcached;
pub mod memcached_binary;
pub mod redis;
pub mod templates;

/// A parser of one direction of a TCP stream: bytes go in however the stream was cut, each
/// complete message comes out once; a message split across calls is kept (bounded) until it
/// is whole. Invalid bytes are an error, after which the caller resets the parser.
pub trait StreamParser {
    /// A parsed message, handed to the caller's callback.
    type Message<'a>: ?Sized;
    /// Why the bytes are not the protocol.
    type Error;
    /// Consumes `data`, calling `on_message` with each message completed in it.
    fn feed(
        &mut self,
        data: &[u8],
        on_message: &mut impl FnMut(&Self::Message<'_>),
    ) -> Result<(), Self::Error>;
    /// True when part of a message has been read.
    fn in_message(&self) -> bool;
    /// Back to a message boundary: a message partly read is forgotten.
    fn reset(&mut self);
}

/// Implements [`StreamParser`] with a parser's own methods of the same names.
macro_rules! stream_parser {
    ($parser:ty, $message:ty, $error:ty) => {
        impl StreamParser for $parser {
            type Message<'a> = $message;
            type Error = $error;
            fn feed(
                &mut self,
                data: &[u8],
                on_message: &mut impl FnMut(&Self::Message<'_>),
            ) -> Result<(), Self::Error> {
                <$parser>::feed(self, data, on_message)
            }
            fn in_message(&self) -> bool {
                <$parser>::in_message(self)
            }
            fn reset(&mut self) {
                <$parser>::reset(self)
            }
        }
    };
}

stream_parser!(redis::RespParser, redis::Message<'a>, redis::RespError);
stream_parser!(
    memcached::McParser,
    memcached::Message<'a>,
    memcached::McError
);
stream_parser!(
    memcached_binary::BinaryParser,
    memcached_binary::Packet<'a>,
    memcached_binary::BinaryError
);

impl StreamParser for dns::DnsTcpFramer {
    type Message<'a> = [u8];
    type Error = std::convert::Infallible;
    fn feed(&mut self, data: &[u8], on_message: &mut impl FnMut(&[u8])) -> Result<(), Self::Error> {
        dns::DnsTcpFramer::feed(self, data, on_message);
        Ok(())
    }
    fn in_message(&self) -> bool {
        dns::DnsTcpFramer::in_message(self)
    }
    fn reset(&mut self) {
        dns::DnsTcpFramer::reset(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages of `bytes` fed whole, one byte at a time, and split at every offset: the
    /// same count each way, and the parser at a boundary after each.
    fn count_every_way<P: StreamParser>(new: impl Fn() -> P, bytes: &[u8]) -> usize {
        let count = |pieces: &[&[u8]]| {
            let mut parser = new();
            let mut n = 0;
            for piece in pieces {
                assert!(parser.feed(piece, &mut |_| n += 1).is_ok());
            }
            assert!(!parser.in_message());
            n
        };
        let whole = count(&[bytes]);
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(count(&bytewise), whole);
        for at in 1..bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(count(&[a, b]), whole, "split at {at}");
        }
        whole
    }

    #[test]
    fn every_tcp_parser_yields_the_same_messages_however_cut() {
        use redis::{RespParser, Role};
        let requests = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n";
        assert_eq!(
            count_every_way(|| RespParser::new(Role::Request), requests),
            3
        );
        let replies = b"+OK\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n";
        assert_eq!(count_every_way(|| RespParser::new(Role::Reply), replies), 3);
        let mc = b"get a b\r\nset k 0 0 3\r\nabc\r\ndelete k noreply\r\n";
        let text = || memcached::McParser::new(memcached::Role::Request);
        assert_eq!(count_every_way(text, mc), 3);
        let mut dns_stream = Vec::new();
        for m in [
            dns::tests::message(1, 0x0100, "a.test", 1),
            dns::tests::message(2, 0x0100, "b.test", 28),
        ] {
            dns_stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
            dns_stream.extend_from_slice(&m);
        }
        assert_eq!(count_every_way(dns::DnsTcpFramer::default, &dns_stream), 2);
        // A binary-protocol GET of key "k": a 24-byte header, then the key.
        let mut get = vec![0x80, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7];
        get.extend_from_slice(&[0; 8]);
        get.push(b'k');
        let two = [get.clone(), get].concat();
        let binary = || memcached_binary::BinaryParser::new(true);
        assert_eq!(count_every_way(binary, &two), 2);
    }
}
