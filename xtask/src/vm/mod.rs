//! `cargo xtask vm-test`: the kernel matrix. Boots Debian's kernels (5.10, 6.1, 6.12) under
//! qemu with an initramfs built here, runs the verifier test (as root and with only CAP_BPF
//! and CAP_NET_ADMIN) and the packet tests inside each, and prints a table per kernel.
//!
//! Concerns, one module each: [`debian`] fetches and caches the kernel packages (private apt
//! state), [`initramfs`] packs the root filesystem, [`qemu`] boots and collects the console,
//! [`report`] reads the console into results and prints them. A failure of the machinery
//! (download, boot, a binary that cannot start) is reported as INFRA, apart from what a kernel
//! or a test refused.

mod debian;
mod initramfs;
mod qemu;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{setup, util};

/// The kernels the matrix knows: version as operators name it, Debian suite, distribution.
pub const KERNELS: &[(&str, &str, &str)] = &[
    ("5.10", "bullseye", "Debian 11"),
    ("6.1", "bookworm", "Debian 12"),
    ("6.12", "trixie", "Debian 13"),
];

/// Modules the tests need that Debian builds as modules (with their dependencies).
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "bridge"];

/// Host programs the tests run inside the VM (with their libraries).
const HOST_PROGRAMS: &[&str] = &["ip", "nsenter", "setpriv", "ethtool"];

/// The end-to-end test `--e2e` adds: real TCP and UDP clients through both nodes of the
/// namespace cluster, each node with its own agent (tests/tests/e2e.rs).
const E2E_TEST: &str = "tcp_and_udp_through_both_nodes";

/// The verifier test: every shipped program in every shipped configuration loads.
const VERIFIER_TEST: &str = "every_program_passes_the_verifier";

/// A run of one test binary inside the VM.
pub struct Case {
    pub name: &'static str,
    pub title: &'static str,
    /// The command line, in the VM's shell.
    command: String,
}

pub struct Options {
    pub kernels: Vec<String>,
    pub timeout: Duration,
    pub verbose: bool,
    /// Also run one end-to-end cluster test.
    pub e2e: bool,
}

