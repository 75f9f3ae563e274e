//! Durations on the command line: a decimal number and a unit, `ms`, `s`, `m`, `h` or `d` (`1500ms`,
//! `30s`, `2.5m`, `2h`, `7d`). One parser for every flag that takes one (`bench --duration`, `tenant
//! create/update --default-ttl/--max-ttl`), computed from the decimal digits in whole nanoseconds, so
//! `1500ms` is exactly 1500 ms (no floating-point rounding).

use std::time::Duration;

const NANOS_PER_MS: u128 = 1_000_000;

/// Units and their length in nanoseconds.
const UNITS: [(&str, u128); 5] = [
    ("ms", NANOS_PER_MS),
    ("s", 1_000 * NANOS_PER_MS),
    ("m", 60_000 * NANOS_PER_MS),
    ("h", 3_600_000 * NANOS_PER_MS),
    ("d", 86_400_000 * NANOS_PER_MS),
];

/// Digits after the decimal point that are taken into account (a nanosecond of a second).
const MAX_FRACTION_DIGITS: u32 = 9;

/// `text` in nanoseconds; `bare_unit` is the unit of a number without one (`None`: a unit is
/// required, except for 0).
fn parse_nanos(text: &str, bare_unit: Option<&str>) -> Result<u128, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len()));
    let number = number.trim();
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(format!("{text:?}: expected a number and a unit, e.g. 1500ms, 30s, 15m, 2h, 7d"));
    }
    if fraction.len() > MAX_FRACTION_DIGITS as usize {
        return Err(format!("{text:?}: at most {MAX_FRACTION_DIGITS} digits after the decimal point"));
    }
    let zero = whole.bytes().chain(fraction.bytes()).all(|b| b == b'0');
    let unit = match (unit, bare_unit) {
        ("", Some(bare)) => bare,
        ("", None) if zero => "ms",
        ("", None) => {
            return Err(format!(
                "{text:?}: give a unit, e.g. {number}ms, {number}s, {number}m, {number}h or {number}d"
            ));
        }
        (unit, _) => unit,
    };
    let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!("{text:?}: unit must be ms, s, m, h or d"));
    };
    let too_long = || format!("{text:?}: too long");
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_long())? };
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        // Below u128::MAX: fewer than 10 digits times a day in nanoseconds.
        let scale = 10u128.pow(fraction.len() as u32);
        fraction.parse::<u128>().map_err(|_| too_long())? * unit_nanos / scale
    };
    whole.checked_mul(unit_nanos).and_then(|n| n.checked_add(fraction_nanos)).ok_or_else(too_long)
}

/// A positive duration; a bare number is seconds (`bench --duration`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let nanos = parse_nanos(text, Some("s"))?;
    if nanos == 0 {
        return Err(format!("{:?}: must be positive", text.trim()));
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| format!("{:?}: too long", text.trim()))?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// A tenant's expiry setting in whole milliseconds (`--default-ttl`, `--max-ttl`). A unit is
/// required (`1500` could be ms or s), except for 0, which means none. The upper bound (100 years)
/// is meta's to check, like every tenant setting.
pub fn parse_ttl_ms(text: &str) -> Result<u64, String> {
    let nanos = parse_nanos(text, None)?;
    if !nanos.is_multiple_of(NANOS_PER_MS) {
        return Err(format!("{:?}: not a whole number of milliseconds", text.trim()));
    }
    u64::try_from(nanos / NANOS_PER_MS).map_err(|_| format!("{:?}: too long", text.trim()))
}

/// `ms` in the largest unit that holds it exactly: `7d`, `2h`, `90m`, `30s`, `1500ms` (`0ms` for 0).
/// What it prints parses back to the same value.
pub fn format_ms(ms: u64) -> String {
    let nanos = u128::from(ms) * NANOS_PER_MS;
    UNITS
        .iter()
        .rev()
        .find(|(_, unit_nanos)| nanos != 0 && nanos.is_multiple_of(*unit_nanos))
        .map_or_else(|| format!("{ms}ms"), |(unit, unit_nanos)| format!("{}{unit}", nanos / unit_nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("5d").unwrap(), Duration::from_secs(5 * 86_400));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3), "a bare number is seconds");
        assert_eq!(parse_duration(" 0.25 s ").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").unwrap_err().contains("must be positive"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unit must be ms, s, m, h or d"));
    }

    #[test]
    fn ttls_are_whole_milliseconds_with_a_unit() {
        for (text, ms) in [
            ("1500ms", 1_500),
            ("30s", 30_000),
            ("15m", 900_000),
            ("2h", 7_200_000),
            ("7d", 604_800_000),
            ("1.5s", 1_500),
            ("36500d", 3_153_600_000_000),
            ("0", 0),
            ("0s", 0),
        ] {
            assert_eq!(parse_ttl_ms(text), Ok(ms), "{text}");
        }
        let bare = parse_ttl_ms("1500").unwrap_err();
        assert!(bare.contains("give a unit, e.g. 1500ms, 1500s"), "{bare}");
        assert!(parse_ttl_ms("1.5ms").unwrap_err().contains("not a whole number of milliseconds"));
        assert!(parse_ttl_ms("-5s").is_err());
        assert!(parse_ttl_ms("s").is_err());
        assert!(parse_ttl_ms("").is_err());
        assert!(parse_ttl_ms("1.2.3s").is_err());
        assert!(parse_ttl_ms("0.0000000001s").unwrap_err().contains("at most 9 digits"));
        assert!(parse_ttl_ms("99999999999999999999999999999999999999999d").unwrap_err().contains("too long"));
        assert!(parse_ttl_ms("300000000000d").unwrap_err().contains("too long"), "above u64::MAX ms");
    }

    #[test]
    fn formatted_ttls_parse_back() {
        for (ms, text) in [
            (0, "0ms"),
            (1_500, "1500ms"),
            (30_000, "30s"),
            (5_400_000, "90m"),
            (7_200_000, "2h"),
            (604_800_000, "7d"),
            (u64::MAX, "18446744073709551615ms"),
        ] {
            assert_eq!(format_ms(ms), text);
            assert_eq!(parse_ttl_ms(text), Ok(ms), "{text}");
        }
    }
}
