//! Address families: the [`Family`] of a service port, the raw map form of an address of
//! each family ([`RawAddr`], over `nodeport_common::Addr`), and [`IpCidr`], a network of
//! either family. Everything that is the same for IPv4 and IPv6 is written once, generic
//! over [`RawAddr`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use nodeport_common::{Addr, Ip6};

use crate::error::Error;

/// An IP family, as Kubernetes spells it in `spec.ipFamilies` and `addressType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Kubernetes spelling: `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The family of a Kubernetes spelling (`spec.ipFamilies[]`, `addressType`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    /// Address length in bits.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The raw, network-order form of an address of one family, as map keys hold it: `u32`
/// (`u32::from_ne_bytes` of the octets) for IPv4, [`Ip6`] (the same per group of four
/// octets) for IPv6.
pub trait RawAddr: Addr {
    const FAMILY: Family;
    /// `None` when `ip` is of the other family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
}

impl RawAddr for u32 {
    const FAMILY: Family = Family::V4;
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(addr_raw(a)),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(addr_from_raw(self))
    }
}

impl RawAddr for Ip6 {
    const FAMILY: Family = Family::V6;
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(addr6_raw(a)),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(addr6_from_raw(self))
    }
}

/// Raw network-order form of an IPv4 address, as in map keys.
pub fn addr_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Inverse of [`addr_raw`].
pub fn addr_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// Raw network-order form of an IPv6 address, as in map keys.
pub fn addr6_raw(ip: Ipv6Addr) -> Ip6 {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Inverse of [`addr6_raw`].
pub fn addr6_from_raw(raw: Ip6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in raw.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// `addr:port` (`[addr]:port` for IPv6) of a raw address and a network-order port.
pub fn endpoint_name<A: RawAddr>(addr: A, port_be: u16) -> String {
    SocketAddr::new(addr.to_ip(), u16::from_be(port_be)).to_string()
}

/// Whether `ip` may take nodePort traffic as an address of this node (and be a SNAT
/// source): not unspecified, broadcast, multicast, loopback or link-local (IPv4
/// 169.254.0.0/16, IPv6 fe80::/10: such an address means something on its own link only,
/// the same one may sit on several, and clients reach nodePorts through routable
/// addresses).
pub fn usable_node_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !a.is_unspecified()
                && !a.is_broadcast()
                && !a.is_multicast()
                && !a.is_loopback()
                && !a.is_link_local()
        }
        IpAddr::V6(a) => {
            !a.is_unspecified()
                && !a.is_loopback()
                && !a.is_multicast()
                && !a.is_unicast_link_local()
        }
    }
}

/// An IPv4 or IPv6 network, `addr/len` (a bare address means the whole address: `/32` or
/// `/128`). Host bits are cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    addr: IpAddr,
    prefix: u8,
}

impl IpCidr {
    /// The network of `addr` with `prefix` bits; `None` if `prefix` is longer than the
    /// address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self { addr, prefix })
    }

    /// Network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether `ip` is inside the network (never for an address of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix).is_some_and(|n| n.addr == self.addr)
    }

    /// The smallest network of `family` (`0.0.0.0/0` or `::/0`), for range queries.
    pub fn min_of(family: Family) -> Self {
        let addr = match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Self { addr, prefix: 0 }
    }
}

impl FromStr for IpCidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::Parse {
            what: "CIDR",
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let bits = Family::of(addr).bits();
        let prefix: u8 = match p {
            None => bits,
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| bad("prefix length is not a number"))?,
        };
        Self::new(addr, prefix).ok_or_else(|| bad(&format!("prefix length is larger than {bits}")))
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_forms_are_network_order_words() {
        let v6: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        let raw = addr6_raw(v6);
        assert_eq!(raw[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(raw[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(addr6_from_raw(raw), v6);
        assert_eq!(<Ip6 as RawAddr>::from_ip(IpAddr::V6(v6)), Some(raw));
        assert_eq!(<Ip6 as RawAddr>::from_ip("10.0.0.1".parse().unwrap()), None);
        assert_eq!(<u32 as RawAddr>::from_ip(IpAddr::V6(v6)), None);
        assert_eq!(endpoint_name(raw, 80u16.to_be()), "[2001:db8::1:2]:80");
        assert_eq!(
            endpoint_name(addr_raw(Ipv4Addr::new(10, 0, 0, 1)), 80u16.to_be()),
            "10.0.0.1:80"
        );
    }

    #[test]
    fn cidr_parse_both_families() {
        let c: IpCidr = " 10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.200.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::a01:203".parse().unwrap()));
        let c6: IpCidr = "2001:db8::7/32".parse().unwrap();
        assert_eq!(c6.to_string(), "2001:db8::/32");
        assert_eq!(c6.family(), Family::V6);
        assert!(c6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!c6.contains("2001:db9::1".parse().unwrap()));
        assert!(!c6.contains("10.0.0.1".parse().unwrap()));
        assert_eq!("fd00::1".parse::<IpCidr>().unwrap().prefix(), 128);
        assert_eq!("10.0.0.1".parse::<IpCidr>().unwrap().prefix(), 32);
        let all6: IpCidr = "::/0".parse().unwrap();
        assert!(all6.contains("fe80::1".parse().unwrap()));
        for (bad, why) in [
            ("10.0.0.0/33", "larger than 32"),
            ("fd00::/129", "larger than 128"),
            ("10.0.0.0/x", "not a number"),
            ("nope/8", "not an IPv4 or IPv6 address"),
        ] {
            let e = bad.parse::<IpCidr>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn node_addr_filter() {
        for (a, ok) in [
            ("10.0.0.1", true),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
            ("2001:db8::1", true),
            ("fd00::1", true),
            ("fe80::1", false),
            ("febf::1", false),
            ("::1", false),
            ("::", false),
            ("ff02::1", false),
        ] {
            assert_eq!(usable_node_addr(a.parse().unwrap()), ok, "{a}");
        }
    }
}
