//! CPU time from /proc/stat: how busy one CPU was over a stretch of time (the benchmark's
//! cost figure), and how idle the whole machine is (to wait for quiet before a run).

use std::{
    fs, thread,
    time::{Duration, Instant},
};

/// Ticks of USER_HZ (10 ms) per second, as /proc/stat counts.
const USER_HZ: f64 = 100.0;

/// (busy, total) ticks of the line `cpu` (all CPUs) or `cpuN`.
fn ticks(which: Option<usize>) -> (u64, u64) {
    let name = which.map_or("cpu".to_string(), |n| format!("cpu{n}"));
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Busy time of one CPU, from `start()` to `stop()`.
pub struct BusyClock {
    cpu: usize,
    busy0: u64,
}

impl BusyClock {
    pub fn start(cpu: usize) -> BusyClock {
        BusyClock {
            cpu,
            busy0: ticks(Some(cpu)).0,
        }
    }

    pub fn stop(&self) -> Duration {
        let busy = ticks(Some(self.cpu)).0 - self.busy0;
        Duration::from_secs_f64(busy as f64 / USER_HZ)
    }
}

/// Idle share of all CPUs over `window`.
fn idle_share(window: Duration) -> f64 {
    let (b0, t0) = ticks(None);
    thread::sleep(window);
    let (b1, t1) = ticks(None);
    if t1 == t0 {
        return 1.0;
    }
    1.0 - (b1 - b0) as f64 / (t1 - t0) as f64
}

/// Waits (10 s at most) until the machine is nearly idle, e.g. after a namespace with
/// many conntrack entries went away (measuring.md); returns the last idle share.
pub fn wait_for_idle() -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let idle = idle_share(Duration::from_millis(250));
        if idle > 0.9 || Instant::now() >= deadline {
            return idle;
        }
    }
}
