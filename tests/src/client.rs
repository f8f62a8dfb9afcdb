//! Client helpers for tests: HTTP GET over fresh or kept-alive TCP connections and UDP
//! requests to echo servers, from inside a namespace, with timeouts and bounded retries;
//! each parses the echo body into an [`EchoReply`]. Every helper takes a `SocketAddr` of
//! either family: an IPv6 address (`[fd00:18::11]:30080`) makes an IPv6 request.
//!
//! The `*_here` variants use the calling thread's namespace (call them inside
//! [`run_in`](crate::netns::run_in) to batch many requests in one thread).

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use crate::netns::{run_in, Netns};

/// Connect/read/write timeout of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait for one UDP answer.
pub const UDP_TIMEOUT: Duration = Duration::from_millis(700);
/// UDP sends before giving up.
pub const UDP_ATTEMPTS: u32 = 3;

/// What an echo server answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EchoReply {
    /// The backend's name (pod name).
    pub from: String,
    /// The client address the backend saw.
    pub client_ip: IpAddr,
    pub client_port: u16,
}

impl EchoReply {
    /// Parses `From=NAME ClientIP=a.b.c.d ClientPort=p` (or `ClientIP=fd00:18::10`).
    pub fn parse(body: &str) -> Option<EchoReply> {
        let (mut from, mut ip, mut port) = (None, None, None);
        for field in body.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "From" => from = Some(v.to_string()),
                "ClientIP" => ip = v.parse().ok(),
                "ClientPort" => port = v.parse().ok(),
                _ => {}
            }
        }
        Some(EchoReply {
            from: from?,
            client_ip: ip?,
            client_port: port?,
        })
    }

    /// The client address as IPv4 (panics for IPv6).
    pub fn client_ipv4(&self) -> Ipv4Addr {
        match self.client_ip {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => panic!("expected an IPv4 client address, got {a}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{op} {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{addr}: no UDP answer after {attempts} attempts of {timeout:?}")]
    NoUdpAnswer {
        addr: SocketAddr,
        attempts: u32,
        timeout: Duration,
    },
    #[error("{addr}: bad response: {detail}")]
    BadResponse { addr: SocketAddr, detail: String },
}

pub type Result<T> = std::result::Result<T, ClientError>;

impl ClientError {
    /// Whether the error is a timeout (as opposed to, e.g., a refused connection).
    pub fn is_timeout(&self) -> bool {
        match self {
            ClientError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            ClientError::NoUdpAnswer { .. } => true,
            ClientError::BadResponse { .. } => false,
        }
    }
}

fn io_err(op: &'static str, addr: SocketAddr) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { op, addr, source }
}

/// One GET on a fresh TCP connection from namespace `ns`.
pub fn http_get(ns: &Netns, addr: SocketAddr) -> Result<EchoReply> {
    run_in(ns, || http_get_here(addr, DEFAULT_TIMEOUT))
}

/// `n` GETs, each on a fresh connection (new source port), from namespace `ns`.
pub fn http_get_many(ns: &Netns, addr: SocketAddr, n: usize) -> Vec<Result<EchoReply>> {
    run_in(ns, || {
        (0..n)
            .map(|_| http_get_here(addr, DEFAULT_TIMEOUT))
            .collect()
    })
}

/// A bulk transfer both ways: `data` sent as a `POST /echo` body from namespace `ns`
/// while the echoed response is read (on another thread, so neither side waits for the
/// other's buffers). Returns the pod that answered (`X-From`) and the bytes it sent back.
pub fn http_echo(ns: &Netns, addr: SocketAddr, data: &[u8]) -> Result<(String, Vec<u8>)> {
    let stream = run_in(ns, || {
        TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT).map_err(io_err("connect", addr))
    })?;
    let timeout = Some(Duration::from_secs(30));
    stream
        .set_read_timeout(timeout)
        .map_err(io_err("configure", addr))?;
    stream
        .set_write_timeout(timeout)
        .map_err(io_err("configure", addr))?;
    let mut writer = stream.try_clone().map_err(io_err("clone", addr))?;
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: np\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    thread::scope(|s| {
        let sent = s.spawn(move || -> io::Result<()> {
            writer.write_all(head.as_bytes())?;
            writer.write_all(data)
        });
        let mut reader = stream;
        let mut got = Vec::with_capacity(data.len() + 256);
        let read = reader
            .read_to_end(&mut got)
            .map_err(io_err("receive", addr));
        sent.join()
            .expect("writer thread")
            .map_err(io_err("send", addr))?;
        read?;
        let end = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| ClientError::BadResponse {
                addr,
                detail: format!("no response head in {} bytes", got.len()),
            })?;
        let head = String::from_utf8_lossy(&got[..end]).into_owned();
        let from = head
            .lines()
            .find_map(|l| l.strip_prefix("X-From: "))
            .unwrap_or_default()
            .to_string();
        Ok((from, got[end + 4..].to_vec()))
    })
}

