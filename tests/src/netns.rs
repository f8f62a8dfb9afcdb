//! RAII guards for network namespaces, child processes, temp dirs and BPF pins, built on the
//! `ip` and `nsenter` commands, plus `run_in` (run a closure inside a namespace) and the
//! cleanup of leftovers from crashed runs.
//!
//! Processes are started with `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the latter
//! also unshares the mount namespace and remounts /sys, which hides /sys/fs/bpf (pins) from
//! the child (iproute2 `ip/ipnetns.c`, `netns_switch`).

use std::{
    collections::hash_map::RandomState,
    fs::{self, File},
    hash::{BuildHasher, Hasher},
    io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant, SystemTime},
};

use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Prefix of every name this harness creates (namespaces, pins, temp dirs).
pub const PREFIX: &str = "np-";
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// Where BPF pins live.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Marker file in temp dirs created by [`TempDir`], so cleanup only removes our own dirs.
const TEMP_MARKER: &str = ".np-harness";
/// Live runs register here (`<run id>` holding the owner's pid, see [`RunLease`]) so a
/// cleanup started while other tests run leaves their namespaces alone.
pub const RUNS_DIR: &str = "/run/np-runs";

/// Registers a run id or a full `np-*` name as live (file `/run/np-runs/<key>` holding this
/// process's pid) until dropped; [`cleanup_leftovers`] skips names whose run id or full name
/// has a live lease. Every [`Netns`] holds one for its name, a [`Cluster`](crate::cluster::Cluster)
/// one for its run id (covering its pins and temp dirs).
#[derive(Debug)]
pub struct RunLease {
    path: PathBuf,
}

impl RunLease {
    pub fn new(key: &str) -> RunLease {
        assert!(
            !key.contains('/'),
            "lease key {key:?} must be one path component"
        );
        let path = Path::new(RUNS_DIR).join(key);
        if let Err(e) = fs::create_dir_all(RUNS_DIR)
            .and_then(|()| fs::write(&path, std::process::id().to_string()))
        {
            eprintln!("warning: cannot register {key} in {RUNS_DIR}: {e}");
        }
        RunLease { path }
    }
}

impl Drop for RunLease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether `key` (a run id or a full name) has a lease whose owner process is alive.
pub fn run_is_live(key: &str) -> bool {
    fs::read_to_string(Path::new(RUNS_DIR).join(key))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(|pid| kill(Pid::from_raw(pid), None).is_ok())
}

/// The run id in a name `np-<id>-...` (or `np-<id>`).
pub fn run_id_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    Some(rest.split('-').next().unwrap_or(rest)).filter(|s| !s.is_empty())
}

fn owned_by_live_run(name: &str) -> bool {
    run_is_live(name) || run_id_of(name).is_some_and(run_is_live)
}

/// A short id, unique per call in practice (6 base-36 chars from the pid, the clock, a
/// counter and a randomly keyed hash), used in every name of one run.
pub fn run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    let mut v = h.finish();
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = String::with_capacity(6);
    for _ in 0..6 {
        s.push(digits[(v % 36) as usize] as char);
        v /= 36;
    }
    s
}

/// Whether privileged tests can run. Not root: panics when `CI=true` (a privileged test
/// that cannot run in CI is a failure), else prints a loud message and returns false.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg = "this test needs root (network namespaces, veths, XDP); run it with sudo";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: not skipping)");
    }
    eprintln!("\n!!!!!!!!!! SKIPPED: {msg} !!!!!!!!!!\n");
    false
}

/// Runs a command to completion; panics with its stderr when it cannot start or fails.
pub fn run_checked(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    out
}

/// `run_checked` for an argv slice.
pub fn sh(argv: &[&str]) -> Output {
    let (prog, args) = argv.split_first().expect("empty argv");
    run_checked(Command::new(prog).args(args))
}

/// Panics with a hint when a tool the harness needs is missing.
pub fn require_tool(name: &str, hint: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        panic!("`{name}` is not installed; {hint}");
    }
}

/// A named network namespace (`ip netns add`), deleted on drop together with the processes
/// still running in it (which would otherwise keep it, and its veths, alive).
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Keeps concurrent cleanups away while this guard lives; released after the delete.
    _lease: RunLease,
}

