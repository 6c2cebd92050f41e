//! Benchmarks of the Pagoda engine. The binaries live in `src/bin/` (`cpu-bench`: prefill,
//! single-stream and batched decode on the synchronous [`pagoda_engine::Engine`]); this library
//! holds what they share:
//!
//! - [`MachineInfo`]: the facts a result must name (CPU model, cores, worker threads).
//! - [`peak_rss_bytes`]: the process's peak resident set (`VmHWM`).
//! - [`load_average`], [`process_cpu_time`]: how much of the machine the run really had.
//! - [`median`]: the statistic reported for repeated runs.
//! - [`loadgen`]: the load generator for OpenAI-compatible servers (`load-gen`), with request
//!   lengths from [`lengths`] and latency-versus-throughput plots from [`plot`].
//!
//! Criterion microbenchmarks of the engine's and kernels' hot pieces are in `benches/`.

pub mod lengths;
pub mod loadgen;
pub mod plot;

/// The machine a benchmark ran on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MachineInfo {
    /// `model name` from `/proc/cpuinfo` ("unknown" elsewhere).
    pub cpu_model: String,
    /// Logical CPUs this process may use (`available_parallelism`).
    pub num_cores: usize,
    /// Threads of the global rayon pool (paged attention and candle's quantized matmuls).
    pub num_rayon_threads: usize,
    /// Threads candle uses for its float matmuls (`candle_core::utils::get_num_threads`).
    pub num_candle_threads: usize,
}

impl MachineInfo {
    pub fn detect() -> Self {
        let cpu_model = pagoda_kernels::device::cpu_model();
        Self {
            cpu_model,
            num_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            num_rayon_threads: rayon::current_num_threads(),
            num_candle_threads: candle_core::utils::get_num_threads(),
        }
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`); `None`
/// where that file does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`). On a shared machine a load above
/// the number of cores means the benchmark competed for the CPU.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// User + system CPU time of this process, all threads (`/proc/self/stat`; Linux's `USER_HZ`
/// is 100 on every architecture it reports through this file).
pub fn process_cpu_time() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(std::time::Duration::from_millis((utime + stime) * 10))
}

/// Median of `xs` (mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn machine_info_is_sane() {
        let m = MachineInfo::detect();
        assert!(m.num_cores >= 1 && m.num_rayon_threads >= 1);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
            assert!(load_average().is_some());
            assert!(process_cpu_time().is_some());
        }
    }
}
