//! Shared bits of the benchmarks: percentiles and table printing.

use std::time::Duration;

/// The `p`th percentile (0..=100) of `samples`, nearest-rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Prints one table row: name, n, p50, p90, min, max.
pub fn row(name: &str, samples: &[Duration]) {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "| {name:<44} | {:>3} | {:>8} | {:>8} | {:>8} | {:>8} |",
        samples.len(),
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 90.0)),
        ms(min),
        ms(max)
    );
}

pub fn header() {
    println!(
        "| {:<44} | {:>3} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "measurement (ms)", "n", "p50", "p90", "min", "max"
    );
    println!(
        "|{}|-----|----------|----------|----------|----------|",
        "-".repeat(46)
    );
}

/// Header of a table with p99: name, n, p50, p90, p99, max.
pub fn header_p99() {
    println!(
        "| {:<48} | {:>3} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "measurement (ms)", "n", "p50", "p90", "p99", "max"
    );
    println!(
        "|{}|-----|----------|----------|----------|----------|",
        "-".repeat(50)
    );
}

/// One row under [`header_p99`].
pub fn row_p99(name: &str, samples: &[Duration]) {
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "| {name:<48} | {:>3} | {:>8} | {:>8} | {:>8} | {:>8} |",
        samples.len(),
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 90.0)),
        ms(percentile(samples, 99.0)),
        ms(max)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(5));
        assert_eq!(percentile(&s, 90.0), Duration::from_millis(9));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(10));
    }
}
