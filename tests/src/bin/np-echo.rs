//! `np-echo`: the backend echo server of the test pods (see `tests::echo`).
//! `np-echo --name NAME [--tcp-port 80] [--udp-port 80] [--bind ::] [--verbose]`

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use anyhow::Context;
use clap::Parser;
use tests::echo::{EchoConfig, EchoServer};

#[derive(Parser, Debug)]
#[command(
    about = "Echo server: answers `From=NAME ClientIP=.. ClientPort=..` over HTTP/1.1 and UDP"
)]
struct Args {
    /// Name reported in `From=`.
    #[arg(long)]
    name: String,
    /// TCP (HTTP) port; 0 disables TCP.
    #[arg(long, default_value_t = 80)]
    tcp_port: u16,
    /// UDP port; 0 disables UDP.
    #[arg(long, default_value_t = 80)]
    udp_port: u16,
    /// Address to listen on; `::` (the default) serves IPv4 and IPv6 on one socket.
    #[arg(long, default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
    bind: IpAddr,
    /// Log every connection and datagram to stderr.
    #[arg(long)]
    verbose: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let at = |port: u16| (port != 0).then(|| SocketAddr::new(a.bind, port));
    let server = EchoServer::bind(EchoConfig {
        name: a.name.clone(),
        tcp: at(a.tcp_port),
        udp: at(a.udp_port),
        verbose: a.verbose,
    })
    .with_context(|| {
        format!(
            "cannot listen on {}:{}/tcp, {}/udp",
            a.bind, a.tcp_port, a.udp_port
        )
    })?;
    eprintln!(
        "np-echo {}: tcp {:?} udp {:?}",
        a.name,
        server.tcp_addr(),
        server.udp_addr()
    );
    server.run()
}
