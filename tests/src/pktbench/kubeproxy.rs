//! The rules kube-proxy writes for a [`ServiceSet`], as pure functions: its iptables mode
//! (an `iptables-restore` input: KUBE-SERVICES -> KUBE-NODEPORTS -> KUBE-EXT-* ->
//! KUBE-SVC-* -> KUBE-SEP-* with `statistic` random picks, KUBE-MARK-MASQ and the
//! KUBE-POSTROUTING masquerade) and its nftables mode (an `nft -f` input: table
//! `ip kube-proxy`, the `service-ips` and `service-nodeports` verdict maps, per-service
//! chains with `numgen random` verdict maps to endpoint chains doing the DNAT, masquerade by
//! mark). Modelled on kube-proxy's pkg/proxy/iptables and pkg/proxy/nftables for
//! externalTrafficPolicy Cluster, a TCP port per service (and a UDP one on the same
//! nodePort when the set has them); health-check and
//! firewall chains that NodePort traffic does not cross are left out.

use std::{fmt::Write as _, net::Ipv4Addr, process::Command};

use crate::{
    netns::Netns,
    pktbench::{services::ServiceSet, services::TARGET_PORT},
};

/// Cluster IPs: service `i` has `CLUSTER_NET + 1 + i` (never routed; rules match on them).
const CLUSTER_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 0);
/// The pod CIDR the masquerade rules exempt (kube-proxy's --cluster-cidr).
const POD_CIDR: &str = "198.19.0.0/16";
const SERVICE_PORT: u16 = 80;

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(CLUSTER_NET) + 1 + i as u32)
}

/// A 16-character chain-name hash (kube-proxy: base32 of a SHA-256, cut to 16).
fn hash16(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let digits = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    for k in 0..16 {
        let v = if k < 12 {
            h >> (k * 5)
        } else {
            h.rotate_left(k as u32 * 7)
        };
        out.push(digits[(v & 31) as usize] as char);
    }
    out
}

/// kube-proxy's name of a service port: `namespace/name:port`.
fn svc_id(set: &ServiceSet, i: usize, port: &str) -> String {
    format!("bench/{}:{port}", set.name(i))
}

fn ep_id(set: &ServiceSet, i: usize, port: &str, e: usize) -> String {
    format!(
        "{}:{}:{TARGET_PORT}",
        svc_id(set, i, port),
        set.endpoint(i, e)
    )
}

/// kube-proxy's iptables mode, as one `iptables-restore` input (filter and nat tables).
pub fn iptables_ruleset(set: &ServiceSet) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut nodeports = String::new();
    for (i, (proto, port)) in set.ports() {
        let id = svc_id(set, i, port);
        let h = hash16(&id);
        let (svc, ext) = (format!("KUBE-SVC-{h}"), format!("KUBE-EXT-{h}"));
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
        let cip = cluster_ip(i);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {cip}/32 -p {proto} -m comment --comment \"{id} cluster IP\" -m {proto} --dport {SERVICE_PORT} -j {svc}"
        );
        let _ = writeln!(
            nodeports,
            "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{id}\" -m {proto} --dport {} -j {ext}",
            set.node_port(i)
        );
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {POD_CIDR} -d {cip}/32 -p {proto} -m comment --comment \"{id} cluster IP\" -m {proto} --dport {SERVICE_PORT} -j KUBE-MARK-MASQ"
        );
        for e in 0..set.endpoints {
            let ep = set.endpoint(i, e);
            let sep = format!("KUBE-SEP-{}", hash16(&ep_id(set, i, port, e)));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = set.endpoints - e;
            let pick = if left > 1 {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{id} -> {ep}:{TARGET_PORT}\"{pick} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ\n-A {sep} -p {proto} -m comment --comment \"{id}\" -m {proto} -j DNAT --to-destination {ep}:{TARGET_PORT}"
            );
        }
    }
    let mut s = String::new();
    s.push_str("*filter\n:KUBE-FORWARD - [0:0]\n");
    s.push_str("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n");
    s.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    s.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    s.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    s.push_str("COMMIT\n*nat\n");
    s.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    s.push_str(&chains);
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    s.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    s.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    s.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    s.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    s.push_str(&rules);
    s.push_str(&nodeports);
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    s.push_str("COMMIT\n");
    s
}

