//! `cargo xtask setup`: make this machine able to build and test nodeport, idempotently.
//!
//! Pieces, each checked cheaply and installed only when missing (one line printed per piece
//! installed):
//! - rustfmt and clippy for the active (stable) toolchain;
//! - the `nightly` toolchain with `rust-src` (the eBPF crate is built with `-Z build-std=core`
//!   through aya-build, which runs `rustup run nightly cargo ...`);
//! - bpf-linker 0.13.0, built against the LLVM shared library that nightly itself ships (Debian's
//!   LLVM is too old to read nightly's bitcode, and prebuilt bpf-linkers cannot be downloaded),
//!   rebuilt when missing, broken, or built for another nightly's LLVM;
//! - the Debian packages the tests, the demo and debugging use (apt-get, as root or via sudo).

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, fmt_duration};

/// bpf-linker release we build; its `llvm-NN` features say which LLVM majors it can link against.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_MAJORS: std::ops::RangeInclusive<u32> = 21..=23;

/// Where the libLLVM symlinks for bpf-linker live, below the user's home.
const LLVM_PREFIX_DIR: &str = ".local/nodeport-llvm";

/// Debian packages, each with one program it provides (used to check non-Debian systems).
const PACKAGES: &[(&str, &str)] = &[
    ("clang", "clang"),
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("tcpdump", "tcpdump"),
    ("hping3", "hping3"),
    ("iperf3", "iperf3"),
    ("netsniff-ng", "trafgen"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("socat", "socat"),
    ("ncat", "ncat"),
    ("curl", "curl"),
    ("ethtool", "ethtool"),
    ("util-linux", "nsenter"),
    ("linux-perf", "perf"),
    ("kmod", "modprobe"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// What compiling needs: Rust components, nightly with rust-src, bpf-linker. No root needed.
    Toolchain,
    /// Everything, including the Debian packages (root or sudo when some are missing).
    All,
}

/// Make sure every piece in `scope` is installed.
pub fn ensure(scope: Scope) -> Result<()> {
    let start = Instant::now();
    let mut installed = 0;
    installed += ensure_stable_components()?;
    let nightly_sysroot = ensure_nightly_with_rust_src(&mut installed)?;
    installed += ensure_bpf_linker(&nightly_sysroot)?;
    if scope == Scope::All {
        installed += ensure_packages()?;
    }
    if installed == 0 {
        eprintln!(
            "setup: everything is in place ({})",
            fmt_duration(start.elapsed())
        );
    }
    Ok(())
}

/// Print `setup: <what> ... ` now and `done (time)` when `f` succeeds, on the same line.
fn install_step(what: &str, f: impl FnOnce() -> Result<()>) -> Result<usize> {
    eprint!("setup: {what} ... ");
    let _ = std::io::stderr().flush();
    let start = Instant::now();
    match f() {
        Ok(()) => {
            eprintln!("done ({})", fmt_duration(start.elapsed()));
            Ok(1)
        }
        Err(err) => {
            eprintln!("failed");
            Err(err.context(format!("setup: {what}")))
        }
    }
}

fn rustup() -> Result<PathBuf> {
    util::find_program("rustup").context(
        "rustup not found on PATH: install it from https://rustup.rs (nodeport needs rustup's \
         stable and nightly toolchains)",
    )
}

fn sysroot(toolchain: Option<&str>) -> Result<Option<PathBuf>> {
    let mut cmd = Command::new("rustc");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    cmd.args(["--print", "sysroot"]);
    let output = util::run_captured(&mut cmd)?;
    if !output.status.success() {
        return Ok(None);
    }
    let path = String::from_utf8(output.stdout).context("rustc printed a non-UTF-8 sysroot")?;
    Ok(Some(PathBuf::from(path.trim())))
}

/// rustfmt and clippy for the toolchain that `cargo fmt` and `cargo clippy` will use.
fn ensure_stable_components() -> Result<usize> {
    let rustup = rustup()?;
    let sysroot = sysroot(None)?.context(
        "`rustc --print sysroot` failed: is a default toolchain set (`rustup default stable`)?",
    )?;
    let missing: Vec<&str> = [("rustfmt", "rustfmt"), ("clippy", "cargo-clippy")]
        .into_iter()
        .filter(|(_, bin)| !sysroot.join("bin").join(bin).exists())
        .map(|(component, _)| component)
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    install_step(
        &format!("adding {} to the active toolchain", missing.join(" and ")),
        || {
            util::run_quiet(
                Command::new(&rustup)
                    .args(["component", "add"])
                    .args(&missing),
            )
            .map(drop)
        },
    )
}

/// The nightly toolchain with rust-src; returns nightly's sysroot.
fn ensure_nightly_with_rust_src(installed: &mut usize) -> Result<PathBuf> {
    let rustup = rustup()?;
    let sysroot = match sysroot(Some("nightly"))? {
        Some(sysroot) => sysroot,
        None => {
            *installed += install_step("installing the nightly toolchain with rust-src", || {
                util::run_quiet(Command::new(&rustup).args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ]))
                .map(drop)
            })?;
            sysroot(Some("nightly"))?
                .context("nightly was installed but `rustc +nightly --print sysroot` fails")?
        }
    };
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core_src.exists() {
        *installed += install_step("adding rust-src to nightly (for -Z build-std=core)", || {
            util::run_quiet(Command::new(&rustup).args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
            .map(drop)
        })?;
    }
    Ok(sysroot)
}

/// The LLVM shared library nightly ships, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
struct NightlyLlvm {
    /// The file in nightly's `lib/`; its name is the soname bpf-linker records as NEEDED.
    path: PathBuf,
    soname: String,
    major: u32,
}

fn nightly_llvm(sysroot: &Path) -> Result<NightlyLlvm> {
    let lib = sysroot.join("lib");
    let entries = fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(version) = name.strip_prefix("libLLVM.so.") else {
            continue;
        };
        if !version.contains("-rust-") {
            continue;
        }
        let major = version
            .split(['.', '-'])
            .next()
            .and_then(|major| major.parse().ok())
            .with_context(|| format!("cannot read the LLVM version from {name}"))?;
        return Ok(NightlyLlvm {
            path: lib.join(&name),
            soname: name,
            major,
        });
    }
    bail!(
        "no libLLVM.so.*-rust-* in {}: this nightly does not ship LLVM as a shared library, \
         so bpf-linker cannot be built against it",
        lib.display()
    )
}

