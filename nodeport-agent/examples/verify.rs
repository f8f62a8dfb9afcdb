//! Load the datapath (no pins, nothing attached) and print how many instructions the
//! verifier processed for each program, or its refusal. Run it with the DaemonSet's
//! capabilities to see the margin to the 1M-instruction limit under least privilege:
//!
//! ```sh
//! cargo build --release -p nodeport-agent --example verify
//! setpriv --bounding-set=-all,+bpf,+net_admin --inh-caps=-all -- target/release/examples/verify
//! ```
use aya::programs::Program;
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
}
