//! Developer tasks for nodeport: `cargo xtask <setup|build|run|test|cleanup|bench|vm-test>`.
//!
//! This crate must build on a fresh machine before the eBPF toolchain exists, so it uses only
//! std, anyhow and clap, and never depends on another workspace crate.

mod bench;
mod benchdoc;
mod build;
mod cleanup;
mod run;
mod setup;
mod svg;
mod test;
mod util;
mod vm;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for nodeport"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: rustfmt/clippy, the nightly toolchain with
    /// rust-src, bpf-linker built against nightly's LLVM, and the Debian packages the tests use.
    /// Idempotent and quick when everything is there.
    Setup,
    /// Build the agent (with its embedded eBPF object) and the test binaries.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build in release mode and run the namespace demo (root); with arguments after `--`,
    /// run the agent itself with them instead (real node mode).
    Run {
        /// Arguments for `nodeport-agent`, e.g.
        /// `-- --interface eth0 --node-name $(hostname) --manifests DIR --pin-path /sys/fs/bpf/nodeport`.
        #[arg(last = true)]
        agent_args: Vec<OsString>,
    },
    /// Run everything CI checks: setup, fmt, release build, clippy, cleanup, all tests.
    Test {
        /// Only the unprivileged host unit tests (library and binary unit tests; no root).
        #[arg(long)]
        unit: bool,
    },
    /// Remove leftovers of earlier runs: all `np-*` network namespaces and `/sys/fs/bpf/np-*`
    /// pins. Stop running tests and demos first: their namespaces are removed too.
    Cleanup,
    /// Run the benchmarks (as root) and regenerate docs/benchmarks.md.
    Bench {
        /// Shorter runs, 1 and 1,000 services (a few minutes).
        #[arg(long)]
        quick: bool,
    },
    /// The kernel matrix (root): boot Debian's kernels under qemu and run the verifier test
    /// (as root and with only CAP_BPF + CAP_NET_ADMIN) and the packet tests in each; print a
    /// table. Kernel packages are cached in target/vm-cache, console logs go to target/vm-test.
    VmTest {
        /// Kernels to boot, by version: 5.10 (Debian 11), 6.1 (Debian 12), 6.12 (Debian 13).
        #[arg(long, value_delimiter = ',', default_value = "5.10,6.1,6.12")]
        kernels: Vec<String>,
        /// Time limit per VM, in seconds (boot and all tests; qemu is killed after it).
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        /// Echo each VM's console as it arrives.
        #[arg(long)]
        verbose: bool,
        /// Also run one end-to-end test (the two-node namespace cluster with real TCP and
        /// UDP clients, tests/e2e.rs) in each VM.
        #[arg(long)]
        e2e: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Everything we start (cargo, the agent's build script through aya-build) must find the
    // bpf-linker that `cargo install` puts in Cargo's bin directory.
    util::prepend_cargo_bin_to_path();
    let result = match cli.command {
        Command::Setup => setup::ensure(setup::Scope::All).map(|_| ExitCode::SUCCESS),
        Command::Build { release } => build::run(release).map(|_| ExitCode::SUCCESS),
        Command::Run { agent_args } => run::run(agent_args),
        Command::Test { unit } => test::run(unit),
        Command::Cleanup => cleanup::run(cleanup::Scope::Everything).map(|_| ExitCode::SUCCESS),
        Command::Bench { quick } => bench::run(quick).map(|_| ExitCode::SUCCESS),
        Command::VmTest {
            kernels,
            timeout,
            verbose,
            e2e,
        } => vm::run(vm::Options {
            kernels,
            timeout: std::time::Duration::from_secs(timeout),
            verbose,
            e2e,
        }),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