enum LinkerState {
    Ok,
    Missing,
    Broken(String),
    OtherLlvm(String),
}

fn bpf_linker_state(llvm: &NightlyLlvm) -> LinkerState {
    let Some(path) = util::find_program("bpf-linker") else {
        return LinkerState::Missing;
    };
    match util::run_captured(Command::new(&path).arg("--version")) {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let first = stderr.lines().next().unwrap_or("").trim().to_owned();
            return LinkerState::Broken(format!("{} --version: {first}", path.display()));
        }
        Err(err) => return LinkerState::Broken(format!("{err:#}")),
    }
    match linked_rust_llvm(&path) {
        Some(soname) if soname != llvm.soname => LinkerState::OtherLlvm(soname),
        _ => LinkerState::Ok,
    }
}

/// The Rust-shipped libLLVM soname a dynamically linked bpf-linker needs, if any. The names a
/// binary needs live in `.dynstr`, in the first pages of the file, so the first MiBs suffice.
fn linked_rust_llvm(path: &Path) -> Option<String> {
    let mut head = Vec::new();
    File::open(path)
        .ok()?
        .take(4 << 20)
        .read_to_end(&mut head)
        .ok()?;
    let needle = b"libLLVM.so.";
    let start = head.windows(needle.len()).position(|w| w == needle)?;
    let len = head[start..].iter().position(|&b| b == 0)?;
    let soname = std::str::from_utf8(&head[start..start + len]).ok()?;
    soname.contains("-rust-").then(|| soname.to_owned())
}

fn ensure_bpf_linker(nightly_sysroot: &Path) -> Result<usize> {
    let llvm = nightly_llvm(nightly_sysroot)?;
    let why = match bpf_linker_state(&llvm) {
        LinkerState::Ok => return Ok(0),
        LinkerState::Missing => "not installed".to_owned(),
        LinkerState::Broken(why) => format!("installed one is broken: {why}"),
        LinkerState::OtherLlvm(soname) => format!("installed one is linked against {soname}"),
    };
    if !BPF_LINKER_LLVM_MAJORS.contains(&llvm.major) {
        bail!(
            "bpf-linker is needed ({why}), but nightly ships LLVM {} and bpf-linker \
             {BPF_LINKER_VERSION} supports LLVM {}..={}: update BPF_LINKER_VERSION in \
             xtask/src/setup.rs",
            llvm.major,
            BPF_LINKER_LLVM_MAJORS.start(),
            BPF_LINKER_LLVM_MAJORS.end()
        );
    }
    let what = format!(
        "building bpf-linker {BPF_LINKER_VERSION} against nightly's {} ({why}; about a minute)",
        llvm.soname
    );
    install_step(&what, || build_bpf_linker(&llvm))
}

