//! Calendar formatting for reports and audit details, without a time library.

/// `YYYY-MM-DD HH:MM:SSZ` (UTC) for unix seconds.
pub fn utc_datetime(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil conversion (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_datetime_matches_known_dates() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc_datetime(1_709_251_199), "2024-02-29 23:59:59Z");
        assert_eq!(utc_datetime(-1), "1969-12-31 23:59:59Z");
    }
}