/// `len` deterministic bytes that no shifted copy matches (a lost or repeated segment of
/// a bulk transfer shows), from `seed` (non-zero).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One GET on a fresh connection from the calling thread's namespace.
pub fn http_get_here(addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    let mut conn = KeepAliveConn::connect_here(addr, timeout)?;
    conn.get(false)
}

/// A TCP connection kept open for several requests (HTTP keep-alive). The socket stays in
/// the namespace it was created in, whichever thread uses it.
#[derive(Debug)]
pub struct KeepAliveConn {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl KeepAliveConn {
    /// Connects from namespace `ns`.
    pub fn connect(ns: &Netns, addr: SocketAddr) -> Result<KeepAliveConn> {
        run_in(ns, || KeepAliveConn::connect_here(addr, DEFAULT_TIMEOUT))
    }

    /// Connects from the calling thread's namespace.
    pub fn connect_here(addr: SocketAddr, timeout: Duration) -> Result<KeepAliveConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io_err("connect", addr))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("setsockopt", addr))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("setsockopt", addr))?;
        let _ = stream.set_nodelay(true);
        Ok(KeepAliveConn {
            stream,
            addr,
            buf: Vec::new(),
        })
    }

    /// The connection's local (client) address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// Sends one GET and reads the answer; the connection stays open.
    pub fn request(&mut self) -> Result<EchoReply> {
        self.get(true)
    }

    fn get(&mut self, keep_alive: bool) -> Result<EchoReply> {
        let addr = self.addr;
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: np-tests\r\nConnection: {}\r\n\r\n",
            if keep_alive { "keep-alive" } else { "close" }
        );
        self.stream
            .write_all(req.as_bytes())
            .map_err(io_err("send", addr))?;
        let (status, body) = self.read_response()?;
        if status != 200 {
            return Err(ClientError::BadResponse {
                addr,
                detail: format!("status {status}: {body:?}"),
            });
        }
        EchoReply::parse(&body).ok_or_else(|| ClientError::BadResponse {
            addr,
            detail: format!("body {body:?}"),
        })
    }

    fn read_response(&mut self) -> Result<(u16, String)> {
        let addr = self.addr;
        let bad = |detail: String| ClientError::BadResponse { addr, detail };
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if self.buf.len() > 16 * 1024 {
                return Err(bad("response head too long".into()));
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(io_err("receive", addr))?;
            if n == 0 {
                return Err(bad(format!(
                    "connection closed after {} bytes: {:?}",
                    self.buf.len(),
                    String::from_utf8_lossy(&self.buf)
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("status line {status_line:?}")))?;
        let len: usize = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| bad(format!("no Content-Length in {head:?}")))?;
        if len > 64 * 1024 {
            return Err(bad(format!("body of {len} bytes")));
        }
        while self.buf.len() < len {
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(io_err("receive", addr))?;
            if n == 0 {
                return Err(bad("connection closed inside the body".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One UDP request from a fresh socket in namespace `ns` (up to [`UDP_ATTEMPTS`] sends).
pub fn udp_request(ns: &Netns, addr: SocketAddr) -> Result<EchoReply> {
    run_in(ns, || udp_request_here(addr, UDP_TIMEOUT, UDP_ATTEMPTS))
}

/// `n` UDP requests, each from a fresh socket (new source port), from namespace `ns`.
pub fn udp_request_many(ns: &Netns, addr: SocketAddr, n: usize) -> Vec<Result<EchoReply>> {
    run_in(ns, || {
        (0..n)
            .map(|_| udp_request_here(addr, UDP_TIMEOUT, UDP_ATTEMPTS))
            .collect()
    })
}

/// One UDP request from source port `sport` in namespace `ns`.
pub fn udp_request_from(ns: &Netns, addr: SocketAddr, sport: u16) -> Result<EchoReply> {
    run_in(ns, || {
        udp_request_here_from(addr, sport, UDP_TIMEOUT, UDP_ATTEMPTS)
    })
}

/// The unspecified address of `addr`'s family, with port `port`: where a client socket
/// for `addr` binds.
fn unspecified_like(addr: SocketAddr, port: u16) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
    }
}

/// One UDP request from a fresh socket in the calling thread's namespace. The socket is
/// connected, so only an answer from `addr` itself counts (a reply that was not
/// reverse-translated is ignored, like a real client would).
pub fn udp_request_here(addr: SocketAddr, timeout: Duration, attempts: u32) -> Result<EchoReply> {
    udp_request_here_from(addr, 0, timeout, attempts)
}

/// [`udp_request_here`] from source port `sport` (0: any).
pub fn udp_request_here_from(
    addr: SocketAddr,
    sport: u16,
    timeout: Duration,
    attempts: u32,
) -> Result<EchoReply> {
    let answer = udp_exchange(addr, sport, b"ping\n", timeout, attempts)?;
    let body = String::from_utf8_lossy(&answer);
    EchoReply::parse(&body).ok_or_else(|| ClientError::BadResponse {
        addr,
        detail: format!("datagram {body:?}"),
    })
}

/// One UDP datagram `data` (longer than `echo::UDP_ECHO_ABOVE`) from a fresh connected
/// socket in namespace `ns`, answered with the reply line and `data` again (up to
/// [`UDP_ATTEMPTS`] sends): the reply and the echoed bytes.
pub fn udp_echo(ns: &Netns, addr: SocketAddr, data: &[u8]) -> Result<(EchoReply, Vec<u8>)> {
    let answer = run_in(ns, || {
        udp_exchange(addr, 0, data, UDP_TIMEOUT, UDP_ATTEMPTS)
    })?;
    let bad = |detail: String| ClientError::BadResponse { addr, detail };
    let n = answer.len();
    let line = answer.iter().position(|&b| b == b'\n').map(|i| i + 1);
    let line = line.ok_or_else(|| bad(format!("{n} bytes without a line")))?;
    let head = String::from_utf8_lossy(&answer[..line]);
    let reply = EchoReply::parse(&head).ok_or_else(|| bad(format!("datagram {head:?}")))?;
    Ok((reply, answer[line..].to_vec()))
}

/// Send `data` from a fresh socket bound to port `sport` (0: any) and connected to `addr`,
/// and return the first answer, trying up to `attempts` times. The socket is connected, so
/// only an answer from `addr` itself counts (a reply that was not reverse-translated is
/// ignored, like a real client would).
fn udp_exchange(
    addr: SocketAddr,
    sport: u16,
    data: &[u8],
    timeout: Duration,
    attempts: u32,
) -> Result<Vec<u8>> {
    let sock = UdpSocket::bind(unspecified_like(addr, sport)).map_err(io_err("bind", addr))?;
    sock.connect(addr).map_err(io_err("connect", addr))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(io_err("setsockopt", addr))?;
    let mut buf = vec![0u8; 65_536];
    for _ in 0..attempts {
        if let Err(e) = sock.send(data) {
            // A refused earlier attempt (ICMP port unreachable) shows up here: try again.
            if e.kind() != io::ErrorKind::ConnectionRefused {
                return Err(io_err("send", addr)(e));
            }
            std::thread::sleep(timeout);
            continue;
        }
        match sock.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(io_err("receive", addr)(e)),
        }
    }
    Err(ClientError::NoUdpAnswer {
        addr,
        attempts,
        timeout,
    })
}

/// Whether one UDP datagram from a fresh connected socket in namespace `ns` is refused:
/// the socket reports ECONNREFUSED, which the kernel does only for an ICMP port unreachable
/// that quotes this socket's own datagram (to `addr`, from its port). `Ok(false)`: an
/// answer or silence within [`UDP_TIMEOUT`].
pub fn udp_refused(ns: &Netns, addr: SocketAddr) -> Result<bool> {
    run_in(ns, || {
        let sock = UdpSocket::bind(unspecified_like(addr, 0)).map_err(io_err("bind", addr))?;
        sock.connect(addr).map_err(io_err("connect", addr))?;
        sock.set_read_timeout(Some(UDP_TIMEOUT))
            .map_err(io_err("setsockopt", addr))?;
        sock.send(b"ping\n").map_err(io_err("send", addr))?;
        let mut buf = [0u8; 2048];
        match sock.recv(&mut buf) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(io_err("receive", addr)(e)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::{EchoConfig, EchoServer};

    #[test]
    fn parse_reply() {
        let r = EchoReply::parse("From=pb1 ClientIP=198.18.0.11 ClientPort=33000\n").unwrap();
        assert_eq!(r.from, "pb1");
        assert_eq!(r.client_ipv4(), Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(r.client_port, 33000);
        let r = EchoReply::parse("From=pb1 ClientIP=fd00:18::11 ClientPort=1\n").unwrap();
        assert_eq!(r.client_ip, "fd00:18::11".parse::<IpAddr>().unwrap());
        assert!(EchoReply::parse("From=pb1 ClientIP=x ClientPort=1").is_none());
        assert!(EchoReply::parse("hello").is_none());
    }

    /// The echo server and the clients against each other on loopback (no root needed).
    #[test]
    fn echo_server_round_trips_on_loopback() {
        let lo: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        let srv = EchoServer::bind(EchoConfig {
            name: "unit".into(),
            tcp: Some(lo),
            udp: Some(lo),
            verbose: false,
        })
        .unwrap();
        let (tcp, udp) = (srv.tcp_addr().unwrap(), srv.udp_addr().unwrap());
        srv.spawn();

        let r = http_get_here(tcp, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(r.from, "unit");
        assert_eq!(r.client_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));

        let mut c = KeepAliveConn::connect_here(tcp, DEFAULT_TIMEOUT).unwrap();
        let port = c.local_addr().unwrap().port();
        for _ in 0..5 {
            let r = c.request().unwrap();
            assert_eq!(r.client_port, port, "same connection");
        }

        let r = udp_request_here(udp, UDP_TIMEOUT, UDP_ATTEMPTS).unwrap();
        assert_eq!(r.from, "unit");

        // Garbage does not kill the server.
        let mut s = TcpStream::connect(tcp).unwrap();
        s.write_all(b"NONSENSE\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert_eq!(http_get_here(tcp, DEFAULT_TIMEOUT).unwrap().from, "unit");
    }
}
