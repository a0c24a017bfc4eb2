//! PostgreSQL statement counting: a pass-through TCP proxy between the server
//! and PostgreSQL that reads the frontend side of the wire protocol and counts
//! statements: each simple `Query` message, and each `Execute`, classified by
//! the SQL of the prepared statement its portal was bound to. Plain threads, so
//! that it takes nothing from the load generator's runtime; it only sees the
//! server's few pooled connections.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

/// Statements by kind, as classified from their SQL text.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub reads: u64,
    pub writes: u64,
    pub pings: u64,
    pub other: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.reads + self.writes + self.pings + self.other
    }

    pub fn plus(&self, o: &Counts) -> Counts {
        Counts {
            reads: self.reads + o.reads,
            writes: self.writes + o.writes,
            pings: self.pings + o.pings,
            other: self.other + o.other,
        }
    }

    pub fn minus(&self, o: &Counts) -> Counts {
        Counts {
            reads: self.reads.saturating_sub(o.reads),
            writes: self.writes.saturating_sub(o.writes),
            pings: self.pings.saturating_sub(o.pings),
            other: self.other.saturating_sub(o.other),
        }
    }
}

/// What the proxy counted so far.
#[derive(Default)]
pub struct StatementCounter {
    reads: AtomicU64,
    writes: AtomicU64,
    pings: AtomicU64,
    other: AtomicU64,
    /// Connections whose traffic could not be parsed (TLS or GSS encryption).
    pub opaque: AtomicU64,
}

impl StatementCounter {
    pub fn snapshot(&self) -> Counts {
        Counts {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            pings: self.pings.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    fn count(&self, kind: StmtKind) {
        let c = match kind {
            StmtKind::Read => &self.reads,
            StmtKind::Write => &self.writes,
            StmtKind::Ping => &self.pings,
            StmtKind::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StmtKind {
    Read,
    Write,
    Ping,
    Other,
}

pub fn classify(sql: &str) -> StmtKind {
    let s = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
    if s == "select 1" {
        return StmtKind::Ping;
    }
    let words: Vec<&str> =
        s.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty()).collect();
    let has = |w: &str| words.contains(&w);
    if has("insert") || has("update") || has("delete") || has("merge") {
        StmtKind::Write
    } else if matches!(words.first(), Some(&"select") | Some(&"with") | Some(&"values") | Some(&"table")) {
        StmtKind::Read
    } else {
        StmtKind::Other
    }
}

/// Starts the proxy in front of `pg_host:pg_port`: its address, and its counts.
pub fn start(pg_host: &str, pg_port: u16) -> (SocketAddr, Arc<StatementCounter>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the PostgreSQL proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let counter = Arc::new(StatementCounter::default());
    let upstream = format!("{pg_host}:{pg_port}");
    let c = counter.clone();
    thread::Builder::new()
        .name("pg-proxy".into())
        .spawn(move || {
            // Lives until the process exits; accepts only the server's connections.
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2s_in, c2s_out) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let counter = c.clone();
                thread::spawn(move || frontend(c2s_in, c2s_out, &counter));
                thread::spawn(move || backend(server, client));
            }
        })
        .expect("spawn proxy thread");
    (addr, counter)
}

/// PostgreSQL → server: copied as is.
fn backend(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Server → PostgreSQL: forwarded first, then parsed for counting.
fn frontend(mut from: TcpStream, mut to: TcpStream, counter: &StatementCounter) {
    let mut parser = Parser::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        parser.feed(&buf[..n], counter);
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[derive(Default)]
struct Parser {
    pending: Vec<u8>,
    /// Past the untyped startup message(s).
    started: bool,
    /// Encrypted or otherwise unparseable: stop looking.
    opaque: bool,
    statements: HashMap<Vec<u8>, StmtKind>,
    portals: HashMap<Vec<u8>, StmtKind>,
}

fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

impl Parser {
    fn feed(&mut self, bytes: &[u8], counter: &StatementCounter) {
        if self.opaque {
            return;
        }
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            if !self.started {
                // Untyped: length (4 bytes, including itself), then a protocol code.
                if rest.len() < 8 {
                    break;
                }
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                if rest.len() < len {
                    break;
                }
                let code = u32::from_be_bytes(rest[4..8].try_into().unwrap());
                match code {
                    // SSLRequest / GSSENCRequest: encryption may follow; we cannot count through it.
                    80877103 | 80877104 => {
                        self.opaque = true;
                        counter.opaque.fetch_add(1, Ordering::Relaxed);
                        self.pending.clear();
                        return;
                    }
                    // CancelRequest: a separate connection that carries nothing else.
                    80877102 => {}
                    _ => self.started = true,
                }
                at += len.max(8);
                continue;
            }
            if rest.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            if len < 4 {
                self.opaque = true;
                counter.opaque.fetch_add(1, Ordering::Relaxed);
                self.pending.clear();
                return;
            }
            if rest.len() < 1 + len {
                break;
            }
            let (tag, body) = (rest[0], &rest[5..1 + len]);
            match tag {
                b'Q' => counter.count(classify(&String::from_utf8_lossy(cstr(body).0))),
                b'P' => {
                    let (name, rest) = cstr(body);
                    let kind = classify(&String::from_utf8_lossy(cstr(rest).0));
                    self.statements.insert(name.to_vec(), kind);
                }
                b'B' => {
                    let (portal, rest) = cstr(body);
                    let (stmt, _) = cstr(rest);
                    let kind = self.statements.get(stmt).copied().unwrap_or(StmtKind::Other);
                    self.portals.insert(portal.to_vec(), kind);
                }
                b'E' => {
                    let (portal, _) = cstr(body);
                    counter.count(self.portals.get(portal).copied().unwrap_or(StmtKind::Other));
                }
                b'C' => {
                    // Close: 'S' statement or 'P' portal, then the name.
                    if let Some((&which, name)) = body.split_first() {
                        let (name, _) = cstr(name);
                        if which == b'S' {
                            self.statements.remove(name);
                        } else {
                            self.portals.remove(name);
                        }
                    }
                }
                _ => {}
            }
            at += 1 + len;
        }
        self.pending.drain(..at);
    }
}
