//! The load engine: jobs, each looping call → record on a task of its own,
//! for a time or until they run out of work; their counts and latencies; and
//! the HTTP/2 connections they share.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tonic::transport::{Channel, Endpoint};

/// `n` HTTP/2 connections to `addr`, each its own channel; `timeout` bounds
/// every request sent on them (`None`: no bound).
pub async fn connect(addr: SocketAddr, n: usize, timeout: Option<Duration>) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // One `connect()` per channel: each is its own HTTP/2 connection.
        let mut endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").tcp_nodelay(true);
        if let Some(t) = timeout {
            endpoint = endpoint.timeout(t);
        }
        out.push(endpoint.connect().await.expect("connect to server"));
    }
    out
}

/// A management call as the bench's service acting for member `bench`.
pub fn admin_req<T>(body: T, auth: &tonic::metadata::AsciiMetadataValue) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert("authorization", auth.clone());
    req.metadata_mut().insert("x-takumo-actor", tonic::metadata::MetadataValue::from_static("bench"));
    req
}

pub fn status_text(s: &tonic::Status) -> String {
    format!("gRPC {:?}: {}", s.code(), s.message())
}

/// What one call came to.
pub enum Outcome {
    Ok,
    /// Refused on purpose (RESOURCE_EXHAUSTED): load shedding, not an error.
    Shed,
    Error(String),
}

pub trait Job: Send + 'static {
    /// The next call, or `None` when the job has no more work.
    fn call(&mut self) -> impl Future<Output = Option<Outcome>> + Send + '_;
}

/// Counts and latencies of one or more windows.
#[derive(Clone, Default)]
pub struct Stats {
    pub ok: u64,
    pub shed: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// Latencies of correct responses, µs, sorted.
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
}

impl Stats {
    /// Adds another window's results; latencies are kept sorted.
    pub fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.shed += o.shed;
        self.errors += o.errors;
        for e in o.first_errors {
            if self.first_errors.len() < 3 && !self.first_errors.contains(&e) {
                self.first_errors.push(e);
            }
        }
        self.latencies_us.extend(o.latencies_us);
        self.latencies_us.sort_unstable();
        self.elapsed += o.elapsed;
    }

    /// A phase that could not run: one error, with its reason.
    pub fn failed(why: String) -> Stats {
        Stats { errors: 1, first_errors: vec![why], ..Stats::default() }
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let v = &self.latencies_us;
        if v.is_empty() {
            return None;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(Duration::from_micros(v[rank - 1] as u64))
    }
}

/// Runs `jobs` until `deadline`, `stop`, or until each has no more work.
pub async fn run_jobs<J: Job>(jobs: Vec<J>, deadline: Option<Instant>, stop: Option<Arc<AtomicBool>>) -> Stats {
    let start = Instant::now();
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|mut job| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut s = Stats { latencies_us: Vec::with_capacity(16 * 1024), ..Stats::default() };
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d)
                        || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
                    {
                        break;
                    }
                    let t0 = Instant::now();
                    let Some(outcome) = job.call().await else {
                        break;
                    };
                    let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    match outcome {
                        Outcome::Ok => {
                            s.ok += 1;
                            s.latencies_us.push(us);
                        }
                        Outcome::Shed => s.shed += 1,
                        Outcome::Error(e) => {
                            s.errors += 1;
                            if s.first_errors.len() < 3 && !s.first_errors.contains(&e) {
                                s.first_errors.push(e);
                            }
                        }
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let mut s = t.await.expect("load task panicked");
        s.elapsed = Duration::ZERO;
        all.merge(s);
    }
    all.elapsed = start.elapsed();
    all
}

/// Runs `concurrency` jobs made by `make` for `dur`.
pub async fn run_for<J: Job>(concurrency: usize, dur: Duration, make: impl Fn(usize) -> J) -> Stats {
    if dur.is_zero() {
        return Stats::default();
    }
    run_jobs((0..concurrency).map(make).collect(), Some(Instant::now() + dur), None).await
}
