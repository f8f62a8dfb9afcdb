//! Small helpers shared by the tasks: paths, privileges, running commands, signals.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory, as the cargo commands we start (from the workspace root) see it.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// The directory `cargo install` puts binaries in.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = match env::var_os("CARGO_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home_dir()?.join(".cargo"),
    };
    Some(home.join("bin"))
}

pub fn home_dir() -> Option<PathBuf> {
    env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
}

/// Put Cargo's bin directory first on our PATH, which every child process inherits.
pub fn prepend_cargo_bin_to_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let current = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&current).next().as_deref() == Some(bin.as_path()) {
        return;
    }
    let paths = std::iter::once(bin).chain(env::split_paths(&current));
    if let Ok(joined) = env::join_paths(paths) {
        // xtask is single-threaded when this runs (first thing in main).
        env::set_var("PATH", joined);
    }
}

/// The first executable called `name` on PATH (and, for non-root users whose PATH lacks them,
/// in the sbin directories, where tools such as `ip` and `bpftool` live).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs with effective uid 0 (read from `/proc/self/status`, so that
/// xtask needs no libc bindings).
pub fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1)) // real, effective, saved, fs
        == Some("0")
}

/// Whether we run under CI (`CI=true`, as GitHub Actions and most CI systems set it).
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|ci| ci.eq_ignore_ascii_case("true") || ci == "1")
}

/// `program arg arg ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `cmd` with inherited stdio; fail unless it exits with status 0.
pub fn run_inherit(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    check_status(cmd, status)
}

/// Run `cmd` capturing stdout and stderr, whatever its exit status.
pub fn run_captured(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))
}

/// Run `cmd` capturing its output; on failure, the error carries the tail of that output.
pub fn run_quiet(cmd: &mut Command) -> Result<Output> {
    let output = run_captured(cmd)?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        bail!(
            "`{}` failed ({}); last lines of its output:\n{tail}",
            describe(cmd),
            output.status
        );
    }
    Ok(output)
}

fn check_status(cmd: &Command, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{}` failed ({status})", describe(cmd))
    }
}

/// The exit code a shell would report for `status` (128 + signal when killed by a signal).
pub fn exit_code_of(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

pub fn fmt_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!(
            "{}m{:02}s",
            duration.as_secs() / 60,
            duration.as_secs() % 60
        )
    }
}

// Signal handling for a child we wait on (`cargo xtask run`). Ctrl-C reaches the child directly
// (it is in the terminal's foreground process group with us), so we only keep SIGINT from
// killing xtask before the child has cleaned up, and pass SIGTERM/SIGHUP on to the child.
// Handlers (unlike SIG_IGN) are reset to the default by execve, so children are unaffected.

const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" {
    // From the C library that std already links; `signal` has BSD semantics (SA_RESTART) on
    // glibc and musl.
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
}

extern "C" fn on_signal(signum: i32) {
    let pid = CHILD_PID.load(Ordering::Relaxed);
    if signum != SIGINT && pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; pid is our own child, not yet reaped.
        unsafe { kill(pid, signum) };
    }
}

/// Keep xtask alive through Ctrl-C and forward termination requests to `child_pid`, while we
/// wait for that child.
pub fn shield_signals_for_child(child_pid: u32) {
    CHILD_PID.store(i32::try_from(child_pid).unwrap_or(0), Ordering::Relaxed);
    for signum in [SIGINT, SIGTERM, SIGHUP] {
        // SAFETY: installs a handler that only touches an atomic and calls kill(2).
        unsafe { signal(signum, on_signal) };
    }
}

/// Called once the child has been reaped, so a late signal cannot hit a recycled pid.
pub fn forget_child() {
    CHILD_PID.store(0, Ordering::Relaxed);
}
