//! The `-o` log file, reopened on SIGHUP: logrotate's convention (rename the file, send
//! SIGHUP, and the agent writes on into a new file of the old name). Bytes written before
//! the signal go to the old file; a reopen that fails (say, the directory is no longer
//! writable after `--user`) is reported once and writing goes on into the old file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes buffered before a write reaches the file.
const BUFFER: usize = 1 << 16;

/// An append-only log file that reopens itself when asked.
pub struct LogFile {
    path: PathBuf,
    file: BufWriter<File>,
    /// Set by the SIGHUP handler.
    reopen: Arc<AtomicBool>,
}

impl LogFile {
    /// Opens `path` for appending (created when missing); `reopen` asks for a reopen.
    pub fn open(path: PathBuf, reopen: Arc<AtomicBool>) -> io::Result<Self> {
        let file = BufWriter::with_capacity(BUFFER, append(&path)?);
        Ok(Self { path, file, reopen })
    }

    fn reopen_when_asked(&mut self) -> io::Result<()> {
        if !self.reopen.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        self.file.flush()?;
        match append(&self.path) {
            Ok(file) => self.file = BufWriter::with_capacity(BUFFER, file),
            Err(e) => eprintln!(
                "tcpkit: cannot reopen the log {} on SIGHUP ({e}); writing on into the old file",
                self.path.display()
            ),
        }
        Ok(())
    }
}

fn append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.reopen_when_asked()?;
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.reopen_when_asked()?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopen_starts_a_new_file_where_the_old_was_renamed_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tcpkit.log");
        let reopen = Arc::new(AtomicBool::new(false));
        let mut log = LogFile::open(path.clone(), Arc::clone(&reopen)).unwrap();
        log.write_all(b"before\n").unwrap();
        std::fs::rename(&path, dir.path().join("tcpkit.log.1")).unwrap();
        log.write_all(b"still old\n").unwrap();
        reopen.store(true, Ordering::Relaxed);
        log.write_all(b"after\n").unwrap();
        log.flush().unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("tcpkit.log.1"), "before\nstill old\n");
        assert_eq!(read("tcpkit.log"), "after\n");
    }
}
