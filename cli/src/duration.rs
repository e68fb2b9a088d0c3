//! Durations in human form: `30s`, `5m`, `1h30m`, `250ms`, `2d`.
//!
//! A small parser of our own rather than a dependency: the grammar is one line, and the
//! error messages can say what to type instead.

use std::time::Duration;

/// Parses `<number><unit>` repeated, units `ms`, `s`, `m`, `h`, `d`; a bare `0` is zero.
///
/// Used as clap's value parser, so an error here becomes a usage error (exit 2).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty duration; write it like 30s, 5m or 1h30m".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration; write it like 30s, 5m or 1h30m"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("`{text}`: the number is too large"))?;
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "`{text}` has no unit; add one: ms, s, m, h or d (e.g. {number}s)"
                ));
            }
            other => {
                return Err(format!(
                    "`{text}`: unknown unit `{other}`; use ms, s, m, h or d"
                ));
            }
        };
        let part = number
            .checked_mul(unit_ms)
            .map(Duration::from_millis)
            .ok_or_else(|| format!("`{text}` is too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{text}` is too long"))?;
        rest = after;
    }
    Ok(total)
}

/// The shortest human form of `d` (whole milliseconds), the inverse of [`parse`].
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_units_parse() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn compound_durations_add_up() {
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1m30s500ms"), Ok(Duration::from_millis(90_500)));
    }

    #[test]
    fn bare_zero_is_zero_but_other_bare_numbers_ask_for_a_unit() {
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        let err = parse("30").unwrap_err();
        assert!(err.contains("no unit"), "{err}");
    }

    #[test]
    fn garbage_and_unknown_units_are_rejected_with_a_hint() {
        for bad in ["", "s", "1x", "1.5s", "-1s", "1h 30m", "abc"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse("3w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn overflowing_durations_are_rejected_not_wrapped() {
        assert!(parse("99999999999999999999s").is_err());
        assert!(parse("18446744073709551615d").is_err());
    }

    #[test]
    fn format_is_the_inverse_of_parse() {
        for text in ["0s", "250ms", "30s", "1h30m", "2d3h4m5s6ms"] {
            let d = parse(text).expect("parses");
            assert_eq!(format(d), text);
        }
    }
}