/// kube-proxy's nftables mode, as one `nft -f` input (table `ip kube-proxy`).
pub fn nft_ruleset(set: &ServiceSet, node_addr: Ipv4Addr) -> String {
    let mut chains = String::new();
    let mut service_ips = Vec::new();
    let mut nodeports = Vec::new();
    for (i, (proto, port)) in set.ports() {
        let id = svc_id(set, i, port);
        let h = &hash16(&id)[..8];
        let name = format!("bench/{}/{proto}/{port}", set.name(i));
        let svc = format!("service-{h}-{name}");
        let ext = format!("external-{h}-{name}");
        let cip = cluster_ip(i);
        service_ips.push(format!("{cip} . {proto} . {SERVICE_PORT} : goto {svc}"));
        nodeports.push(format!("{proto} . {} : goto {ext}", set.node_port(i)));
        let mut vmap = Vec::new();
        for e in 0..set.endpoints {
            let ep = set.endpoint(i, e);
            let eh = &hash16(&ep_id(set, i, port, e))[..8];
            let epc = format!("endpoint-{eh}-{name}__{ep}/{TARGET_PORT}");
            vmap.push(format!("{e} : goto {epc}"));
            let _ = writeln!(
                chains,
                "  chain {epc} {{\n    ip saddr {ep} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {ep}:{TARGET_PORT}\n  }}"
            );
        }
        let _ = writeln!(
            chains,
            "  chain {svc} {{\n    ip daddr {cip} {proto} dport {SERVICE_PORT} ip saddr != {POD_CIDR} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            set.endpoints,
            vmap.join(", ")
        );
        let _ = writeln!(
            chains,
            "  chain {ext} {{\n    jump mark-for-masquerade\n    goto {svc}\n  }}"
        );
    }
    let mut s = String::new();
    s.push_str("table ip kube-proxy {\n  comment \"rules for kube-proxy\"\n");
    s.push_str("  set nodeport-ips {\n    type ipv4_addr\n");
    let _ = writeln!(s, "    elements = {{ {node_addr} }}\n  }}");
    s.push_str("  map no-endpoint-services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n  }\n");
    s.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    let _ = writeln!(
        s,
        "    elements = {{ {} }}\n  }}",
        service_ips.join(",\n      ")
    );
    s.push_str("  map service-nodeports {\n    type inet_proto . inet_service : verdict\n");
    let _ = writeln!(
        s,
        "    elements = {{ {} }}\n  }}",
        nodeports.join(",\n      ")
    );
    s.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    s.push_str("  chain masquerading {\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
    s.push_str("  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n    ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n  }\n");
    s.push_str("  chain service-endpoints-check {\n    ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n  }\n");
    s.push_str("  chain filter-forward {\n    type filter hook forward priority -110; policy accept;\n    ct state new jump service-endpoints-check\n  }\n");
    s.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority -100; policy accept;\n    jump services\n  }\n");
    s.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    s.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority 100; policy accept;\n    jump masquerading\n  }\n");
    s.push_str(&chains);
    s.push_str("}\n");
    s
}

/// Loads an `iptables-legacy-restore` input into `ns` (`--test`: only check it).
pub fn iptables_restore(ns: &Netns, rules: &str, test: bool) {
    let mut argv = vec!["iptables-legacy-restore"];
    if test {
        argv.push("--test");
    }
    feed(ns.command(argv[0]).args(&argv[1..]), rules);
}

/// Loads an `nft -f` input into `ns` (`check`: `nft -c`, only check it).
pub fn nft_load(ns: &Netns, rules: &str, check: bool) {
    let argv: &[&str] = if check {
        &["-c", "-f", "-"]
    } else {
        &["-f", "-"]
    };
    feed(ns.command("nft").args(argv), rules);
}

/// Runs `cmd` with `input` on its stdin; panics with its stderr when it fails.
fn feed(cmd: &mut Command, input: &str) {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("wait");
    let _ = writer.join();
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{require_root, run_id};

    fn count(s: &str, needle: &str) -> usize {
        s.lines().filter(|l| l.contains(needle)).count()
    }

    #[test]
    fn iptables_ruleset_has_kube_proxy_chains() {
        let set = ServiceSet::with_endpoints(3, 4);
        let r = iptables_ruleset(&set);
        assert_eq!(count(&r, "-A KUBE-NODEPORTS "), 3);
        assert_eq!(count(&r, ":KUBE-SVC-"), 3);
        assert_eq!(count(&r, ":KUBE-EXT-"), 3);
        assert_eq!(count(&r, ":KUBE-SEP-"), 3 * set.endpoints);
        assert_eq!(
            count(&r, "--mode random --probability"),
            3 * (set.endpoints - 1)
        );
        assert_eq!(count(&r, "-j DNAT --to-destination"), 3 * set.endpoints);
        assert!(r.contains("--dport 20002 -j KUBE-EXT-"));
        assert!(r.contains("-j MASQUERADE --random-fully"));
        assert!(r.contains("--probability 0.25000000000"), "1/4 first");
        assert!(r.contains("--probability 0.50000000000"), "then 1/2");
        assert!(r.trim_end().ends_with("COMMIT"));
    }

    #[test]
    fn nft_ruleset_has_kube_proxy_maps_and_chains() {
        let set = ServiceSet::with_endpoints(3, 4);
        let r = nft_ruleset(&set, Ipv4Addr::new(198, 18, 0, 1));
        assert!(r.starts_with("table ip kube-proxy {"));
        assert!(r.contains("map service-nodeports {"));
        assert!(r.contains("tcp . 20001 : goto external-"));
        assert_eq!(count(&r, "numgen random mod 4 vmap"), 3);
        assert_eq!(count(&r, "dnat to 198.19."), 3 * set.endpoints);
        assert!(r.contains("masquerade fully-random"));
    }

    #[test]
    fn chain_names_are_distinct() {
        let set = ServiceSet::new(1000);
        let r = iptables_ruleset(&set);
        let mut names: Vec<&str> = r.lines().filter(|l| l.starts_with(':')).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    /// The kernel's own parsers accept both rulesets (privileged: a namespace).
    #[test]
    fn rulesets_are_accepted_by_iptables_and_nft() {
        if !require_root() {
            return;
        }
        let ns = Netns::new(&format!("np-{}-kpr", run_id()));
        let set = ServiceSet::new(3);
        iptables_restore(&ns, &iptables_ruleset(&set), true);
        nft_load(&ns, &nft_ruleset(&set, Ipv4Addr::new(198, 18, 0, 1)), true);
    }
}