pub fn run(options: Options) -> Result<ExitCode> {
    if !util::is_root() {
        bail!("vm-test needs root (apt-get download into a private state, qemu)");
    }
    let mut kernels = Vec::new();
    for want in &options.kernels {
        let known = KERNELS
            .iter()
            .find(|(version, ..)| version == want)
            .with_context(|| {
                format!(
                    "unknown kernel {want}; known: {}",
                    KERNELS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                )
            })?;
        kernels.push(*known);
    }
    ensure_qemu()?;
    setup::ensure(setup::Scope::Toolchain)?;
    let binaries = build()?;

    let cache = util::target_dir().join("vm-cache");
    let logs = util::target_dir().join("vm-test");
    fs::create_dir_all(&cache)?;
    fs::create_dir_all(&logs)?;
    let busybox = debian::busybox(&cache).context("fetching busybox-static")?;
    let cases = cases(&binaries, options.e2e)?;

    let mut results = Vec::new();
    for (version, suite, distro) in kernels {
        eprintln!("\n==> kernel {version} ({distro}, {suite})");
        let result = run_kernel(&cache, &logs, suite, &busybox, &binaries, &cases, &options)
            .unwrap_or_else(|err| report::KernelResult::infra(format!("{err:#}")));
        eprintln!("<== kernel {version}: {}", result.verdict());
        results.push((version, distro, result));
    }
    report::print(&results, &cases);
    eprintln!("\nconsole logs: {}", logs.display());
    let all_passed = results.iter().all(|(_, _, r)| r.passed(&cases));
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The release binaries the VMs run, at their paths on the host (the same paths inside the
/// VM, so paths compiled into the tests still hold).
struct Binaries {
    packet: PathBuf,
    e2e: PathBuf,
    agent: PathBuf,
    echo: PathBuf,
}

/// `cargo build --release` of the agent and the test binaries; the test executables are read
/// from cargo's JSON messages (the deps folder holds older builds of them too).
fn build() -> Result<Binaries> {
    let out = util::run_quiet(
        Command::new("cargo")
            .current_dir(util::workspace_root())
            .args(["build", "--release", "-p", "nodeport-agent", "-p", "tests"])
            .args(["--bins", "--tests", "--message-format=json"]),
    )
    .context("release build")?;
    let (mut packet, mut e2e) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let executable = msg["executable"].as_str().map(PathBuf::from);
        match msg["target"]["name"].as_str() {
            Some("packet") => packet = executable,
            Some("e2e") => e2e = executable,
            _ => {}
        }
    }
    let bin = util::target_dir().join("release");
    Ok(Binaries {
        packet: packet.context("cargo built no `packet` test executable")?,
        e2e: e2e.context("cargo built no `e2e` test executable")?,
        agent: bin.join("nodeport-agent"),
        echo: bin.join("np-echo"),
    })
}

fn cases(binaries: &Binaries, e2e: bool) -> Result<Vec<Case>> {
    let packet = binaries.packet.display();
    // By its path: busybox's shell would run its own `setpriv` applet, which lacks
    // --bounding-set.
    let setpriv = util::find_program("setpriv")
        .context("setpriv is not installed (Debian package util-linux)")?;
    let setpriv = setpriv.display();
    let mut cases = vec![
        Case {
            name: "verifier-root",
            title: "verifier (root)",
            command: format!("{packet} --exact {VERIFIER_TEST} --nocapture --test-threads=1"),
        },
        Case {
            name: "verifier-caps",
            title: "verifier (CAP_BPF+CAP_NET_ADMIN)",
            // As tests/tests/caps.rs drops them for the agent: uid 0, but only these two
            // capabilities in the bounding set, so the exec'd test holds exactly them.
            command: format!(
                "{setpriv} --bounding-set=-all,+bpf,+net_admin --inh-caps=-all -- \
                 {packet} --exact {VERIFIER_TEST} --nocapture --test-threads=1"
            ),
        },
        Case {
            name: "packet",
            title: "packet tests (root)",
            command: format!("{packet} --test-threads=1"),
        },
    ];
    if e2e {
        cases.push(Case {
            name: "e2e",
            title: "e2e (root)",
            command: format!(
                "{} --exact {E2E_TEST} --test-threads=1",
                binaries.e2e.display()
            ),
        });
    }
    Ok(cases)
}

/// Fetch (or reuse) the kernel of `suite`, pack an initramfs, boot it, read the results.
fn run_kernel(
    cache: &Path,
    logs: &Path,
    suite: &'static str,
    busybox: &Path,
    binaries: &Binaries,
    cases: &[Case],
    options: &Options,
) -> Result<report::KernelResult> {
    let kernel =
        debian::kernel(cache, suite).with_context(|| format!("fetching {suite}'s kernel"))?;
    eprintln!(
        "vm-test: kernel {} ({})",
        kernel.release,
        kernel.vmlinuz.display()
    );
    let work = TempDir::new(cache, &format!("run-{}-{suite}", std::process::id()))?;
    let initrd = work.path().join("initramfs.cpio");
    pack(&kernel, busybox, binaries, cases, work.path(), &initrd)?;
    let log = logs.join(format!("{suite}-{}.console.log", kernel.release));
    eprintln!(
        "vm-test: booting (qemu, software emulation, limit {}); console: {}",
        util::fmt_duration(options.timeout),
        log.display()
    );
    let console = qemu::boot(
        &kernel.vmlinuz,
        &initrd,
        &log,
        options.timeout,
        options.verbose,
    )?;
    Ok(report::KernelResult::read(kernel.release, &console, cases))
}

fn pack(
    kernel: &debian::Kernel,
    busybox: &Path,
    binaries: &Binaries,
    cases: &[Case],
    work: &Path,
    out: &Path,
) -> Result<()> {
    let mut fs_ = initramfs::Initramfs::default();
    fs_.file("/bin/busybox", busybox, true);
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/var", "/etc"] {
        fs_.dir(dir);
    }
    fs_.symlink("/var/run", "../run");
    fs_.bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/:/bin/sh\n".to_vec(),
        false,
    );
    fs_.bytes("/etc/group", b"root:x:0:\n".to_vec(), false);
    for program in HOST_PROGRAMS {
        fs_.host_program(program)?;
    }
    for binary in [
        &binaries.packet,
        &binaries.e2e,
        &binaries.agent,
        &binaries.echo,
    ] {
        fs_.binary(&binary.to_string_lossy(), binary)?;
    }
    // Modules, decompressed (trixie ships .ko.xz; busybox's insmod wants plain ELF).
    let mut loads = Vec::new();
    for (i, module) in debian::modules_in_load_order(&kernel.modules, MODULES)?
        .iter()
        .enumerate()
    {
        let source = kernel.modules.join(module);
        let plain = work.join(format!("{i}.ko"));
        if let Some(base) = module.strip_suffix(".xz") {
            let out = util::run_quiet(Command::new("xz").arg("-dc").arg(&source))?;
            fs::write(&plain, out.stdout)?;
            loads.push(base.rsplit('/').next().unwrap_or(base).to_owned());
        } else if module.ends_with(".ko") {
            fs::copy(&source, &plain)?;
            loads.push(module.rsplit('/').next().unwrap_or(module).to_owned());
        } else {
            bail!("module {module}: unknown compression");
        }
        let name = loads.last().expect("pushed");
        fs_.file(&format!("/modules/{name}"), &plain, false);
    }
    fs_.bytes(
        "/init",
        init_script(&loads, cases, binaries).into_bytes(),
        true,
    );
    fs_.write(out)
}

