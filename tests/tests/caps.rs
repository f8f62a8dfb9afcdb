//! Least privilege, proven: the whole cluster test with agents that hold exactly CAP_BPF
//! and CAP_NET_ADMIN (as the DaemonSet grants), run through `setpriv`. Local and remote
//! backends must answer through both nodes.

use std::{collections::BTreeSet, os::unix::fs::PermissionsExt, time::Duration};

use tests::{
    client,
    netns::{require_root, require_tool, run_id, TempDir},
    testbed::{default_agent_path, Testbed, TestbedOptions},
};

#[test]
fn agents_with_only_cap_bpf_and_cap_net_admin_serve_the_cluster() {
    if !require_root() {
        return;
    }
    require_tool("setpriv", "util-linux");
    let dir = TempDir::new(&run_id(), "caps");
    let wrapper = dir.path().join("agent-bpf-netadmin");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,+bpf,+net_admin --inh-caps=-all -- {} \"$@\"\n",
            default_agent_path().display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let echo = std::env::var_os("NP_ECHO")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_np-echo").into());
    let mut tb = Testbed::start(TestbedOptions::standard(echo).with_agent(wrapper));
    if let Err(e) = tb.wait_for_service(Duration::from_secs(30)) {
        panic!("agents with CAP_BPF + CAP_NET_ADMIN did not serve: {e}");
    }
    let mut seen = BTreeSet::new();
    for node in ["node1", "node2"] {
        for r in client::http_get_many(tb.cluster().client(), tb.nodeport_addr(node), 30) {
            let r = r.unwrap_or_else(|e| panic!("request via {node}: {e}\n{}", tb.agent_logs()));
            seen.insert(r.from);
        }
    }
    assert_eq!(
        seen,
        ["pa1", "pa2", "pb1"].map(String::from).into(),
        "{}",
        tb.agent_logs()
    );

    // The agents really run with those two capabilities only.
    let mut checked = 0;
    for pid in tb.cluster().node("node1").ns().pids() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.lines().any(|l| l == "Name:\tnodeport-agent") {
            let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:\t"));
            // CAP_NET_ADMIN (bit 12) and CAP_BPF (bit 39).
            assert_eq!(eff, Some("0000008000001000"), "agent capabilities");
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "node1's agent process not found");
}
