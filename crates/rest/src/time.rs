//! Times as the seeds show them: `2017-09-28T05:08:32.839953` (UTC, microseconds, no zone).

use serde_json::Value;

/// A record's RFC 3339 time in the seeds' form; `null` when there is none.
pub fn seed_time(rfc3339: &str) -> Value {
    if rfc3339.is_empty() {
        return Value::Null;
    }
    match humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z')) {
        Ok(t) => {
            let text = humantime::format_rfc3339_micros(t).to_string();
            Value::String(text.trim_end_matches('Z').to_owned())
        }
        Err(_) => Value::String(rfc3339.to_owned()),
    }
}

/// A time a client gives (`changes-since`, seed form or RFC 3339) as the seeds' form, to
/// compare with [`seed_time`]'s.
pub fn parse_client_time(text: &str) -> Option<String> {
    let t = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()?;
    Some(
        humantime::format_rfc3339_micros(t)
            .to_string()
            .trim_end_matches('Z')
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_take_the_seeds_form() {
        assert_eq!(
            seed_time("2026-12-06T20:17:10Z"),
            Value::String("2026-12-06T20:17:10.000000".into())
        );
        assert_eq!(
            seed_time("2026-12-06T20:17:10.123Z"),
            Value::String("2026-12-06T20:17:10.123000".into())
        );
        assert_eq!(seed_time(""), Value::Null);
        assert_eq!(
            parse_client_time("2017-09-28T05:08:32.839953").as_deref(),
            Some("2017-09-28T05:08:32.839953")
        );
        assert_eq!(
            parse_client_time("2017-09-28T05:08:32Z").as_deref(),
            Some("2017-09-28T05:08:32.000000")
        );
        assert_eq!(parse_client_time("yesterday"), None);
    }
}
