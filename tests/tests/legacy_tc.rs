//! TC attachment without TCX (what Linux before 6.6 gets, forced here with
//! `--tc-attach legacy`, and `--xdp-mode tc` so that every packet goes through the
//! filters): cls_bpf filters on a clsact qdisc serve both nodes, survive SIGKILL and are
//! replaced in place by the restarted agent without breaking a connection, and on exit
//! exactly what the agent added goes: its filters always, the qdisc only if it added it.
//! A start that fails leaves nothing behind. Needs root.

use std::{thread, time::Duration};

use tests::{
    client::{self, KeepAliveConn},
    neighbour::{Hook, Neighbour},
    netns::{require_root, Netns, PinPath, TempDir},
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};

use aya::programs::tc::TcAttachType;

const AGENT_WAIT: Duration = Duration::from_secs(30);

fn legacy_opts() -> TestbedOptions {
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let mut opts = TestbedOptions::standard(echo).with_agent(default_agent_path());
    opts.agent_args = ["--tc-attach", "legacy", "--xdp-mode", "tc"]
        .map(String::from)
        .to_vec();
    opts
}

/// `tc filter show dev lan0 <dir>` in `ns`.
fn filters(ns: &Netns, dir: &str) -> String {
    let out = ns.exec(&["tc", "filter", "show", "dev", "lan0", dir]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_clsact(ns: &Netns) -> bool {
    let out = ns.exec(&["tc", "qdisc", "show", "dev", "lan0"]);
    String::from_utf8_lossy(&out.stdout).contains("clsact")
}

/// nodeport's two filters, once each, at its priority.
fn assert_ours_once(ns: &Netns, when: &str) {
    for (dir, prog) in [("ingress", "np_tc_in"), ("egress", "np_tc_out")] {
        let f = filters(ns, dir);
        let ours = f
            .lines()
            .filter(|l| l.contains(&format!("{prog} direct-action")));
        assert_eq!(ours.count(), 1, "{when}: {dir} filters:\n{f}");
        assert!(
            f.contains("pref 4096") && f.contains("direct-action"),
            "{when}: {f}"
        );
    }
}

#[test]
fn filters_serve_survive_sigkill_and_leave_with_the_agent() {
    if !require_root() {
        return;
    }
    let mut tb = Testbed::serving(legacy_opts());
    let ns = tb.cluster().node("node1").ns();
    assert_ours_once(ns, "after start");
    assert!(tb
        .agent_log("node1")
        .contains("cls_bpf filters: --tc-attach legacy"));
    let addr = tb.nodeport_addr("node1");
    let mut conn = KeepAliveConn::connect(tb.cluster().client(), addr).expect("connect");
    let first = conn.request().expect("first request");

    // SIGKILL: the filters stay and serve; the next agent replaces their programs.
    tb.kill_agent("node1");
    assert_eq!(conn.request().expect("no agent"), first);
    tb.restart_agent("node1");
    let back = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
        let log = tb.agent_log("node1");
        log.contains("replaced=true") && log.contains("synced")
    });
    assert!(
        back,
        "the restarted agent did not take over\n{}",
        tb.agent_logs()
    );
    for _ in 0..10 {
        assert_eq!(conn.request().expect("across the restart"), first);
        thread::sleep(Duration::from_millis(50));
    }
    let ns = tb.cluster().node("node1").ns();
    assert_ours_once(ns, "after the restart");
    assert!(client::http_get(tb.cluster().client(), addr).is_ok());

    // SIGTERM: the filters go, and the qdisc the agent added.
    let status = tb.stop_agent("node1").expect("exit");
    assert!(status.success(), "{status:?}\n{}", tb.agent_logs());
    let ns = tb.cluster().node("node1").ns();
    assert!(
        !filters(ns, "ingress").contains("np_tc"),
        "{}",
        filters(ns, "ingress")
    );
    assert!(!has_clsact(ns), "the agent's qdisc is left");

    // Another tool's qdisc and filter: the agent adds its filters beside them and on exit
    // removes its own only.
    let other = Neighbour::attach(ns, "lan0", TcAttachType::Ingress, Hook::Legacy);
    tb.restart_agent("node1");
    let served = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
        tb.agent_log("node1").contains("synced")
            && client::http_get(tb.cluster().client(), addr).is_ok()
    });
    assert!(served, "{}", tb.agent_logs());
    let ns = tb.cluster().node("node1").ns();
    assert_ours_once(ns, "beside another tool");
    // nodeport's filter runs first (priority 4096, the other tool's got the kernel's
    // 49152) and passes on what it leaves to the stack: the node's own traffic, here a
    // ping. (A nodePort packet it redirects to another node is final, as it should be.)
    let seen = other.count();
    let ip = tb.cluster().node_ip("node1").to_string();
    tb.cluster()
        .client()
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &ip]);
    assert!(
        other.count() >= seen + 3,
        "the other tool's filter saw {} packets",
        other.count() - seen
    );
    tb.stop_agent("node1").expect("exit");
    let ns = tb.cluster().node("node1").ns();
    let left = filters(ns, "ingress");
    assert!(
        !left.contains("np_tc") && left.contains("test_neighbour"),
        "{left}"
    );
    assert!(has_clsact(ns), "the other tool's qdisc was removed");
    drop(other);
}

#[test]
fn a_failed_start_leaves_nothing() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let tb = Testbed::start(TestbedOptions::standard(echo));
    let ns = tb.cluster().node("node1").ns();
    let dir = TempDir::new(tb.cluster().run_id(), "failed-start");
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    let pin = PinPath::new(&format!("np-{}-failed", tb.cluster().run_id()));
    let agent = default_agent_path();
    let (m, p) = (
        dir.path().join("m").display().to_string(),
        pin.path().display().to_string(),
    );
    let out = ns
        .try_exec(&[
            agent.to_str().unwrap(),
            "--interface",
            "lan0",
            "--interface",
            "nosuch0",
            "--node-name",
            "node1",
            "--manifests",
            &m,
            "--pin-path",
            &p,
            "--tc-attach",
            "legacy",
            "--xdp-mode",
            "tc",
            "--health-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .expect("run the agent");
    assert!(
        !out.status.success(),
        "the agent started with a missing interface"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch0"), "{err}");
    for dir in ["ingress", "egress"] {
        let f = filters(ns, dir);
        assert!(!f.contains("np_tc"), "{dir} filters left: {f}");
    }
    assert!(!has_clsact(ns), "qdisc left after a failed start");
    assert!(!pin.path().exists(), "pins left after a failed start");
}
