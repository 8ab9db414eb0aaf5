//! The time steps of a series (`Query.Series`): chosen from the range, or checked.

/// The steps a series is cut into when none is asked: round lengths, each a multiple of the
/// agents' 10 s snapshots (and from 10 minutes on, of the roll-ups' spans).
pub const STEPS_US: [u64; 15] = [
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
    1_200_000_000,
    1_800_000_000,
    3_600_000_000,
    7_200_000_000,
    10_800_000_000,
    21_600_000_000,
    43_200_000_000,
    86_400_000_000,
    604_800_000_000,
];

/// About this many steps are chosen over a range.
pub const TARGET_STEPS: u64 = 120;

/// A series has at most this many steps.
pub const MAX_STEPS: u64 = 5_000;

/// The step over `[from, to)`: the shortest of [`STEPS_US`] that cuts it into at most
/// [`TARGET_STEPS`].
pub fn step_for(from_us: u64, to_us: u64) -> u64 {
    let range = to_us.saturating_sub(from_us);
    STEPS_US
        .into_iter()
        .find(|s| range.div_ceil(*s) <= TARGET_STEPS)
        .unwrap_or(STEPS_US[STEPS_US.len() - 1])
}

/// Whether `step_us` may cut `[from, to)`: at least a second, at most [`MAX_STEPS`] steps.
pub fn check_step(from_us: u64, to_us: u64, step_us: u64) -> Result<(), String> {
    if step_us < 1_000_000 {
        return Err("a step is at least 1 s".into());
    }
    let first = from_us - from_us % step_us;
    let steps = to_us.saturating_sub(first).div_ceil(step_us);
    if steps > MAX_STEPS {
        return Err(format!(
            "{steps} steps of {} s: at most {MAX_STEPS} (a longer step, or a shorter range)",
            step_us / 1_000_000
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000_000;

    #[test]
    fn steps_are_round_and_about_120_to_a_range() {
        assert_eq!(step_for(0, HOUR), 30_000_000);
        assert_eq!(step_for(0, 24 * HOUR), 1_200_000_000);
        assert_eq!(step_for(5, 5 + 7 * 24 * HOUR), 2 * HOUR);
        assert_eq!(step_for(0, 1), 10_000_000);
        assert_eq!(step_for(0, 1000 * 24 * HOUR), STEPS_US[14]);
        for s in STEPS_US {
            assert_eq!(s % 10_000_000, 0);
            if s >= 600_000_000 {
                assert_eq!(
                    s % 600_000_000,
                    0,
                    "{s}: a multiple of the 10-minute roll-ups"
                );
            }
        }
    }

    #[test]
    fn steps_too_short_or_too_many_are_refused() {
        assert!(check_step(0, HOUR, 999_999).is_err());
        assert!(check_step(0, HOUR, 1_000_000).is_ok());
        assert!(check_step(0, 24 * HOUR, 10_000_000).is_err());
        assert!(check_step(0, 24 * HOUR, 60_000_000).is_ok());
    }
}
