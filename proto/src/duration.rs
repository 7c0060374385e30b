//! Prometheus's duration units (`ms s m h d w y`), as its APIs print durations and as
//! promgate's configuration takes them.

/// Milliseconds in one `unit`, or `None` for an unknown unit.
pub fn unit_ms(unit: &str) -> Option<u64> {
    Some(match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        "y" => 365 * 86_400_000,
        _ => return None,
    })
}
