//! The backend echo server run in every test pod (like the seeds' sample app): over TCP it
//! speaks minimal HTTP/1.1 with keep-alive, over UDP it answers each datagram; both reply
//! `From=NAME ClientIP=a.b.c.d ClientPort=p\n`, the client address it saw.
//!
//! Threads, one per TCP connection (bounded), so a stuck client never blocks the others;
//! no client error ends the server.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
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

/// The reply body for a client seen at `peer`.
pub fn reply_body(name: &str, peer: SocketAddr) -> String {
    format!(
        "From={name} ClientIP={} ClientPort={}\n",
        peer.ip(),
        peer.port()
    )
}

#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// Name reported in `From=`.
    pub name: String,
    /// TCP (HTTP) listen address; `None` for no TCP.
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
        let tcp = cfg.tcp.map(TcpListener::bind).transpose()?;
        let udp = cfg.udp.map(UdpSocket::bind).transpose()?;
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

fn serve_udp(name: &str, sock: &UdpSocket, verbose: bool) {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if verbose {
                    eprintln!("udp from {peer}");
                }
                if let Err(e) = sock.send_to(reply_body(name, peer).as_bytes(), peer) {
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
    keep_alive: bool,
    content_length: usize,
}

/// Parses a request head (without the final CRLFCRLF).
fn parse_head(head: &str) -> Option<Head> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split_whitespace();
    let method = parts.next()?.to_string();
    let _path = parts.next()?;
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
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn head_parsing() {
        let h = parse_head("GET / HTTP/1.1\r\nHost: x\r\nConnection: close").unwrap();
        assert_eq!(
            h,
            Head {
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
    }
}