/// `/init`: mounts, modules, then each case between markers that [`report`] reads, then
/// power off (qemu exits: `-no-reboot`).
fn init_script(modules: &[String], cases: &[Case], binaries: &Binaries) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp\n",
    );
    s.push_str(&format!(
        "echo {} $(cat /proc/uptime) $(uname -r)\n",
        qemu::INIT_MARKER
    ));
    s.push_str(
        "mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t bpf bpf /sys/fs/bpf || echo 'NP-INFRA mount bpffs failed'\n\
         test -e /sys/kernel/btf/vmlinux || echo 'NP-INFRA no /sys/kernel/btf/vmlinux'\n",
    );
    for module in modules {
        s.push_str(&format!(
            "insmod /modules/{module} || echo 'NP-INFRA insmod {module} failed'\n"
        ));
    }
    s.push_str("ip link set lo up\necho \"NP-INFO memlock $(ulimit -l)\"\n");
    s.push_str(&format!(
        "export NODEPORT_AGENT={} NP_ECHO={} RUST_BACKTRACE=0\ncd /tmp\n",
        binaries.agent.display(),
        binaries.echo.display()
    ));
    for case in cases {
        s.push_str(&format!(
            "echo 'NP-BEGIN {name}'\n{command} 2>&1\necho \"NP-END {name} rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)\"\n",
            name = case.name,
            command = case.command
        ));
    }
    s.push_str("echo NP-DONE\nsync\npoweroff -f\n");
    s
}

/// Installs qemu from Debian when it is missing (as `cargo xtask setup` installs the rest).
fn ensure_qemu() -> Result<()> {
    if util::find_program("qemu-system-x86_64").is_some() {
        return Ok(());
    }
    eprintln!("vm-test: installing qemu-system-x86 from Debian");
    util::run_quiet(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "-q",
                "install",
                "-y",
                "--no-install-recommends",
                "qemu-system-x86",
            ]),
    )
    .context("apt-get install qemu-system-x86 (try `apt-get update` first)")?;
    Ok(())
}

/// A folder of ours under the cache, removed when dropped (also when a panic unwinds).
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
