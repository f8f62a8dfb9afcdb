//! Control-plane benchmark: cold start of 10,000 services x 10 endpoints into the real
//! kernel maps, endpoint change to map update, agent memory and BPF map memory at that
//! scale, Maglev build time, imbalance and disruption. Prints a table and writes
//! `target/bench/control_plane.json`. Needs root (it loads the datapath's maps).
//!
//! `cargo bench -p nodeport-agent --bench control_plane [-- --quick]`, or `cargo xtask bench`.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use nodeport_agent::{
    datapath::{Datapath, MapSizes},
    maglev,
    model::{self, Inputs, InterfaceAddr, Model, Settings},
    sync::Reconciler,
};
use serde_json::json;

fn service(i: usize, node_port: u16) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "uid": format!("svc-uid-{i}"), "resourceVersion": "1"},
        "spec": {"type": "NodePort", "selector": {"app": format!("a{i}")},
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": node_port}]}
    }))
    .expect("service")
}

/// A slice of `n` ready endpoints for service `i`; `generation` shifts one address so a
/// change can be made (and, as the API server does, changes the resourceVersion).
fn slice(i: usize, n: usize, generation: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..n)
        .map(|e| {
            let host = (i * n + e + generation * (e == 0) as usize) as u32;
            let ip = Ipv4Addr::from(0xC613_0000u32 + (host % 0xFFFF) + 1); // 198.19.x.y
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                   "nodeName": if e % 3 == 0 { "node1" } else { "node2" }})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abc"), "namespace": "bench",
                     "uid": format!("slice-uid-{i}"), "resourceVersion": format!("{}", 2 + generation),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints
    }))
    .expect("slice")
}

