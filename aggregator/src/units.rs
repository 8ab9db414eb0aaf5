//! The units the command lines take: durations (`90s`, `15m`, `1h`, `7d`, `2w`), sizes
//! (`512MB`, `10GB`, `1GiB`) and times (`2026-11-24 10:00[:00]` local, RFC 3339, or Unix
//! seconds).

use std::time::Duration;

use chrono::{DateTime, Local, NaiveDateTime, TimeZone};

/// Parses `<number><unit>` with units s, m, h, d, w (seconds when none).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (like 90s, 15m, 1h, 7d)"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (s, m, h, d or w)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// Parses `<number><unit>` with units B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB,
/// TiB (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size (like 512MB, 10GB)"))?;
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}' (B, KB, MB, GB, TB, KiB, …)"
            ))
        }
    };
    Ok(n.saturating_mul(scale))
}

/// Parses a point in time into µs since the Unix epoch: Unix seconds, RFC 3339, or local
/// `YYYY-MM-DD[ HH:MM[:SS]]`.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        // 9999-12-31T23:59:59Z: what the other forms can say, and far below 2^63 µs.
        const LAST_SECOND: u64 = 253_402_300_799;
        if secs > LAST_SECOND {
            return Err(format!("'{s}' Unix seconds is after the year 9999"));
        }
        return Ok(secs * 1_000_000);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return micros(t.timestamp_micros(), s);
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S%.f",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, format) {
            return local(naive, s);
        }
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return local(date.and_hms_opt(0, 0, 0).unwrap_or_default(), s);
    }
    Err(format!(
        "'{s}' is not a time (Unix seconds, RFC 3339, or YYYY-MM-DD[ HH:MM[:SS]] local)"
    ))
}

fn local(naive: NaiveDateTime, s: &str) -> Result<u64, String> {
    match Local.from_local_datetime(&naive).earliest() {
        Some(t) => micros(t.timestamp_micros(), s),
        None => Err(format!("'{s}' does not exist in the local time zone")),
    }
}

fn micros(us: i64, s: &str) -> Result<u64, String> {
    u64::try_from(us).map_err(|_| format!("'{s}' is before 1970"))
}

/// Formats µs since the epoch as the slow log does: local time with microseconds.
pub fn format_local(ts_us: u64) -> String {
    match Local.timestamp_micros(ts_us as i64).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
        None => ts_us.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_times() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z"),
            Ok(1_700_000_000_000_000)
        );
        let local = parse_time("2023-11-14 22:13:20").unwrap();
        assert_eq!(parse_time(&format_local(local)), Ok(local));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("18446744073709551615").is_err());
        assert!(parse_time("253402300800").is_err());
        assert_eq!(parse_time("253402300799"), Ok(253_402_300_799_000_000));
    }
}
