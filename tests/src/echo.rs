//! The backend echo server run in every test pod (like the seeds' sample app): over TCP it
//! speaks minimal HTTP/1.1 with keep-alive, over UDP it answers each datagram; both reply
//! `From=NAME ClientIP=a.b.c.d ClientPort=p\n`, the client address it saw: IPv4 as
//! `a.b.c.d` (also when it arrived on a dual-stack socket as `::ffff:a.b.c.d`), IPv6 in
//! standard notation (`ClientIP=fd00:18::10`).
//!
//! Listening on the unspecified IPv6 address (`[::]`, np-echo's default) serves IPv4 and
//! IPv6 on one socket (`IPV6_V6ONLY` off, whatever `net.ipv6.bindv6only` says); on a kernel
//! without IPv6 it falls back to IPv4 only.
//!
//! A UDP datagram longer than [`UDP_ECHO_ABOVE`] bytes is answered with the reply line
//! followed by the datagram itself (large datagrams both ways, fragmented at MTU 1500).
//!
//! `POST /echo` sends the request body back as the response body, streamed (up to
//! [`MAX_ECHO`] bytes, with an `X-From: NAME` header): bulk transfers both ways, checked
//! byte for byte by the client.
//!
//! Threads, one per TCP connection (bounded), so a stuck client never blocks the others;
//! no client error ends the server.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// Most concurrent TCP connections; more are closed at once.
const MAX_CONNECTIONS: usize = 1024;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body read (and discarded).
const MAX_BODY: usize = 1024 * 1024;
/// Largest `POST /echo` body.
pub const MAX_ECHO: usize = 64 * 1024 * 1024;

/// A UDP datagram longer than this is echoed after the reply line (fragmented requests
/// and answers: a 4,000-byte datagram gets a 4,000-odd-byte answer).
pub const UDP_ECHO_ABOVE: usize = 1024;

/// The reply body for a client seen at `peer`.
pub fn reply_body(name: &str, peer: SocketAddr) -> String {
    format!(
        "From={name} ClientIP={} ClientPort={}\n",
        peer.ip().to_canonical(),
        peer.port()
    )
}

#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// Name reported in `From=`.
    pub name: String,
    /// TCP (HTTP) listen address; `None` for no TCP. `[::]:port` listens dual-stack.
    pub tcp: Option<SocketAddr>,
    /// UDP listen address; `None` for no UDP.
    pub udp: Option<SocketAddr>,
    /// Log one line per connection and datagram to stderr.
    pub verbose: bool,
}

/// A bound echo server; [`EchoServer::run`] serves forever, [`EchoServer::spawn`] serves
/// on background threads.
#[derive(Debug)]
pub struct EchoServer {
    cfg: EchoConfig,
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
}

