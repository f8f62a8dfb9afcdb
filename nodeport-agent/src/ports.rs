//! Keeping the node's own sockets off the SNAT ports.
//!
//! A flow to a remote backend leaves from (node address, SNAT port). Were the node itself
//! to connect to that backend from the same port, both would share one tuple and the
//! backend's replies would go to whichever the datapath picks. The kernel chooses the
//! source ports of the node's connections from `net.ipv4.ip_local_port_range` (IPv6 too)
//! minus `net.ipv4.ip_local_reserved_ports`; so the part of the SNAT range inside the
//! former must be in the latter. The agent adds it there (never removing anything), or
//! refuses to start when it cannot.

use std::{fmt, fs, path::Path};

/// An inclusive port range.
pub type PortRange = (u16, u16);

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// `ip_local_port_range`: two numbers separated by white space.
pub fn parse_port_range(s: &str) -> Option<PortRange> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (it.next().is_none() && lo <= hi).then_some((lo, hi))
}

/// `ip_local_reserved_ports`: comma-separated ports and ranges (`8080,10000-29999`), or
/// empty.
pub fn parse_reserved(s: &str) -> Option<Vec<PortRange>> {
    s.trim()
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.trim().split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse().ok()?, b.parse().ok()?);
                (a <= b).then_some((a, b))
            }
            None => p.trim().parse().ok().map(|a| (a, a)),
        })
        .collect()
}

/// Sorted, with overlapping and adjacent ranges joined.
pub fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_unstable();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The ports of `snat` that the kernel may still hand to the node's own connections: inside
/// `ephemeral` and not covered by `reserved`.
pub fn exposed(snat: PortRange, ephemeral: PortRange, reserved: &[PortRange]) -> Vec<PortRange> {
    let (lo, hi) = (snat.0.max(ephemeral.0), snat.1.min(ephemeral.1));
    if lo > hi {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut next = lo as u32;
    for &(a, b) in &normalize(reserved.to_vec()) {
        if (b as u32) < next || a > hi {
            continue;
        }
        if (a as u32) > next {
            out.push((next as u16, a - 1));
        }
        next = b as u32 + 1;
    }
    if next <= hi as u32 {
        out.push((next as u16, hi));
    }
    out
}

/// The `ip_local_reserved_ports` text of `ranges`.
pub fn render(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What [`reserve_snat_ports`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The SNAT range lies outside the ephemeral range, or is reserved already.
    NotNeeded { ephemeral: PortRange },
    /// These ports were added to `ip_local_reserved_ports`.
    Added {
        ephemeral: PortRange,
        added: Vec<PortRange>,
    },
}

/// Why the SNAT range cannot be kept off the node's sockets.
#[derive(Debug)]
pub struct ReserveError {
    snat: PortRange,
    ephemeral: Option<PortRange>,
    why: String,
}

impl fmt::Display for ReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = self.snat;
        match self.ephemeral {
            Some((elo, ehi)) => write!(
                f,
                "--snat-port-range {lo}-{hi} overlaps the node's ephemeral ports \
                 (net.ipv4.ip_local_port_range {elo}-{ehi}) and could not be reserved in \
                 net.ipv4.ip_local_reserved_ports: {}. Choose a --snat-port-range outside \
                 {elo}-{ehi}, reserve it on the node, or let the agent write /proc/sys/net",
                self.why
            ),
            None => write!(
                f,
                "cannot tell whether --snat-port-range {lo}-{hi} overlaps the node's \
                 ephemeral ports: {}",
                self.why
            ),
        }
    }
}

impl std::error::Error for ReserveError {}

/// Make sure the node's own connections never take a port of `snat`, in the agent's
/// network namespace (the host's, for a DaemonSet pod on the host network).
pub fn reserve_snat_ports(snat: PortRange) -> Result<Reservation, ReserveError> {
    reserve_in(Path::new(PORT_RANGE), Path::new(RESERVED), snat)
}

