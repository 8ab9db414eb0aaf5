//! Local-time formatting of packet timestamps without a time-zone lookup per line.
//!
//! The UTC offset is asked of the C library once per quarter hour of capture time (DST
//! changes fall on such boundaries) and the calendar date is computed here.

/// Formats timestamps as local time, `YYYY-MM-DD HH:MM:SS[.uuuuuu]`.
#[derive(Debug, Default)]
pub struct LocalClock {
    /// The quarter hour (`ts_sec / 900`) whose offset is cached, and the offset in seconds.
    cached: Option<(i64, i64)>,
}

const OFFSET_WINDOW_SECS: i64 = 900;

impl LocalClock {
    /// Appends the local time of `ts_sec` (with `.uuuuuu` when `micros` is given) to `out`.
    pub fn format(&mut self, ts_sec: i64, micros: Option<u32>, out: &mut Vec<u8>) {
        let local = ts_sec + self.offset(ts_sec);
        format_civil(local, micros, out);
    }

    fn offset(&mut self, ts_sec: i64) -> i64 {
        let window = ts_sec.div_euclid(OFFSET_WINDOW_SECS);
        match self.cached {
            Some((w, offset)) if w == window => offset,
            _ => {
                let offset = utc_offset(ts_sec);
                self.cached = Some((window, offset));
                offset
            }
        }
    }
}

/// The local UTC offset in seconds at `ts_sec`, from the C library.
fn utc_offset(ts_sec: i64) -> i64 {
    let t = ts_sec as libc::time_t;
    // SAFETY: localtime_r only writes the tm we pass; a zeroed tm is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        tm.tm_gmtoff
    } else {
        0
    }
}

/// Appends `secs` (seconds since the epoch, already shifted to local time) as a date and time.
fn format_civil(secs: i64, micros: Option<u32>, out: &mut Vec<u8>) {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    push_num(out, y, 4);
    out.push(b'-');
    push_num(out, m, 2);
    out.push(b'-');
    push_num(out, d, 2);
    out.push(b' ');
    push_num(out, of_day / 3600, 2);
    out.push(b':');
    push_num(out, of_day / 60 % 60, 2);
    out.push(b':');
    push_num(out, of_day % 60, 2);
    if let Some(us) = micros {
        out.push(b'.');
        push_num(out, i64::from(us), 6);
    }
}

/// Zero-padded decimal of a non-negative number, at least `width` digits.
fn push_num(out: &mut Vec<u8>, n: i64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut n = n.max(0) as u64;
    let mut i = digits.len();
    while n > 0 {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let start = i.min(digits.len() - width);
    out.extend_from_slice(&digits[start..]);
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn civil(secs: i64, micros: Option<u32>) -> String {
        let mut out = Vec::new();
        format_civil(secs, micros, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn known_dates() {
        assert_eq!(civil(0, None), "1970-01-01 00:00:00");
        assert_eq!(
            civil(1_542_393_516, Some(873_067)),
            "2018-11-16 18:38:36.873067"
        );
        assert_eq!(civil(951_782_400, Some(5)), "2000-02-29 00:00:00.000005");
        assert_eq!(civil(4_107_542_399, None), "2100-02-28 23:59:59");
    }

    #[test]
    fn matches_the_c_library_for_local_time() {
        let mut clock = LocalClock::default();
        for ts in (1_500_000_000i64..1_800_000_000).step_by(7_777_777) {
            let mut ours = Vec::new();
            clock.format(ts, None, &mut ours);
            let t = ts as libc::time_t;
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            unsafe { libc::localtime_r(&t, &mut tm) };
            let theirs = format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                tm.tm_year + 1900,
                tm.tm_mon + 1,
                tm.tm_mday,
                tm.tm_hour,
                tm.tm_min,
                tm.tm_sec
            );
            assert_eq!(String::from_utf8(ours).unwrap(), theirs);
        }
    }
}