impl EchoServer {
    pub fn bind(cfg: EchoConfig) -> io::Result<EchoServer> {
        let tcp = cfg
            .tcp
            .map(|a| match dual_stack(a, libc::SOCK_STREAM) {
                Some(fd) => fd.map(TcpListener::from),
                None => TcpListener::bind(a),
            })
            .transpose()?;
        let udp = cfg
            .udp
            .map(|a| match dual_stack(a, libc::SOCK_DGRAM) {
                Some(fd) => fd.map(UdpSocket::from),
                None => UdpSocket::bind(a),
            })
            .transpose()?;
        Ok(EchoServer { cfg, tcp, udp })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Serves on background threads (they live as long as the process).
    pub fn spawn(self) {
        let EchoServer { cfg, tcp, udp } = self;
        let name: Arc<str> = cfg.name.into();
        if let Some(sock) = udp {
            let name = name.clone();
            thread::spawn(move || serve_udp(&name, &sock, cfg.verbose));
        }
        if let Some(l) = tcp {
            thread::spawn(move || serve_tcp(name, &l, cfg.verbose));
        }
    }

    /// Serves forever.
    pub fn run(self) -> ! {
        self.spawn();
        loop {
            thread::park();
        }
    }
}

/// For `[::]:port`: a socket of type `ty` bound there with `IPV6_V6ONLY` off (listening
/// when a stream), so it serves both families; `0.0.0.0:port` when the kernel has no IPv6.
/// `None` for any other address (bound the ordinary way).
fn dual_stack(addr: SocketAddr, ty: libc::c_int) -> Option<io::Result<OwnedFd>> {
    let SocketAddr::V6(a6) = addr else {
        return None;
    };
    if !a6.ip().is_unspecified() {
        return None;
    }
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let make = || -> io::Result<OwnedFd> {
        // SAFETY: plain socket calls on a descriptor this function owns; the option values
        // and the address outlive the calls that read them.
        unsafe {
            let raw = libc::socket(libc::AF_INET6, ty | libc::SOCK_CLOEXEC, 0);
            let fd = OwnedFd::from_raw_fd(check(raw)?);
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let (off, on): (libc::c_int, libc::c_int) = (0, 1);
            let optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            check(libc::setsockopt(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&off as *const libc::c_int).cast(),
                optlen,
            ))?;
            if ty == libc::SOCK_STREAM {
                check(libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&on as *const libc::c_int).cast(),
                    optlen,
                ))?;
            }
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = addr.port().to_be();
            check(libc::bind(
                raw,
                (&sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ))?;
            if ty == libc::SOCK_STREAM {
                check(libc::listen(raw, 1024))?;
            }
            Ok(fd)
        }
    };
    Some(match make() {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            if ty == libc::SOCK_STREAM {
                TcpListener::bind(v4).map(OwnedFd::from)
            } else {
                UdpSocket::bind(v4).map(OwnedFd::from)
            }
        }
        r => r,
    })
}

