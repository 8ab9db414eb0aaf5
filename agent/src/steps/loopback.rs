//! The loopback interface shows every packet twice to a packet socket: once going out, once
//! coming in. libpcap keeps the incoming copy and skips the outgoing one in user space, after
//! the kernel has copied both into the ring. Here the capture's kernel filter skips it
//! instead: half the ring, half the copying in the senders' system calls, and half the
//! frames the agent walks past (`lo`, and `any` with local traffic).

/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: the packet type, a BPF ancillary load.
const LOAD_PACKET_TYPE: u32 = (-0x1000i32 + 4) as u32;
/// `SKF_AD_OFF + SKF_AD_IFINDEX`: the interface index, a BPF ancillary load.
const LOAD_IFINDEX: u32 = (-0x1000i32 + 8) as u32;
/// `PACKET_OUTGOING`, from `<linux/if_packet.h>`.
const PACKET_OUTGOING: u32 = 4;
/// What the program keeps of a packet when no filter was installed: all of it.
const WHOLE_PACKET: u32 = u32::MAX;
/// The kernel's `BPF_MAXINSNS`.
const MAX_INSTRUCTIONS: usize = 4096;

/// `program` (the classic BPF libpcap installed, none when empty) behind a check that
/// rejects the outgoing copy of a packet on interface `lo_ifindex`.
pub fn skip_outgoing_loopback(
    program: &[libc::sock_filter],
    lo_ifindex: u32,
) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld_abs, jeq_k, ret_k) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    let mut out = vec![
        op(ld_abs, 0, 0, LOAD_PACKET_TYPE),
        // Outgoing: look at the interface; else on to the program (3 ahead).
        op(jeq_k, 0, 3, PACKET_OUTGOING),
        op(ld_abs, 0, 0, LOAD_IFINDEX),
        // The loopback's: rejected; else on to the program (1 ahead).
        op(jeq_k, 0, 1, lo_ifindex),
        op(ret_k, 0, 0, 0),
    ];
    if program.is_empty() {
        out.push(op(ret_k, 0, 0, WHOLE_PACKET));
    } else {
        out.extend_from_slice(program);
    }
    out
}

/// Replaces the kernel filter of live packet socket `fd` with the same filter behind
/// [`skip_outgoing_loopback`]. False when that cannot be done (no loopback interface, a
/// kernel without `SO_GET_FILTER`, a program at the kernel's limit): libpcap's own filter
/// stays, and libpcap still skips the outgoing copies, in user space.
pub fn drop_outgoing_loopback_in_kernel(fd: i32) -> bool {
    // SAFETY: a NUL-terminated name.
    let lo_ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo_ifindex == 0 {
        return false;
    }
    let Some(program) = installed_filter(fd) else {
        return false;
    };
    let program = skip_outgoing_loopback(&program, lo_ifindex);
    if program.len() > MAX_INSTRUCTIONS {
        return false;
    }
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// The classic BPF program attached to socket `fd` (`SO_GET_FILTER`, whose length is
/// counted in instructions); empty when there is none.
fn installed_filter(fd: i32) -> Option<Vec<libc::sock_filter>> {
    let mut len: libc::socklen_t = 0;
    // SAFETY: a null buffer of length 0 asks for the program's length only.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER, // SO_GET_FILTER is the same option number
            std::ptr::null_mut(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let empty = libc::sock_filter {
        code: 0,
        jt: 0,
        jf: 0,
        k: 0,
    };
    let mut program = vec![empty; len as usize];
    if len > 0 {
        // SAFETY: `program` holds `len` instructions, the unit `len` counts in.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                program.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 || len as usize != program.len() {
            return None;
        }
    }
    Some(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ret(k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }

    /// Where a conditional jump at `at` goes when true and when false.
    fn targets(program: &[libc::sock_filter], at: usize) -> (usize, usize) {
        let i = &program[at];
        (at + 1 + usize::from(i.jt), at + 1 + usize::from(i.jf))
    }

    #[test]
    fn outgoing_loopback_copies_are_rejected_and_all_else_reaches_the_program() {
        let program = [ret(0), ret(262_144)];
        let out = skip_outgoing_loopback(&program, 1);
        let start = out.len() - program.len();
        assert_eq!(
            &out[start..].iter().map(|i| i.k).collect::<Vec<_>>(),
            &[0, 262_144]
        );
        assert_eq!(out[0].k, LOAD_PACKET_TYPE);
        // Not outgoing: straight to the program.
        assert_eq!(out[1].k, PACKET_OUTGOING);
        assert_eq!(targets(&out, 1).1, start);
        // Outgoing: the interface decides.
        assert_eq!(out[targets(&out, 1).0].k, LOAD_IFINDEX);
        let (lo, other) = targets(&out, 3);
        assert_eq!(out[3].k, 1);
        assert_eq!((out[lo].code, out[lo].k), (ret(0).code, 0), "rejected");
        assert_eq!(
            other, start,
            "another interface's outgoing packet is filtered as before"
        );
    }

    #[test]
    fn without_a_program_everything_else_is_kept_whole() {
        let out = skip_outgoing_loopback(&[], 7);
        assert_eq!(out[3].k, 7);
        let start = targets(&out, 1).1;
        assert_eq!((out[start].code, out[start].k), (ret(0).code, WHOLE_PACKET));
        assert_eq!(start, out.len() - 1);
    }
}
