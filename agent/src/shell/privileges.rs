//! Dropping root once the capture is open (`--user`): the packet socket, the listeners and
//! the output files are already open, so the agent needs no privilege after that.

use std::ffi::CString;
use std::io;

use anyhow::{bail, Context, Result};

/// A user to become: its ids, from the password database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
}

/// Looks `name` up (a user name, or a numeric uid).
pub fn lookup(name: &str) -> Result<Account> {
    let c_name = CString::new(name).context("a user name cannot hold a NUL byte")?;
    // SAFETY: getpwnam/getpwuid return a pointer to static storage or null; it is read
    // before any other call that could overwrite it, and no other thread runs yet.
    let entry = unsafe {
        let by_name = libc::getpwnam(c_name.as_ptr());
        match (by_name.is_null(), name.parse::<libc::uid_t>()) {
            (true, Ok(uid)) => libc::getpwuid(uid),
            _ => by_name,
        }
    };
    if entry.is_null() {
        bail!("no such user '{name}' (--user)");
    }
    // SAFETY: checked non-null above; the fields are plain integers.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Account { uid, gid })
}

/// Creates `dir` (if missing) and makes it `account`'s, so that it stays writable after
/// [`become_user`].
pub fn give_directory(dir: &std::path::Path, account: Account) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
        .with_context(|| format!("cannot give {} to the --user", dir.display()))
}

/// Becomes `account` for good: no supplementary groups, its group, its user, and no way to
/// gain privileges again (no set-uid executables, no capabilities kept).
pub fn become_user(name: &str, account: Account) -> Result<()> {
    let failed = |what: &str| {
        let e = io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (only root can switch user; without root, give the binary CAP_NET_RAW and CAP_NET_ADMIN instead of --user)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot switch to user '{name}': {what}: {e}{hint}")
    };
    // SAFETY: plain system calls on integers; the order matters (groups while still root).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(failed("setgroups"));
        }
        if libc::setresgid(account.gid, account.gid, account.gid) != 0 {
            return Err(failed("setresgid"));
        }
        if libc::setresuid(account.uid, account.uid, account.uid) != 0 {
            return Err(failed("setresuid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(failed("no_new_privs"));
        }
        // Root must be gone for good: getting it back has to fail.
        if account.uid != 0 && libc::setuid(0) == 0 {
            bail!("cannot switch to user '{name}': root could be regained");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_by_name_and_number() {
        assert_eq!(lookup("root").unwrap(), Account { uid: 0, gid: 0 });
        assert_eq!(lookup("0").unwrap().uid, 0);
        let missing = lookup("no-such-user-tcpkit").unwrap_err().to_string();
        assert!(
            missing.contains("no such user 'no-such-user-tcpkit'"),
            "{missing}"
        );
    }
}