fn bench_inputs<'a>(
    services: &'a [Service],
    slices: &'a [EndpointSlice],
    addrs: &'a [InterfaceAddr],
    settings: &'a Settings,
) -> Inputs<'a> {
    Inputs {
        services,
        slices,
        nodes: &[],
        node_name: "node1",
        interface_addrs: addrs,
        settings,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// A `/proc/self/status` memory line in KiB (`VmRSS:`, `RssAnon:`, `RssShmem:`...).
fn status_kib(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Memory the kernel charges for this process's BPF maps (`memlock` in fdinfo).
fn bpf_map_bytes() -> u64 {
    let mut total = 0;
    for e in fs::read_dir("/proc/self/fdinfo")
        .into_iter()
        .flatten()
        .flatten()
    {
        let info = fs::read_to_string(e.path()).unwrap_or_default();
        if info.contains("map_type:") {
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let services = 10_000usize;
    let endpoints = 10usize;
    let changes = if quick { 50 } else { 300 };
    // `--changes N`: more endpoint changes (to profile them).
    let args: Vec<String> = std::env::args().collect();
    let changes = args
        .iter()
        .position(|a| a == "--changes")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(changes);
    let content_changes = if quick { 10 } else { 60 };
    let mut out = BTreeMap::new();

    let settings = Settings {
        nodeport_range: 20_000..=40_000,
        ..Settings::default()
    };
    let mut svcs: Vec<Service> = (0..services)
        .map(|i| service(i, 20_000 + i as u16))
        .collect();
    svcs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut slices: Vec<EndpointSlice> = (0..services).map(|i| slice(i, endpoints, 0)).collect();
    let addrs = [InterfaceAddr::new(
        "eth0",
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
    )];

    let rss_before = rss_kib();
    let sizes = MapSizes::default();
    let mut dp = Datapath::load(sizes, None).expect("load the datapath (run as root)");
    // The agent's incremental model: objects are told apart by uid and resourceVersion, as
    // they come from the API server.
    let mut model = Model::new();
    let t0 = Instant::now();
    let (_, refused) = model.update(&bench_inputs(&svcs, &slices, &addrs, &settings));
    let t_model = t0.elapsed();
    assert_eq!(refused.len(), 0, "bench objects refused");
    let mut rec = Reconciler::new(sizes.maglev_slots, sizes.backends);
    let t1 = Instant::now();
    let changes0 = model.take_changes();
    let report = rec.apply_changes(model.current(), &changes0, &mut dp);
    let t_apply = t1.elapsed();
    assert!(
        report.errors.is_empty(),
        "cold start errors: {:?}",
        &report.errors[..report.errors.len().min(3)]
    );
    let cold = t0.elapsed();
    out.insert("cold_start_ms", ms(cold));
    out.insert("cold_start_model_ms", ms(t_model));
    out.insert("cold_start_apply_ms", ms(t_apply));
    out.insert("cold_start_slots_written", report.slots_written as f64);

    // Endpoint change to map update: one slice changes, the model takes in the new snapshot
    // (all objects; only the changed one is computed again) and the difference is applied.
    let mut lat = Vec::with_capacity(changes);
    let (mut lat_model, mut lat_apply) = (Vec::with_capacity(changes), Vec::with_capacity(changes));
    for c in 0..changes {
        let i = (c * 7919) % services;
        slices[i] = slice(i, endpoints, c + 1);
        let t = Instant::now();
        model.update(&bench_inputs(&svcs, &slices, &addrs, &settings));
        let tm = t.elapsed();
        let changed = model.take_changes();
        let r = rec.apply_changes(model.current(), &changed, &mut dp);
        lat.push(t.elapsed());
        lat_model.push(tm);
        lat_apply.push(t.elapsed() - tm);
        assert!(
            r.errors.is_empty() && r.tables_written == 1,
            "one table per change: {r}"
        );
    }
    for v in [&mut lat, &mut lat_model, &mut lat_apply] {
        v.sort();
    }
    out.insert("endpoint_change_p50_ms", ms(percentile(&lat, 0.50)));
    out.insert("endpoint_change_p99_ms", ms(percentile(&lat, 0.99)));
    out.insert(
        "endpoint_change_model_p99_ms",
        ms(percentile(&lat_model, 0.99)),
    );
    out.insert(
        "endpoint_change_apply_p99_ms",
        ms(percentile(&lat_apply, 0.99)),
    );

    out.insert("agent_rss_mib", rss_kib() as f64 / 1024.0);
    // What the RSS is made of: the process's heap and stacks (anonymous: the objects as
    // read, the model, the reconciler), and file-backed pages: the binary, and the Maglev
    // map's pages written through its memory mapping (counted in bpf_map_mib as well).
    out.insert("agent_rss_anon_mib", status_kib("RssAnon:") as f64 / 1024.0);
    out.insert("agent_rss_file_mib", status_kib("RssFile:") as f64 / 1024.0);
    out.insert(
        "agent_rss_growth_mib",
        rss_kib().saturating_sub(rss_before) as f64 / 1024.0,
    );
    // (After measuring the memory: a full recompute allocates a second desired state.)
    assert_eq!(
        *model.current(),
        model::desired(&bench_inputs(&svcs, &slices, &addrs, &settings)).0,
        "incremental model = full recompute"
    );

    // The same without resourceVersions (the manifests source): every object is hashed.
    let mut by_content = Model::by_content();
    let strip = |v: &mut [EndpointSlice]| {
        v.iter_mut()
            .for_each(|s| s.metadata.resource_version = None)
    };
    let mut svcs_nv = svcs.clone();
    svcs_nv
        .iter_mut()
        .for_each(|s| s.metadata.resource_version = None);
    strip(&mut slices);
    by_content.update(&bench_inputs(&svcs_nv, &slices, &addrs, &settings));
    let mut lat_nv = Vec::with_capacity(content_changes);
    for c in 0..content_changes {
        let i = (c * 7919 + 1) % services;
        slices[i] = slice(i, endpoints, changes + c + 1);
        strip(&mut slices[i..=i]);
        let t = Instant::now();
        by_content.update(&bench_inputs(&svcs_nv, &slices, &addrs, &settings));
        let changed = by_content.take_changes();
        let r = rec.apply_changes(by_content.current(), &changed, &mut dp);
        lat_nv.push(t.elapsed());
        assert!(
            r.errors.is_empty() && r.tables_written == 1,
            "one table per change: {r}"
        );
    }
    lat_nv.sort();
    out.insert(
        "endpoint_change_by_content_p99_ms",
        ms(percentile(&lat_nv, 0.99)),
    );
    out.insert("bpf_map_mib", bpf_map_bytes() as f64 / (1024.0 * 1024.0));

    // Maglev: build time, imbalance (largest share / mean), disruption (1 of N removed).
    for n in [3usize, 10, 100, 1000, 5000] {
        let names: Vec<String> = (0..n)
            .map(|i| format!("198.19.{}.{}:8080", i / 250, i % 250))
            .collect();
        let refs: Vec<&[u8]> = names.iter().map(|s| s.as_bytes()).collect();
        let m = maglev::table_size(n);
        let t = Instant::now();
        let table = maglev::build(&refs, m);
        let build = t.elapsed();
        let mut counts = vec![0u32; n];
        for &b in &table {
            counts[b as usize] += 1;
        }
        let max = *counts.iter().max().unwrap_or(&0) as f64;
        let imbalance = max / (m as f64 / n as f64);
        let fewer: Vec<&[u8]> = refs[1..].to_vec();
        let table2 = maglev::build(&fewer, maglev::table_size(n - 1));
        let moved = if table2.len() == table.len() {
            // Indices shift by one after removing backend 0; its own slots all move.
            table
                .iter()
                .zip(&table2)
                .filter(|(a, b)| **a == 0 || **a != **b + 1)
                .count() as f64
                / m as f64
        } else {
            f64::NAN
        };
        out.insert(
            Box::leak(format!("maglev_n{n}_build_ms").into_boxed_str()),
            ms(build),
        );
        out.insert(
            Box::leak(format!("maglev_n{n}_imbalance").into_boxed_str()),
            imbalance,
        );
        out.insert(
            Box::leak(format!("maglev_n{n}_disruption_minus_1_over_n").into_boxed_str()),
            moved - 1.0 / n as f64,
        );
    }

    let targets = [
        (
            "cold_start_ms",
            1000.0,
            "cold start of 10,000 services < 1 s",
        ),
        (
            "endpoint_change_p99_ms",
            5.0,
            "endpoint change to map < 5 ms at p99",
        ),
        (
            "agent_rss_mib",
            64.0,
            "agent RSS < 64 MiB at 10,000 services",
        ),
        (
            "bpf_map_mib",
            64.0,
            "BPF map memory < 64 MiB at 10,000 services",
        ),
    ];
    println!(
        "control plane, {services} services x {endpoints} endpoints{}",
        if quick { " (quick)" } else { "" }
    );
    for (k, v) in &out {
        println!("  {k:<40} {v:>12.3}");
    }
    println!("targets:");
    for (k, limit, what) in targets {
        let v = out[k];
        println!(
            "  {:<44} {:>10.3} {}",
            what,
            v,
            if v < limit { "met" } else { "MISSED" }
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&dir).expect("target/bench");
    let json = serde_json::to_string_pretty(&out).expect("json");
    fs::write(dir.join("control_plane.json"), json).expect("write json");
    println!("wrote {}", dir.join("control_plane.json").display());
}
