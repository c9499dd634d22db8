//! The process metrics Prometheus clients conventionally export (`process_*`), read from
//! `/proc/self` at each scrape. Elsewhere than on Linux, or when a file cannot be read, the
//! series it would give are left out rather than reported as 0.

use super::metrics::gauge;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// What `/proc/self/stat` says, in the units exported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub cpu_seconds: f64,
    pub start_ticks: u64,
    pub virtual_bytes: u64,
    pub resident_pages: u64,
}

/// Encodes every `process_*` series that can be read.
pub fn encode(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let ticks = rustix::param::clock_ticks_per_second();
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| parse_stat(&text, ticks));
    if let Some(stat) = stat {
        ConstCounter::new(stat.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        let page = u64::try_from(rustix::param::page_size()).unwrap_or(4096);
        gauge(
            encoder,
            "process_resident_memory_bytes",
            "Resident memory size, in bytes.",
            stat.resident_pages.saturating_mul(page),
        )?;
        gauge(
            encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size, in bytes.",
            stat.virtual_bytes,
        )?;
        if let Some(boot) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text))
            && ticks > 0
        {
            gauge(
                encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                boot + stat.start_ticks / ticks,
            )?;
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle read here is one of the entries: it is not counted.
        let open = fds.count().saturating_sub(1);
        gauge(
            encoder,
            "process_open_fds",
            "Open file descriptors.",
            u64::try_from(open).unwrap_or(u64::MAX),
        )?;
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| max_open_files(&text))
    {
        gauge(
            encoder,
            "process_max_fds",
            "The most file descriptors the process may open (soft limit).",
            max,
        )?;
    }
    Ok(())
}

/// Parses `/proc/self/stat` (proc(5)): the fields after the command name, which is in
/// parentheses and may itself contain spaces and parentheses.
pub fn parse_stat(text: &str, ticks_per_second: u64) -> Option<Stat> {
    let after_name = text.get(text.rfind(')')? + 1..)?;
    // Field 3 (state) is the first after the name; proc(5) numbers from 1.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime) = (field(14)?, field(15)?);
    let ticks = ticks_per_second.max(1) as f64;
    Some(Stat {
        cpu_seconds: (utime + stime) as f64 / ticks,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) in `/proc/stat`.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of "Max open files" in `/proc/self/limits` (`None` when unlimited).
fn max_open_files(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        // Fields 3.. as proc(5) numbers them; utime 250, stime 150 ticks, start 1000 ticks,
        // vsize 8192, rss 3 pages.
        let text = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 4 0 \
                    1000 8192 3 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text, 100),
            Some(Stat {
                cpu_seconds: 4.0,
                start_ticks: 1000,
                virtual_bytes: 8192,
                resident_pages: 3,
            })
        );
        assert_eq!(parse_stat("4242 (truncated", 100), None);
    }

    #[test]
    fn limits_and_boot_time_are_read_from_their_lines() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            max_open_files("Max open files            unlimited            unlimited   files\n"),
            None
        );
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1764633600\nprocesses 5\n"),
            Some(1764633600)
        );
    }
}
