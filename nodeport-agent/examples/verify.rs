//! Load the datapath (no pins, nothing attached, default map sizes) and print how many
//! instructions the verifier processed for each program, or its refusal, and the memory
//! the kernel charges for each map. Run it with the DaemonSet's capabilities to see the
//! margin to the 1M-instruction limit under least privilege:
//!
//! ```sh
//! cargo build --release -p nodeport-agent --example verify
//! setpriv --bounding-set=-all,+bpf,+net_admin --inh-caps=-all -- target/release/examples/verify
//! ```
use aya::{maps::MapInfo, programs::Program};
use nodeport_agent::datapath::{Datapath, MapSizes};

fn main() {
    let mut dp = match Datapath::load(MapSizes::default(), None) {
        Ok(dp) => dp,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut rows: Vec<(String, Option<u32>)> = dp
        .ebpf_mut()
        .programs()
        .map(|(name, p)| {
            let info = match p {
                Program::Xdp(x) => x.info().ok(),
                Program::SchedClassifier(x) => x.info().ok(),
                _ => None,
            };
            let n = info.and_then(|i| i.verified_instruction_count());
            (name.to_string(), n)
        })
        .collect();
    rows.sort();
    for (name, n) in rows {
        match n {
            Some(n) => println!("{name:<16} {n:>9} instructions verified"),
            None => println!("{name:<16} {:>9}", "not loaded"),
        }
    }
    let mut maps = map_memory();
    maps.sort_by_key(|m| std::cmp::Reverse(m.2));
    let total: u64 = maps.iter().map(|m| m.2).sum();
    for (name, entries, bytes) in maps {
        println!(
            "{name:<16} {entries:>9} entries {:>8.1} MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
    println!(
        "{:<16} {:>17} {:>8.1} MiB",
        "maps in all",
        "",
        total as f64 / (1 << 20) as f64
    );
}

/// (name, max entries, memlock bytes) of every map this process holds, from fdinfo.
fn map_memory() -> Vec<(String, u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let info = std::fs::read_to_string(e.path()).ok()?;
            let field = |k: &str| -> Option<u64> {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse().ok())
            };
            let (id, bytes) = (field("map_id:")?, field("memlock:")?);
            let m = MapInfo::from_id(id as u32).ok()?;
            let name = m.name_as_str().unwrap_or("?").to_string();
            Some((name, m.max_entries(), bytes))
        })
        .collect()
}