impl Netns {
    /// Creates the namespace `name` (must start with `np-`) and brings its `lo` up.
    pub fn new(name: &str) -> Netns {
        assert!(
            name.starts_with(PREFIX),
            "namespace name {name:?} must start with {PREFIX}"
        );
        assert!(
            !Path::new(NETNS_DIR).join(name).exists(),
            "namespace {name} already exists (run id collision or leftover)"
        );
        let lease = RunLease::new(name);
        sh(&["ip", "netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
            _lease: lease,
        };
        ns.ip("link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the handle to pass to `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A `Command` that runs `program` inside this namespace (network namespace only; the
    /// mount namespace, so /sys/fs/bpf, stays the caller's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `argv` inside the namespace and returns its output; panics when it fails.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let (prog, args) = argv.split_first().expect("empty argv");
        run_checked(self.command(prog).args(args))
    }

    /// Runs `argv` inside the namespace; returns the output whatever the exit status.
    pub fn try_exec(&self, argv: &[&str]) -> io::Result<Output> {
        let (prog, args) = argv.split_first().expect("empty argv");
        self.command(prog).args(args).stdin(Stdio::null()).output()
    }

    /// `ip -n NAME <args>` with whitespace-separated args; panics when it fails.
    pub fn ip(&self, args: &str) {
        let mut c = Command::new("ip");
        c.arg("-n").arg(&self.name).args(args.split_whitespace());
        run_checked(&mut c);
    }

    /// Loads the nftables `ruleset` inside the namespace (`nft -f -`); panics when it fails.
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nft in {}: {e}", self.name));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(ruleset.as_bytes())
            .unwrap_or_else(|e| panic!("writing to nft in {}: {e}", self.name));
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for nft in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "nft -f - in {} failed ({}): {}\n{ruleset}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// Sets a sysctl inside the namespace (`/proc/sys/net` is per network namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// `ethtool -K IF <features...>` inside the namespace.
    pub fn ethtool_k(&self, ifname: &str, features: &[&str]) {
        let mut argv = vec!["ethtool", "-K", ifname];
        argv.extend_from_slice(features);
        self.exec(&argv);
    }

    /// Starts `argv` inside the namespace. stdout and stderr go to `log` (appended) or are
    /// discarded. The child is in its own process group (a terminal Ctrl-C reaches only the
    /// harness, which then stops its children in order) and gets SIGKILL when the thread that
    /// spawned it dies (`PR_SET_PDEATHSIG`), so do not spawn from a short-lived thread.
    pub fn spawn(&self, argv: &[&str], log: Option<&Path>) -> Child {
        let (prog, args) = argv.split_first().expect("empty argv");
        let mut c = self.command(prog);
        c.args(args).stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()));
                let f2 = f.try_clone().expect("dup log fd");
                c.stdout(f).stderr(f2);
            }
            None => {
                c.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        c.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?} in {}: {e}", self.name));
        Child {
            name: format!("{} in {}", prog, self.name),
            child,
            log: log.map(Path::to_path_buf),
            term_grace: None,
        }
    }

    /// Pids of the processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        netns_pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_netns_pids(&self.name);
        if !self.path().exists() {
            eprintln!(
                "warning: namespace {} vanished before its guard dropped (a concurrent cleanup?)",
                self.name
            );
            return;
        }
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}

fn netns_pids(name: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != me)
        .collect()
}

