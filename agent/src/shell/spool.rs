//! The on-disk spool (`--spool-dir`): a copy of every batch waiting for the aggregator's
//! acknowledgement, so that what an agent could not deliver survives its restart.
//!
//! Files: `<session>.hello` (the session's hello) and `<session>-<seq>.batch` (one batch),
//! each protobuf, written to a temporary name and renamed (a crash leaves no half file). A
//! batch's file goes when it is acknowledged or dropped from the memory buffer. At start, the
//! sessions left by earlier runs are sent again under their own hello (the aggregator keeps
//! each (session, seq) once), then deleted. The directory is bounded by `--spool-size`: a
//! batch that would not fit is kept in memory only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;
use tcpkit_proto::v1;

/// An earlier run's session still on disk.
#[derive(Debug)]
pub struct LeftSession {
    /// Its hello.
    pub hello: v1::Hello,
    /// Its batches, by sequence number.
    pub batches: BTreeMap<u64, PathBuf>,
    hello_path: PathBuf,
}

impl LeftSession {
    /// Reads its batches, oldest first; unreadable files are deleted and counted.
    pub fn load(&self) -> (Vec<v1::Batch>, u64) {
        let mut corrupt = 0;
        let batches = self
            .batches
            .values()
            .filter_map(|path| match read_message::<v1::Batch>(path) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("spool: dropping {}: {e:#}", path.display());
                    let _ = std::fs::remove_file(path);
                    corrupt += 1;
                    None
                }
            })
            .collect();
        (batches, corrupt)
    }

    /// Deletes the batches up to `seq`; with `all`, the session's hello too.
    pub fn forget(&mut self, seq: u64, all: bool) {
        let keep = self.batches.split_off(&(seq + 1));
        for path in std::mem::replace(&mut self.batches, keep).values() {
            let _ = std::fs::remove_file(path);
        }
        if all && self.batches.is_empty() {
            let _ = std::fs::remove_file(&self.hello_path);
        }
    }
}

/// The spool of the running session.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    cap_bytes: u64,
    session: u64,
    /// Spooled batches: sequence number → file size.
    spooled: BTreeMap<u64, u64>,
    /// Batches that did not fit (kept in memory only), until they are gone.
    memory_only: BTreeSet<u64>,
    /// Bytes of spooled batches, this session's and those left by earlier runs when opened.
    bytes: u64,
    /// Batches kept in memory only because the spool was full.
    pub skipped: u64,
}