fn serve_udp(name: &str, sock: &UdpSocket, verbose: bool) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if verbose {
                    eprintln!("udp from {peer} ({n} bytes)");
                }
                let mut answer = reply_body(name, peer).into_bytes();
                if n > UDP_ECHO_ABOVE {
                    answer.extend_from_slice(&buf[..n]);
                }
                if let Err(e) = sock.send_to(&answer, peer) {
                    eprintln!("udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                // E.g. ECONNREFUSED reported for an earlier reply: keep serving.
                eprintln!("udp recv: {e}");
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn serve_tcp(name: Arc<str>, listener: &TcpListener, verbose: bool) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    eprintln!("tcp from {peer}: too many connections, closing");
                    continue;
                }
                if verbose {
                    eprintln!("tcp from {peer}");
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (name, conn_active) = (name.clone(), active.clone());
                let spawned = thread::Builder::new().spawn(move || {
                    if let Err(e) = serve_conn(&name, stream, peer) {
                        if verbose {
                            eprintln!("tcp {peer}: {e}");
                        }
                    }
                    conn_active.fetch_sub(1, Ordering::Relaxed);
                });
                if let Err(e) = spawned {
                    eprintln!("tcp from {peer}: cannot start a thread: {e}");
                    active.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                // EMFILE and friends: back off and keep accepting.
                eprintln!("tcp accept: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// One parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: usize,
}

/// Parses a request head (without the final CRLFCRLF).
fn parse_head(head: &str) -> Option<Head> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let version = parts.next()?;
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return None,
    };
    let mut content_length = 0;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        let v = v.trim();
        if k.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if k.eq_ignore_ascii_case("content-length") {
            content_length = v.parse().ok()?;
        }
    }
    Some(Head {
        method,
        path,
        keep_alive,
        content_length,
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

fn serve_conn(name: &str, mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        // Read until a full head is buffered (pipelined requests stay in `buf`).
        let end = loop {
            if let Some(end) = find_head_end(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD {
                stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..end]).ok().and_then(parse_head);
        if let Some(h) = head
            .as_ref()
            .filter(|h| h.method == "POST" && h.path == "/echo" && h.content_length <= MAX_ECHO)
        {
            buf.drain(..end + 4);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nX-From: {name}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                h.content_length
            );
            stream.write_all(resp.as_bytes())?;
            let mut left = h.content_length;
            let have = left.min(buf.len());
            stream.write_all(&buf[..have])?;
            left -= have;
            let mut big = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = stream.read(&mut big[..left.min(64 * 1024)])?;
                if n == 0 {
                    return Ok(());
                }
                stream.write_all(&big[..n])?;
                left -= n;
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        let Some(head) = head.filter(|h| h.content_length <= MAX_BODY) else {
            stream.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        };
        buf.drain(..end + 4);
        // Discard the body.
        let mut left = head.content_length;
        let have = left.min(buf.len());
        buf.drain(..have);
        left -= have;
        while left > 0 {
            let n = stream.read(&mut chunk[..left.min(4096)])?;
            if n == 0 {
                return Ok(());
            }
            left -= n;
        }
        let body = reply_body(name, peer);
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            body.len(),
            if head.keep_alive { "keep-alive" } else { "close" }
        );
        if head.method != "HEAD" {
            resp.push_str(&body);
        }
        stream.write_all(resp.as_bytes())?;
        if !head.keep_alive {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;

    #[test]
    fn head_parsing() {
        let h = parse_head("GET / HTTP/1.1\r\nHost: x\r\nConnection: close").unwrap();
        assert_eq!(
            h,
            Head {
                path: "/".into(),
                method: "GET".into(),
                keep_alive: false,
                content_length: 0
            }
        );
        let h =
            parse_head("POST /a HTTP/1.0\r\nContent-Length: 5\r\nconnection: Keep-Alive").unwrap();
        assert!(h.keep_alive);
        assert_eq!(h.content_length, 5);
        assert!(parse_head("GET /").is_none());
        assert!(parse_head("GET / HTTP/2\r\n").is_none());
        assert!(parse_head("GET / HTTP/1.1\r\nbroken").is_none());
    }

    #[test]
    fn body_format() {
        let peer = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 10), 40000));
        assert_eq!(
            reply_body("pa1", peer),
            "From=pa1 ClientIP=198.18.0.10 ClientPort=40000\n"
        );
        // An IPv4 client on a dual-stack socket: shown as IPv4, not ::ffff:198.18.0.10.
        let mapped = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 10).to_ipv6_mapped(), 40000));
        assert_eq!(
            reply_body("pa1", mapped),
            "From=pa1 ClientIP=198.18.0.10 ClientPort=40000\n"
        );
        let v6: SocketAddr = "[fd00:18::10]:40000".parse().unwrap();
        assert_eq!(
            reply_body("pa1", v6),
            "From=pa1 ClientIP=fd00:18::10 ClientPort=40000\n"
        );
    }

    /// One socket on `[::]` answers IPv4 and IPv6 clients (loopback; no root needed) and
    /// reports each in its own notation.
    #[test]
    fn unspecified_ipv6_listens_on_both_families() {
        let any: SocketAddr = (Ipv6Addr::UNSPECIFIED, 0).into();
        let srv = EchoServer::bind(EchoConfig {
            name: "dual".into(),
            tcp: Some(any),
            udp: Some(any),
            verbose: false,
        })
        .unwrap();
        let (tcp, udp) = (srv.tcp_addr().unwrap(), srv.udp_addr().unwrap());
        srv.spawn();
        use crate::client::{http_get_here, udp_request_here, DEFAULT_TIMEOUT, UDP_TIMEOUT};
        for lo in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let r = http_get_here(SocketAddr::new(lo, tcp.port()), DEFAULT_TIMEOUT).unwrap();
            assert_eq!((r.from.as_str(), r.client_ip), ("dual", lo));
            let r = udp_request_here(SocketAddr::new(lo, udp.port()), UDP_TIMEOUT, 3).unwrap();
            assert_eq!((r.from.as_str(), r.client_ip), ("dual", lo));
        }
    }
}
