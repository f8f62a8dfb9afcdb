//! Packet-rate benchmark (issues 5 and 12): frames circulate generator -> node -> sink ->
//! generator through three network namespaces (rewritten by an XDP generator on every
//! lap), and the node is, in turn, an untouched redirect (the ceiling), a bare XDP
//! forwarder, the nodeport agent, or kube-proxy's iptables or nftables rules; plus the
//! datapath's per-path costs through plain BPF_PROG_TEST_RUN. Driven by the
//! `np-pktbench` binary, which `cargo xtask bench` runs.

pub mod circulate;
pub mod cpu;
pub mod kubeproxy;
pub mod matrix;
pub mod micro;
pub mod profile;
pub mod progs;
pub mod run;
pub mod services;
pub mod topo;