/// SIGKILLs the processes in namespace `name` (ours: the harness started them there) and
/// waits, bounded, until they are gone so the namespace really goes away on delete.
fn kill_netns_pids(name: &str) {
    let pids = netns_pids(name);
    if pids.is_empty() {
        return;
    }
    for &p in &pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !netns_pids(name).is_empty() {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a fresh thread whose network namespace is `ns` (`setns(CLONE_NEWNET)` is per
/// thread), so std sockets created in `f` live in `ns`. Sockets keep their namespace when
/// they are moved out and used from other threads. Panics in `f` propagate.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(ns: &Netns, f: F) -> T {
    run_in_path(&ns.path(), f)
}

/// [`run_in`] with a namespace handle path (e.g. `/run/netns/NAME`).
pub fn run_in_path<T: Send, F: FnOnce() -> T + Send>(path: &Path, f: F) -> T {
    thread::scope(|s| {
        let handle = s.spawn(move || {
            let fd = File::open(path)
                .unwrap_or_else(|e| panic!("cannot open netns {}: {e}", path.display()));
            setns(&fd, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns({}) failed: {e}", path.display()));
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// A spawned process, killed and reaped on drop (SIGKILL, or SIGTERM first when a grace
/// period is set with [`Child::with_term_grace`]).
#[derive(Debug)]
pub struct Child {
    name: String,
    child: std::process::Child,
    log: Option<PathBuf>,
    term_grace: Option<Duration>,
}

impl Child {
    /// On drop, send SIGTERM and wait up to `grace` before SIGKILL (for processes that must
    /// clean up, like the agent detaching its programs).
    pub fn with_term_grace(mut self, grace: Duration) -> Child {
        self.term_grace = Some(grace);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The log file's content (empty without a log).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.try_wait() {
            return Some(st);
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: {} did not exit {grace:?} after SIGTERM; killing",
            self.name
        );
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.try_wait() {
            return Some(st);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        match self.term_grace {
            Some(g) => self.terminate(g),
            None => self.kill(),
        };
    }
}

/// A temp dir `$TMPDIR/np-<id>-<what>`, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(run_id: &str, what: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{PREFIX}{run_id}-{what}"));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        fs::write(path.join(TEMP_MARKER), b"")
            .unwrap_or_else(|e| panic!("cannot write marker in {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after drop (for debugging); returns its path.
    pub fn keep(self) -> PathBuf {
        let p = self.path.clone();
        std::mem::forget(self);
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("warning: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A BPF pin path (file or directory under /sys/fs/bpf), removed on drop.
#[derive(Debug)]
pub struct PinPath {
    path: PathBuf,
}

impl PinPath {
    /// `/sys/fs/bpf/<name>`; `name` must start with `np-`. Nothing is created.
    pub fn new(name: &str) -> PinPath {
        assert!(
            name.starts_with(PREFIX),
            "pin name {name:?} must start with {PREFIX}"
        );
        assert!(
            !name.contains('/'),
            "pin name {name:?} must be one path component"
        );
        PinPath {
            path: Path::new(BPFFS).join(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinPath {
    fn drop(&mut self) {
        remove_any(&self.path);
    }
}

fn remove_any(path: &Path) {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(e) = res {
        eprintln!("warning: cannot remove {}: {e}", path.display());
    }
}

/// Mounts bpffs on /sys/fs/bpf when it is not mounted yet (systemd usually does this; a
/// bare VM may not), so agents can pin.
pub fn ensure_bpffs() {
    const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;
    let mounted = nix::sys::statfs::statfs(BPFFS)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if !mounted {
        sh(&["mount", "-t", "bpf", "bpf", BPFFS]);
    }
}

/// What [`cleanup_leftovers`] removed, and what it left because its run is still live.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub namespaces: Vec<String>,
    pub pins: Vec<PathBuf>,
    pub temp_dirs: Vec<PathBuf>,
    pub skipped_live: Vec<String>,
}

/// Removes everything earlier runs left: `np-*` namespaces (and the processes in them),
/// `/sys/fs/bpf/np-*` pins, `$TMPDIR/np-*` dirs carrying the harness marker, and stale run
/// leases. Names of runs that are still live (a [`RunLease`] whose process is alive) are
/// skipped, so it is safe while other test runs are in progress.
pub fn cleanup_leftovers() -> CleanupReport {
    cleanup_matching(|_| true)
}

/// [`cleanup_leftovers`] restricted to `np-*` names for which `select` is true.
pub fn cleanup_matching(select: impl Fn(&str) -> bool) -> CleanupReport {
    let mut report = CleanupReport::default();
    let skip = |name: &str, report: &mut CleanupReport| {
        if !select(name) {
            return true;
        }
        let live = owned_by_live_run(name);
        if live {
            report.skipped_live.push(name.to_string());
        }
        live
    };
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !skip(&name, &mut report) {
                kill_netns_pids(&name);
                let _ = Command::new("ip").args(["netns", "delete", &name]).output();
                report.namespaces.push(name);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !skip(&name, &mut report) {
                remove_any(&e.path());
                report.pins.push(e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && p.join(TEMP_MARKER).exists() && !skip(&name, &mut report)
            {
                let _ = fs::remove_dir_all(&p);
                report.temp_dirs.push(p);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(RUNS_DIR) {
        for e in entries.flatten() {
            let key = e.file_name().to_string_lossy().into_owned();
            if select(&format!("{PREFIX}{key}")) && select(&key) && !run_is_live(&key) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    report
}

/// Names of the existing `np-*` namespaces (for leak checks).
pub fn list_np_namespaces() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// A namespace shaped like node1 of the test cluster, for driving the datapath with
/// BPF_PROG_TEST_RUN: `lan0` (02:00:00:00:00:0b, 198.18.0.11/24) is a veth towards a peer
/// namespace; the client (198.18.0.10, 02:..:0a) and the peer node (198.18.0.12, 02:..:0c)
/// are permanent neighbours; 198.19.2.0/24 is routed via the peer node; forwarding is on.
pub struct NodeLan {
    pub ns: Netns,
    /// The other end of `lan0` (kept so the link stays up).
    pub peer: Netns,
    /// `lan0`'s ifindex.
    pub lan0: u32,
}

impl NodeLan {
    /// Namespaces `np-<run id>-<tag>` and `np-<run id>-<tag>p`.
    pub fn new(tag: &str) -> NodeLan {
        let id = run_id();
        let ns = Netns::new(&format!("np-{id}-{tag}"));
        let peer = Netns::new(&format!("np-{id}-{tag}p"));
        ns.ip(&format!(
            "link add lan0 type veth peer name lanp netns {}",
            peer.name()
        ));
        ns.ip("link set lan0 address 02:00:00:00:00:0b");
        ns.ip("addr add 198.18.0.11/24 dev lan0");
        ns.ip("link set lan0 up");
        peer.ip("link set lanp up");
        ns.ip("neigh replace 198.18.0.10 lladdr 02:00:00:00:00:0a dev lan0 nud permanent");
        ns.ip("neigh replace 198.18.0.12 lladdr 02:00:00:00:00:0c dev lan0 nud permanent");
        ns.ip("route add 198.19.2.0/24 via 198.18.0.12 dev lan0");
        ns.sysctl("net.ipv4.conf.all.forwarding", "1");
        ns.sysctl("net.ipv4.conf.lan0.forwarding", "1");
        // The same over IPv6: fd00:18::11/64, client ::10 and node2 ::12 as permanent
        // neighbours, node2's pods (fd00:19:2::/64) via node2.
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        ns.ip("addr add fd00:18::11/64 dev lan0 nodad");
        ns.ip("neigh replace fd00:18::10 lladdr 02:00:00:00:00:0a dev lan0 nud permanent");
        ns.ip("neigh replace fd00:18::12 lladdr 02:00:00:00:00:0c dev lan0 nud permanent");
        ns.ip("route add fd00:19:2::/64 via fd00:18::12 dev lan0");
        let lan0 = run_in(&ns, || {
            nix::net::if_::if_nametoindex("lan0").expect("lan0 ifindex")
        });
        NodeLan { ns, peer, lan0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_short_and_distinct() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| run_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids
            .iter()
            .all(|i| i.len() == 6 && i.bytes().all(|b| b.is_ascii_alphanumeric())));
    }

    #[test]
    fn run_id_of_names() {
        assert_eq!(run_id_of("np-abc123-node1"), Some("abc123"));
        assert_eq!(run_id_of("np-abc123"), Some("abc123"));
        assert_eq!(run_id_of("np-"), None);
        assert_eq!(run_id_of("other"), None);
    }

    #[test]
    fn lease_marks_run_live_until_dropped() {
        if !require_root() {
            return;
        }
        let id = run_id();
        let lease = RunLease::new(&id);
        assert!(run_is_live(&id));
        assert!(owned_by_live_run(&format!("np-{id}-node1")));
        drop(lease);
        assert!(!run_is_live(&id));
    }

    #[test]
    fn cleanup_spares_live_runs_and_removes_dead_ones() {
        if !require_root() {
            return;
        }
        let id = run_id();
        let mine = |n: &str| run_id_of(n) == Some(id.as_str());
        let live = Netns::new(&format!("np-{id}-live"));
        // A leftover: a namespace whose guard is gone without deleting it.
        let dead = format!("np-{id}-dead");
        sh(&["ip", "netns", "add", &dead]);
        let report = cleanup_matching(mine);
        assert_eq!(report.namespaces, vec![dead.clone()]);
        assert!(report.skipped_live.contains(&live.name().to_string()));
        assert!(live.path().exists());
        assert!(!Path::new(NETNS_DIR).join(&dead).exists());
    }

    #[test]
    fn netns_guard_runs_closure_inside_and_cleans_up() {
        if !require_root() {
            return;
        }
        let name = format!("np-{}-unit", run_id());
        {
            let ns = Netns::new(&name);
            let bound = run_in(&ns, || std::net::TcpListener::bind("127.0.0.1:0").is_ok());
            assert!(bound);
            let out = ns.exec(&["ip", "-o", "link"]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                text.lines().count(),
                1,
                "fresh namespace has only lo: {text}"
            );
            let mut child = ns.spawn(&["sleep", "30"], None);
            assert!(child.try_wait().is_none());
            // nsenter enters the namespace just after it starts: wait for it (bounded).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while ns.pids().is_empty() && std::time::Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(ns.pids(), vec![child.pid() as i32]);
        }
        assert!(
            !Path::new(NETNS_DIR).join(&name).exists(),
            "namespace {name} leaked"
        );
    }

    #[test]
    fn netns_is_deleted_after_panic() {
        if !require_root() {
            return;
        }
        let name = format!("np-{}-panic", run_id());
        let n2 = name.clone();
        let r = std::panic::catch_unwind(move || {
            let _ns = Netns::new(&n2);
            panic!("boom");
        });
        assert!(r.is_err());
        assert!(
            !Path::new(NETNS_DIR).join(&name).exists(),
            "namespace {name} leaked"
        );
    }
}