fn build_bpf_linker(llvm: &NightlyLlvm) -> Result<()> {
    let home = util::home_dir().context("HOME is not set")?;
    let prefix = home.join(LLVM_PREFIX_DIR);
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    // Drop links to earlier nightlies' LLVMs, then link `libLLVM.so` (which llvm-sys links
    // with) and the soname (which the dynamic loader looks up through the rpath at run time).
    for entry in fs::read_dir(&lib)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so") && entry.file_type()?.is_symlink() {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    for name in ["libLLVM.so", llvm.soname.as_str()] {
        let link = lib.join(name);
        symlink(&llvm.path, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), llvm.path.display()))?;
    }

    let rustflags = format!("-C link-arg=-Wl,-rpath,{}", lib.display());
    util::run_quiet(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", llvm.major))
            .arg("--force")
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", rustflags)
            // It would take precedence over RUSTFLAGS.
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )?;

    let installed = util::cargo_bin_dir()
        .map(|bin| bin.join("bpf-linker"))
        .filter(|path| path.exists())
        .or_else(|| util::find_program("bpf-linker"))
        .context("cargo install succeeded but bpf-linker is not in Cargo's bin directory")?;
    let output = util::run_captured(Command::new(&installed).arg("--version"))?;
    if !output.status.success() {
        bail!(
            "the freshly built {} does not run: {}",
            installed.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Install the missing Debian packages; on other systems, warn about missing programs.
fn ensure_packages() -> Result<usize> {
    let Some(dpkg_query) = util::find_program("dpkg-query") else {
        let missing: Vec<String> = PACKAGES
            .iter()
            .filter(|(_, program)| util::find_program(program).is_none())
            .map(|(package, program)| format!("{program} ({package})"))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "setup: warning: not a Debian-like system, install these yourself: {}",
                missing.join(", ")
            );
        }
        return Ok(0);
    };
    let missing = missing_packages(&dpkg_query)?;
    if missing.is_empty() {
        return Ok(0);
    }

    let sudo = if util::is_root() {
        None
    } else {
        Some(util::find_program("sudo").with_context(|| {
            format!(
                "these Debian packages are missing and installing them needs root: {}\n\
                 run as root: apt-get update && apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            )
        })?)
    };
    let apt_get = |args: &[&str]| {
        let mut cmd = match &sudo {
            Some(sudo) => {
                let mut cmd = Command::new(sudo);
                cmd.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
                cmd
            }
            None => {
                let mut cmd = Command::new("apt-get");
                cmd.env("DEBIAN_FRONTEND", "noninteractive");
                cmd
            }
        };
        cmd.args(args);
        cmd
    };

    install_step(
        &format!("installing Debian packages {}", missing.join(" ")),
        || {
            util::run_quiet(&mut apt_get(&["-q", "update"]))?;
            let mut install = apt_get(&["-q", "install", "-y"]);
            install.args(&missing);
            util::run_quiet(&mut install)?;
            let still = missing_packages(&dpkg_query)?;
            if !still.is_empty() {
                bail!(
                    "apt-get succeeded but these are still not installed: {}",
                    still.join(" ")
                );
            }
            Ok(())
        },
    )
}

fn missing_packages(dpkg_query: &Path) -> Result<Vec<&'static str>> {
    // Prints one line per known package; unknown ones only get a message on stderr (and a
    // non-zero status), which is why the status is not checked.
    let output = util::run_captured(
        Command::new(dpkg_query)
            .args(["-W", "-f=${Package}\t${Status}\n"])
            .args(PACKAGES.iter().map(|(package, _)| package))
            .env("LC_ALL", "C"),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once('\t'))
        // Status is "want flag state", e.g. "install ok installed" or "hold ok installed".
        .filter(|(_, status)| status.split_whitespace().nth(2) == Some("installed"))
        .map(|(package, _)| package.split(':').next().unwrap_or(package))
        .collect();
    Ok(PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !installed.contains(package))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::env;

    use super::*;

    #[test]
    fn packages_are_unique() {
        let mut names: Vec<_> = PACKAGES.iter().map(|(p, _)| p).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PACKAGES.len());
    }

    #[test]
    fn reads_llvm_major_from_soname() {
        let dir = env::temp_dir().join(format!("xtask-llvm-{}", std::process::id()));
        fs::create_dir_all(dir.join("lib")).unwrap();
        File::create(dir.join("lib/libLLVM-22-rust-1.97.0-nightly.so")).unwrap();
        File::create(dir.join("lib/libLLVM.so.22.1-rust-1.97.0-nightly")).unwrap();
        let llvm = nightly_llvm(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(llvm.soname, "libLLVM.so.22.1-rust-1.97.0-nightly");
        assert_eq!(llvm.major, 22);
    }

    #[test]
    fn finds_the_needed_rust_llvm() {
        let path = env::temp_dir().join(format!("xtask-needed-{}", std::process::id()));
        fs::write(
            &path,
            b"\x7fELF\0libgcc_s.so.1\0libLLVM.so.21.1-rust-1.90.0-nightly\0libc.so.6\0",
        )
        .unwrap();
        let found = linked_rust_llvm(&path);
        fs::remove_file(&path).unwrap();
        assert_eq!(
            found.as_deref(),
            Some("libLLVM.so.21.1-rust-1.90.0-nightly")
        );
    }
}
