//! CPU time from /proc/stat: how busy one CPU was over a stretch of time (the benchmark's
//! cost figure), and how idle the whole machine is (to wait for quiet before a run).

use std::{
    fs, thread,
    time::{Duration, Instant},
};

/// Ticks of USER_HZ (10 ms) per second, as /proc/stat counts.
const USER_HZ: f64 = 100.0;

/// The fields of the line `cpu` (all CPUs) or `cpuN` of /proc/stat: user nice system idle
/// iowait irq softirq steal ... (guest time is inside user).
fn fields(which: Option<usize>) -> Vec<u64> {
    let name = which.map_or("cpu".to_string(), |n| format!("cpu{n}"));
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// Ticks of `cpu` or `cpuN`: (busy, kernel, total). Kernel time is system + irq + softirq:
/// where all of the benchmark's work runs.
fn ticks(which: Option<usize>) -> (u64, u64, u64) {
    let v = fields(which);
    let total: u64 = v.iter().take(8).sum();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    (total - f(3) - f(4), f(2) + f(5) + f(6), total)
}

/// Irq + softirq ticks of `cpu` or `cpuN`.
fn interrupt_ticks(which: Option<usize>) -> u64 {
    let v = fields(which);
    v.get(5).copied().unwrap_or(0) + v.get(6).copied().unwrap_or(0)
}

/// The loop's CPU time from `start()` to `stop()`: the pinned CPU's kernel time (system,
/// irq, softirq: generator, node and sink all run in the kernel, mostly in softirq), plus
/// the irq and softirq time of the other CPUs. The loop can leave its CPU: a veth's NAPI
/// poll runs where it was last scheduled, and a stray frame sent from the other CPU (a
/// neighbour or listener report) can schedule one of the loop's polls there. Softirq time
/// is where it shows (tick accounting charges NAPI work to softirq, in ksoftirqd too),
/// while other processes' system time on the other CPU (the agent's own work) stays out,
/// as does user time everywhere (a compiler, say). The pinned CPU's share says how well
/// lock step held.
pub struct BusyClock {
    cpu: usize,
    pinned0: u64,
    irq0: u64,
    pinned_irq0: u64,
}

/// What a [`BusyClock`] measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Busy {
    /// The loop's CPU time, wherever it ran.
    pub all: Duration,
    /// Kernel time of the pinned CPU.
    pub pinned: Duration,
}

impl BusyClock {
    pub fn start(cpu: usize) -> BusyClock {
        BusyClock {
            cpu,
            pinned0: ticks(Some(cpu)).1,
            irq0: interrupt_ticks(None),
            pinned_irq0: interrupt_ticks(Some(cpu)),
        }
    }

    pub fn stop(&self) -> Busy {
        let d = |t: u64| Duration::from_secs_f64(t as f64 / USER_HZ);
        let pinned = ticks(Some(self.cpu)).1 - self.pinned0;
        let others_irq = (interrupt_ticks(None) - self.irq0)
            .saturating_sub(interrupt_ticks(Some(self.cpu)) - self.pinned_irq0);
        Busy {
            all: d(pinned + others_irq),
            pinned: d(pinned),
        }
    }
}

/// Idle share of all CPUs over `window`.
fn idle_share(window: Duration) -> f64 {
    let (b0, _, t0) = ticks(None);
    thread::sleep(window);
    let (b1, _, t1) = ticks(None);
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
