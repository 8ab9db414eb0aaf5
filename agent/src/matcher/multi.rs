//! A connection of an agent watching ports of different protocols (`-p 6379:redis,…`): the
//! protocol is chosen by the server port at the connection's first event.

use super::dns::DnsTcpPairing;
use super::duplex::{InvalidBytes, Protocol};
use super::{ExchangeSink, MatchContext, MemcachedPairing, RedisPairing, Unanswered};
use crate::modes::{Mode, PortModes};
use crate::steps::flow::{Direction, FlowKey};

/// One of the protocols, chosen per connection.
#[derive(Debug, Default)]
pub enum MultiPairing {
    /// Nothing delivered yet.
    #[default]
    Unset,
    /// A raw-mode port.
    Raw,
    /// A Redis port.
    Redis(Box<RedisPairing>),
    /// A memcached port.
    Memcached(Box<MemcachedPairing>),
    /// A DNS port (over TCP; its UDP datagrams go to the pipeline's DNS matcher).
    Dns(Box<DnsTcpPairing>),
}

impl Protocol for MultiPairing {
    fn prepare(&mut self, server_port: u16, modes: &PortModes) {
        if matches!(self, Self::Unset) {
            *self = match modes.of(server_port) {
                Mode::Redis => Self::Redis(Box::default()),
                Mode::Memcached => Self::Memcached(Box::default()),
                Mode::Dns => Self::Dns(Box::default()),
                Mode::Raw => Self::Raw,
            };
        }
    }
    fn on_bytes<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        dir: Direction,
        ts_us: u64,
        bytes: &[u8],
        cx: &mut MatchContext<'_, S>,
    ) -> Result<(), InvalidBytes> {
        match self {
            Self::Redis(p) => p.on_bytes(key, dir, ts_us, bytes, cx),
            Self::Memcached(p) => p.on_bytes(key, dir, ts_us, bytes, cx),
            Self::Dns(p) => p.on_bytes(key, dir, ts_us, bytes, cx),
            Self::Unset | Self::Raw => Ok(()),
        }
    }
    fn starts_message(&self, dir: Direction, bytes: &[u8]) -> bool {
        match self {
            Self::Redis(p) => p.starts_message(dir, bytes),
            Self::Memcached(p) => p.starts_message(dir, bytes),
            Self::Dns(p) => p.starts_message(dir, bytes),
            Self::Unset | Self::Raw => true,
        }
    }
    fn in_message(&self, dir: Direction) -> bool {
        match self {
            Self::Redis(p) => p.in_message(dir),
            Self::Memcached(p) => p.in_message(dir),
            Self::Dns(p) => p.in_message(dir),
            Self::Unset | Self::Raw => false,
        }
    }
    fn reset<S: ExchangeSink>(
        &mut self,
        key: &FlowKey,
        why: Unanswered,
        cx: &mut MatchContext<'_, S>,
    ) {
        match self {
            Self::Redis(p) => p.reset(key, why, cx),
            Self::Memcached(p) => p.reset(key, why, cx),
            Self::Dns(p) => p.reset(key, why, cx),
            Self::Unset | Self::Raw => {}
        }
    }
    fn on_close<S: ExchangeSink>(&mut self, key: &FlowKey, cx: &mut MatchContext<'_, S>) {
        match self {
            Self::Redis(p) => p.on_close(key, cx),
            Self::Memcached(p) => p.on_close(key, cx),
            Self::Dns(p) => p.on_close(key, cx),
            Self::Unset | Self::Raw => {}
        }
    }
    fn shrink(&mut self) {
        match self {
            Self::Redis(p) => p.shrink(),
            Self::Memcached(p) => p.shrink(),
            Self::Dns(p) => p.shrink(),
            Self::Unset | Self::Raw => {}
        }
    }

    fn at_rest(&self) -> bool {
        match self {
            Self::Redis(p) => p.at_rest(),
            Self::Memcached(p) => p.at_rest(),
            Self::Dns(p) => p.at_rest(),
            Self::Unset | Self::Raw => true,
        }
    }
}
