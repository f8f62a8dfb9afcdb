//! This network namespace's interface addresses, read from the kernel (`getifaddrs`): what
//! the agent chooses node addresses ([`node_addrs::choose`](crate::node_addrs::choose)),
//! health check listeners and SNAT sources from. The choices themselves are pure code
//! elsewhere; this is the one place that asks the kernel.

use std::net::IpAddr;

use nodeport_common::Ip6;

use crate::{
    links,
    node_addrs::{InterfaceAddr, InterfacePatterns},
};

/// The IPv4 or IPv6 address of an interface address entry.
fn ifaddr_ip(ifa: &nix::ifaddrs::InterfaceAddress) -> Option<IpAddr> {
    let a = ifa.address.as_ref()?;
    a.as_sockaddr_in()
        .map(|sin| IpAddr::V4(sin.ip()))
        .or_else(|| a.as_sockaddr_in6().map(|sin6| IpAddr::V6(sin6.ip())))
}

/// IPv4 and IPv6 addresses of this network namespace's interfaces, with their interface
/// (the model chooses among them: [`crate::node_addrs::choose`]).
pub fn interface_addrs() -> Vec<InterfaceAddr> {
    let mut out: Vec<InterfaceAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|ifa| {
                Some(InterfaceAddr::new(
                    ifa.interface_name.clone(),
                    ifaddr_ip(&ifa)?,
                ))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// (interface, address) of every IPv4 and IPv6 address in this network namespace.
pub fn named_interface_addrs() -> Vec<(String, IpAddr)> {
    nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter_map(|ifa| Some((ifa.interface_name.clone(), ifaddr_ip(&ifa)?)))
        .collect()
}

/// The SNAT sources (IPv4, IPv6) for LoadBalancer/external IP frontends that are not node
/// addresses, from the configured interfaces' addresses now (see [`links::snat_source`]);
/// an interface excluded by `--exclude-interfaces` is never one.
pub fn snat_sources(interfaces: &[String], exclude: &InterfacePatterns) -> (u32, Ip6) {
    let addrs = named_interface_addrs();
    let usable: Vec<String> = interfaces
        .iter()
        .filter(|i| !exclude.matches(i))
        .cloned()
        .collect();
    (
        links::snat_source(&usable, &addrs),
        links::snat_source(&usable, &addrs),
    )
}
