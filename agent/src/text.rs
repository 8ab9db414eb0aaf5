//! Text output without the formatting machinery: escaped wire bytes, decimal numbers,
//! milliseconds and endpoints.

/// Appends `bytes` to `out`, printable ASCII as is and everything else escaped (`\r`, `\n`,
/// `\t`, `\\`, `\xNN`), so that one packet or request always stays on one line.
pub fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
        }
    }
}

/// Appends the decimal digits of `n`.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `addr:port`, IPv6 as `[addr]:port`.
pub fn push_endpoint(out: &mut Vec<u8>, ip: std::net::IpAddr, port: u16) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{}", std::net::SocketAddr::new(ip, port));
}

/// Appends µs as milliseconds with three decimals.
pub fn push_millis(out: &mut Vec<u8>, us: u64) {
    push_decimal(out, us / 1000);
    out.push(b'.');
    let frac = us % 1000;
    if frac < 100 {
        out.push(b'0');
    }
    if frac < 10 {
        out.push(b'0');
    }
    push_decimal(out, frac);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        let mut out = Vec::new();
        for n in [0, 7, 10, 65535, u64::from(u32::MAX), u64::MAX] {
            out.clear();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn escapes_everything_unprintable() {
        let mut out = Vec::new();
        push_escaped(&mut out, b"SET k \"v\"\r\n\t\\\x00\xff~");
        assert_eq!(out, br#"SET k "v"\r\n\t\\\x00\xff~"#);
    }
}