fn read_message<M: Message + Default>(path: &Path) -> Result<M> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    M::decode(bytes.as_slice())
        .with_context(|| format!("{} is not a spooled message", path.display()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl Spool {
    /// Opens (creating) `dir` for the session of `hello`; returns the sessions earlier runs
    /// left there.
    pub fn open(dir: &Path, cap_bytes: u64, hello: &v1::Hello) -> Result<(Self, Vec<LeftSession>)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        let mut sessions: BTreeMap<u64, LeftSession> = BTreeMap::new();
        let mut batches: Vec<(u64, u64, PathBuf)> = Vec::new();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the spool directory {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if let Some(session) = name.strip_suffix(".hello").and_then(|s| s.parse().ok()) {
                match read_message::<v1::Hello>(&path) {
                    Ok(hello) => {
                        sessions.insert(
                            session,
                            LeftSession {
                                hello,
                                batches: BTreeMap::new(),
                                hello_path: path,
                            },
                        );
                    }
                    Err(e) => tracing::warn!("spool: ignoring {}: {e:#}", path.display()),
                }
            } else if let Some((session, seq)) = name
                .strip_suffix(".batch")
                .and_then(|s| s.split_once('-'))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            {
                batches.push((session, seq, path));
            } else if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path); // a write a crash interrupted
            }
        }
        for (session, seq, path) in batches {
            match sessions.get_mut(&session) {
                Some(s) => {
                    s.batches.insert(seq, path);
                }
                None => {
                    let _ = std::fs::remove_file(&path); // no hello: cannot be sent
                }
            }
        }
        let left: Vec<LeftSession> = sessions
            .into_values()
            .filter(|s| s.hello.session != hello.session)
            .collect();
        let spool = Self {
            dir: dir.to_owned(),
            cap_bytes,
            session: hello.session,
            spooled: BTreeMap::new(),
            memory_only: BTreeSet::new(),
            bytes: left
                .iter()
                .flat_map(|s| s.batches.values())
                .map(|p| p.metadata().map_or(0, |m| m.len()))
                .sum(),
            skipped: 0,
        };
        write_atomically(
            &spool.dir.join(format!("{}.hello", hello.session)),
            &hello.encode_to_vec(),
        )
        .with_context(|| format!("cannot write to the spool directory {}", dir.display()))?;
        Ok((spool, left))
    }

    fn batch_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}-{seq}.batch", self.session))
    }

    /// Makes the spool hold exactly the batches of `pending` (that fit): writes the new
    /// ones, deletes those acknowledged or dropped since.
    pub fn sync<'a>(&mut self, pending: impl Iterator<Item = &'a v1::Batch>) {
        let mut live = BTreeSet::new();
        for batch in pending {
            live.insert(batch.seq);
            if self.spooled.contains_key(&batch.seq) || self.memory_only.contains(&batch.seq) {
                continue;
            }
            let bytes = batch.encode_to_vec();
            let size = bytes.len() as u64;
            let written = if self.bytes + size > self.cap_bytes {
                false
            } else {
                match write_atomically(&self.batch_path(batch.seq), &bytes) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!("spool: cannot write batch {}: {e}", batch.seq);
                        false
                    }
                }
            };
            if written {
                self.spooled.insert(batch.seq, size);
                self.bytes += size;
            } else {
                self.memory_only.insert(batch.seq);
                self.skipped += 1;
            }
        }
        self.memory_only.retain(|seq| live.contains(seq));
        let gone: Vec<u64> = self
            .spooled
            .keys()
            .copied()
            .filter(|seq| !live.contains(seq))
            .collect();
        for seq in gone {
            let _ = std::fs::remove_file(self.batch_path(seq));
            self.bytes -= self.spooled.remove(&seq).unwrap_or(0);
        }
    }

    /// The running session ended with nothing left: its hello goes too.
    pub fn close(self) {
        if self.spooled.is_empty() {
            let _ = std::fs::remove_file(self.dir.join(format!("{}.hello", self.session)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, events: usize) -> v1::Batch {
        v1::Batch {
            seq,
            events: vec![v1::Event::default(); events],
            ..Default::default()
        }
    }

    fn hello(session: u64) -> v1::Hello {
        v1::Hello {
            agent_id: "a".into(),
            session,
            ..Default::default()
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pending_batches_survive_a_restart_and_go_once_delivered() {
        let dir = std::env::temp_dir().join(format!("tcpkit-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut spool, left) = Spool::open(&dir, 1 << 20, &hello(7)).unwrap();
        assert!(left.is_empty());
        let pending = [batch(1, 2), batch(2, 0), batch(3, 5)];
        spool.sync(pending.iter());
        assert_eq!(
            files(&dir),
            ["7-1.batch", "7-2.batch", "7-3.batch", "7.hello"]
        );
        spool.sync(pending[1..].iter()); // batch 1 acknowledged
        assert_eq!(files(&dir), ["7-2.batch", "7-3.batch", "7.hello"]);
        spool.close(); // the run ends with two batches unacknowledged
        std::fs::write(dir.join("7-9.tmp"), b"half a write").unwrap();
        std::fs::write(dir.join("8-1.batch"), b"no hello for me").unwrap();

        let (spool, mut left) = Spool::open(&dir, 1 << 20, &hello(9)).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].hello.session, 7);
        let (batches, corrupt) = left[0].load();
        assert_eq!((batches.len(), corrupt), (2, 0));
        assert_eq!(
            batches
                .iter()
                .map(|b| (b.seq, b.events.len()))
                .collect::<Vec<_>>(),
            [(2, 0), (3, 5)]
        );
        left[0].forget(2, false);
        assert_eq!(files(&dir), ["7-3.batch", "7.hello", "9.hello"]);
        left[0].forget(3, true);
        spool.close();
        assert!(files(&dir).is_empty(), "{:?}", files(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_spool_keeps_batches_in_memory_only() {
        let dir = std::env::temp_dir().join(format!("tcpkit-spool-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let one = batch(1, 10).encode_to_vec().len() as u64;
        let (mut spool, _) = Spool::open(&dir, one * 2, &hello(1)).unwrap();
        let pending: Vec<v1::Batch> = (1..=4).map(|s| batch(s, 10)).collect();
        spool.sync(pending.iter());
        spool.sync(pending.iter()); // counted once
        assert_eq!(spool.skipped, 2);
        assert_eq!(files(&dir), ["1-1.batch", "1-2.batch", "1.hello"]);
        spool.sync(pending[2..].iter()); // 1 and 2 acknowledged: room again, but 3 and 4
        assert_eq!(files(&dir), ["1.hello"]); // stay memory-only: never half-spooled
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