fn reserve_in(
    range_path: &Path,
    reserved_path: &Path,
    snat: PortRange,
) -> Result<Reservation, ReserveError> {
    let fail = |ephemeral, why: String| ReserveError {
        snat,
        ephemeral,
        why,
    };
    let ephemeral = fs::read_to_string(range_path)
        .map_err(|e| fail(None, format!("{}: {e}", range_path.display())))
        .and_then(|s| {
            parse_port_range(&s)
                .ok_or_else(|| fail(None, format!("{}: unexpected {s:?}", range_path.display())))
        })?;
    let text = fs::read_to_string(reserved_path)
        .map_err(|e| fail(Some(ephemeral), format!("{}: {e}", reserved_path.display())))?;
    let reserved = parse_reserved(&text).ok_or_else(|| {
        fail(
            Some(ephemeral),
            format!("{}: unexpected {text:?}", reserved_path.display()),
        )
    })?;
    let added = exposed(snat, ephemeral, &reserved);
    if added.is_empty() {
        return Ok(Reservation::NotNeeded { ephemeral });
    }
    let all = normalize(reserved.into_iter().chain(added.iter().copied()).collect());
    fs::write(reserved_path, render(&all)).map_err(|e| {
        fail(
            Some(ephemeral),
            format!("writing {}: {e}", reserved_path.display()),
        )
    })?;
    Ok(Reservation::Added { ephemeral, added })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_kernel_prints() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("8080,10000-29999\n"),
            Some(vec![(8080, 8080), (10000, 29999)])
        );
        assert_eq!(parse_reserved("9-3"), None);
    }

    #[test]
    fn exposed_is_the_unreserved_overlap() {
        let snat = (10_000, 29_999);
        assert_eq!(exposed(snat, (32_768, 60_999), &[]), vec![]);
        assert_eq!(exposed(snat, (1_024, 65_535), &[]), vec![snat]);
        assert_eq!(
            exposed(snat, (20_000, 65_535), &[(25_000, 26_000), (8080, 8080)]),
            vec![(20_000, 24_999), (26_001, 29_999)]
        );
        assert_eq!(exposed(snat, (1_024, 65_535), &[(9_000, 40_000)]), vec![]);
        assert_eq!(
            exposed((61_000, 65_535), (1_024, 65_535), &[(65_535, 65_535)]),
            vec![(61_000, 65_534)]
        );
    }

    #[test]
    fn normalize_and_render_join_ranges() {
        let r = normalize(vec![(20, 30), (5, 5), (31, 40), (6, 6), (35, 36)]);
        assert_eq!(r, vec![(5, 6), (20, 40)]);
        assert_eq!(render(&r), "5-6,20-40");
    }

    #[test]
    fn reserves_only_what_is_missing_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (range, reserved) = (dir.path().join("range"), dir.path().join("reserved"));
        fs::write(&range, "1024\t65535\n").unwrap();
        fs::write(&reserved, "8080,20000-21000\n").unwrap();
        let r = reserve_in(&range, &reserved, (10_000, 29_999)).unwrap();
        assert_eq!(
            r,
            Reservation::Added {
                ephemeral: (1024, 65535),
                added: vec![(10_000, 19_999), (21_001, 29_999)]
            }
        );
        assert_eq!(fs::read_to_string(&reserved).unwrap(), "8080,10000-29999");
        let again = reserve_in(&range, &reserved, (10_000, 29_999)).unwrap();
        assert_eq!(
            again,
            Reservation::NotNeeded {
                ephemeral: (1024, 65535)
            }
        );
        fs::write(&range, "32768 60999").unwrap();
        fs::remove_file(&reserved).unwrap();
        let err = reserve_in(&range, &reserved, (30_000, 40_000)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--snat-port-range 30000-40000 overlaps") && msg.contains("32768-60999"),
            "{msg}"
        );
    }
}
