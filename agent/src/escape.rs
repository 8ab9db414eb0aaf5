//! Bytes from the wire made safe for a one-line log.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_unprintable() {
        let mut out = Vec::new();
        push_escaped(&mut out, b"SET k \"v\"\r\n\t\\\x00\xff~");
        assert_eq!(out, br#"SET k "v"\r\n\t\\\x00\xff~"#);
    }
}
