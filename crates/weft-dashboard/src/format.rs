//! Escaping and number, size and time formats shared by the pages and the report.

use std::fmt::Write;

/// `text` escaped for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `x` with `digits` decimals, or an em dash when absent or not finite.
pub fn num(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "—".into(),
    }
}

/// A relative change as a signed percentage.
pub fn pct(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{:+.2}%", 100.0 * x),
        _ => "—".into(),
    }
}

/// A byte count in decimal units.
pub fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "—".into() };
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// A duration in milliseconds, in the unit that reads best.
pub fn millis(ms: Option<f64>) -> String {
    match ms {
        Some(ms) if ms.is_finite() && ms >= 60_000.0 => format!("{:.1} min", ms / 60_000.0),
        Some(ms) if ms.is_finite() && ms >= 1000.0 => format!("{:.2} s", ms / 1000.0),
        Some(ms) if ms.is_finite() => format!("{ms:.0} ms"),
        _ => "—".into(),
    }
}

/// A Unix time in milliseconds as a UTC date and time (`2026-12-05 12:58:03Z`).
pub fn utc(unix_ms: Option<u64>) -> String {
    let Some(ms) = unix_ms else { return "—".into() };
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = String::new();
    let _ = write!(out, "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60);
    out
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_792), (2026, 12, 5));
        assert_eq!(utc(Some(1_796_475_427_466)), "2026-12-05 12:57:07Z");
    }

    #[test]
    fn absent_and_non_finite_numbers_are_dashes() {
        assert_eq!(num(None, 2), "—");
        assert_eq!(num(Some(f64::NAN), 2), "—");
        assert_eq!(pct(Some(0.0123)), "+1.23%");
        assert_eq!(bytes(Some(482_304)), "482.3 kB");
        assert_eq!(millis(Some(1500.0)), "1.50 s");
    }
}
