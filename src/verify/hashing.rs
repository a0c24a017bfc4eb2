//! Argon2id hashing of key material, keyed with the server-side pepper.
//!
//! Takumo secrets carry ~190 bits from the OS CSPRNG, so the hash needs no
//! stretching (NIST SP 800-63B §5.1.2.2 asks for it below 112 bits): the
//! pepper already defeats a database-only leak, and no amount of guessing
//! reaches 2^190. The defaults are therefore argon2id's cheapest sensible
//! settings (m = 32 KiB, t = 1, p = 1: about 20 µs per hash or verify here),
//! which make a first sight of a key, or the refusal of a forged one, cost
//! about what an RPC costs. Such hashes run inline on the calling task: there
//! is no queue for a flood to fill, and every call waits only for its own
//! hash.
//!
//! Memory-hard parameters (OWASP's m = 19456 KiB, t = 2, ~15 ms) remain
//! available through the TAKUMO_ARGON2_* flags. Those run on a small pool of
//! dedicated threads (one per core) with a bounded queue: off the async
//! workers, at nice 10, refusing work (RESOURCE_EXHAUSTED) when full, and
//! skipping a queued job whose caller has gone (deadline passed, stream
//! reset).
//!
//! Stored hashes verify with the parameters in their PHC string; a verified
//! key whose hash has other parameters or another pepper than the current
//! ones is rehashed by the verifier (see `verify.rs`).
//!
//! Peppers rotate without invalidating keys: every hash is stored with the
//! id of the pepper that keyed it, and previous peppers stay configured for
//! verification while new hashes use the current one.

use crate::{
    domain::model::StoredHash,
    domain::secret::SecretString,
    error::{Error, Result},
    metrics::Metrics,
};
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
    mpsc,
};
use tokio::sync::oneshot;

/// Argon2 jobs that may wait for a thread before new ones are refused.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Scheduling priority of hashing threads (higher is lower priority).
const HASH_THREAD_NICE: i32 = 10;

/// Argon2id cost parameters. The defaults suit high-entropy secrets (see
/// the module docs); [`HashParams::OWASP`] is the memory-hard alternative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl HashParams {
    /// OWASP's argon2id recommendation for passwords (~15 ms per hash).
    pub const OWASP: Self = Self { memory_kib: 19_456, iterations: 2, parallelism: 1 };

    /// Whether one hash is cheap enough to run inline on an async worker
    /// (at most 256 KiB·passes, well under 0.2 ms here).
    pub fn is_inline(&self) -> bool {
        u64::from(self.memory_kib) * u64::from(self.iterations) <= 256 && self.parallelism == 1
    }
}

impl Default for HashParams {
    fn default() -> Self {
        Self { memory_kib: 32, iterations: 1, parallelism: 1 }
    }
}

/// The server's peppers: the current one keys new hashes; previous ones
/// still verify the hashes they keyed.
#[derive(Clone, Debug)]
pub struct Peppers {
    pub current: SecretString,
    pub previous: Vec<SecretString>,
}

impl Peppers {
    pub fn single(pepper: SecretString) -> Self {
        Self { current: pepper, previous: vec![] }
    }
}

/// A short public id for a pepper (8 hex digits of a domain-separated
/// SHA-256), stored beside each hash: rotation needs no id bookkeeping.
pub fn pepper_id(pepper: &SecretString) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::new().chain_update(b"takumo-keys pepper id\0").chain_update(pepper.expose().as_bytes()).finalize();
    d.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// One argon2 context per pepper, built once per hashing thread; the first
/// is the current pepper.
struct Argon2Set<'a> {
    by_id: Vec<(String, Argon2<'a>)>,
}

impl<'a> Argon2Set<'a> {
    fn new(peppers: &'a [(String, SecretString)], params: &Params) -> Self {
        let by_id = peppers
            .iter()
            .map(|(id, p)| (id.clone(), argon2(p, params).expect("peppers validated in Hasher::new")))
            .collect();
        Self { by_id }
    }

    fn current(&self) -> &Argon2<'a> {
        &self.by_id[0].1
    }

    /// The context for a stored hash; `""` marks hashes from before pepper
    /// ids existed, which the current pepper keyed.
    fn for_id(&self, id: &str) -> Option<&Argon2<'a>> {
        if id.is_empty() {
            return Some(self.current());
        }
        self.by_id.iter().find(|(i, _)| i == id).map(|(_, a)| a)
    }
}

fn argon2<'a>(pepper: &'a SecretString, params: &Params) -> argon2::Result<Argon2<'a>> {
    Argon2::new_with_secret(pepper.expose().as_bytes(), Algorithm::Argon2id, Version::V0x13, params.clone())
}

type Job = Box<dyn FnOnce(&Argon2Set<'_>) + Send>;

#[derive(Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

struct Inner {
    /// The worker pool for memory-hard parameters; `None` when hashes are
    /// cheap enough to run inline.
    queue: Option<mpsc::SyncSender<Job>>,
    /// Jobs queued or running; exported as the argon2 queue depth.
    depth: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// Id of the pepper new hashes are keyed with.
    current_id: String,
    /// Every configured pepper by id, the current one first (inline hashing).
    peppers: Arc<Vec<(String, SecretString)>>,
    params: Params,
}

impl Hasher {
    pub fn new(pepper: SecretString, params: HashParams, metrics: Arc<Metrics>) -> Result<Self> {
        Self::with_queue(Peppers::single(pepper), params, DEFAULT_QUEUE_CAPACITY, metrics)
    }

    pub fn with_queue(
        peppers: Peppers,
        params: HashParams,
        queue_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let p = Params::new(params.memory_kib, params.iterations, params.parallelism, None)
            .map_err(|e| Error::invalid(format!("TAKUMO_ARGON2_*: {e}")))?;
        let mut ids: Vec<(String, SecretString)> = Vec::new();
        for pepper in std::iter::once(&peppers.current).chain(&peppers.previous) {
            if pepper.expose().len() < 16 {
                return Err(Error::invalid("TAKUMO_PEPPER: a pepper must be at least 16 bytes"));
            }
            // Fail at startup, not on first use, if argon2 refuses the pepper.
            argon2(pepper, &p).map_err(|e| Error::invalid(format!("TAKUMO_PEPPER: {e}")))?;
            ids.push((pepper_id(pepper), pepper.clone()));
        }
        let current_id = ids[0].0.clone();
        let peppers = Arc::new(ids);
        let queue = if params.is_inline() {
            None
        } else {
            let (tx, rx) = mpsc::sync_channel::<Job>(queue_capacity.max(1));
            let rx = Arc::new(Mutex::new(rx));
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            for i in 0..workers {
                let rx = rx.clone();
                let peppers = peppers.clone();
                let p = p.clone();
                std::thread::Builder::new()
                    .name(format!("argon2-{i}"))
                    .spawn(move || worker(rx, &peppers, &p))
                    .map_err(Error::internal)?;
            }
            Some(tx)
        };
        Ok(Self {
            inner: Arc::new(Inner {
                queue,
                depth: Arc::new(AtomicUsize::new(0)),
                metrics,
                current_id,
                peppers,
                params: p,
            }),
        })
    }

    /// True when `stored` was made with other parameters or another pepper
    /// than new hashes get: after it verifies, the key should be rehashed.
    pub fn needs_rehash(&self, stored: &StoredHash) -> bool {
        if stored.pepper_id != self.inner.current_id {
            return true;
        }
        let Ok(parsed) = PasswordHash::new(&stored.phc) else { return true };
        let current = &self.inner.params;
        let param = |name: &str| parsed.params.get_decimal(name);
        parsed.algorithm.as_str() != "argon2id"
            || parsed.version != Some(0x13)
            || param("m") != Some(current.m_cost())
            || param("t") != Some(current.t_cost())
            || param("p") != Some(current.p_cost())
    }

    /// Hashes `material` with the current pepper and a fresh random salt.
    pub async fn hash(&self, material: SecretString) -> Result<StoredHash> {
        let pepper_id = self.inner.current_id.clone();
        let metrics = self.inner.metrics.clone();
        self.run(move |set| {
            metrics.argon2_hashes.inc();
            set.current()
                .hash_password(material.expose().as_bytes())
                .map(|ph| StoredHash { phc: ph.to_string(), pepper_id })
                .map_err(|e| Error::internal(anyhow::anyhow!("argon2 hash: {e}")))
        })
        .await
    }

    /// True when `material` matches `stored`. The cost parameters come from
    /// the stored string, so raising the defaults never invalidates old keys.
    pub async fn verify(&self, material: SecretString, stored: StoredHash) -> Result<bool> {
        let metrics = self.inner.metrics.clone();
        self.run(move |set| {
            metrics.argon2_verifications.inc();
            let a = set.for_id(&stored.pepper_id).ok_or_else(|| {
                Error::internal(anyhow::anyhow!(
                    "no configured pepper has id {}: keep the old pepper in TAKUMO_PREVIOUS_PEPPERS",
                    stored.pepper_id
                ))
            })?;
            let parsed = PasswordHash::new(&stored.phc)
                .map_err(|e| Error::internal(anyhow::anyhow!("stored hash is not a PHC string: {e}")))?;
            // The derived outputs are compared in constant time inside.
            Ok(a.verify_password(material.expose().as_bytes(), &parsed).is_ok())
        })
        .await
    }

    /// Jobs queued or running.
    pub fn queue_depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Argon2Set<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let Some(queue) = &self.inner.queue else {
            // Cheap parameters: tens of microseconds, done right here. A
            // caller that has gone never gets this far (its future is dropped).
            return job(&Argon2Set::new(&self.inner.peppers, &self.inner.params));
        };
        let (tx, rx) = oneshot::channel();
        let depth = self.inner.depth.clone();
        let metrics = self.inner.metrics.clone();
        depth.fetch_add(1, Ordering::Relaxed);
        let boxed: Job = Box::new(move |set| {
            // The caller's future was dropped while this waited (deadline
            // passed, stream reset): nobody wants the answer.
            if tx.is_closed() {
                metrics.argon2_abandoned.inc();
                depth.fetch_sub(1, Ordering::Relaxed);
            } else {
                let result = job(set);
                // Before the answer, so a caller that got it sees the job gone.
                depth.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(result);
            }
        });
        if let Err(e) = queue.try_send(boxed) {
            self.inner.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::TrySendError::Full(_) => {
                    self.inner.metrics.argon2_rejected.inc();
                    Error::ResourceExhausted(
                        "too many key verifications are waiting for hashing; retry with backoff".into(),
                    )
                }
                mpsc::TrySendError::Disconnected(_) => Error::internal(anyhow::anyhow!("hashing pool stopped")),
            });
        }
        rx.await.map_err(|_| Error::internal(anyhow::anyhow!("hashing job dropped")))?
    }
}

fn worker(rx: Arc<Mutex<mpsc::Receiver<Job>>>, peppers: &[(String, SecretString)], params: &Params) {
    lower_priority();
    let set = Argon2Set::new(peppers, params);
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(&set),
            // Every Hasher is gone: the pool ends with it.
            Err(_) => return,
        }
    }
}

/// On Linux, `setpriority` with a thread id renices just this thread.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; failure only leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, HASH_THREAD_NICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: HashParams = HashParams { memory_kib: 1024, iterations: 1, parallelism: 1 };

    fn cheap(pepper: &str) -> Hasher {
        Hasher::new(SecretString::new(pepper), CHEAP, Arc::default()).unwrap()
    }

    /// A hasher whose memory-hard parameters send every job to the worker
    /// threads, through a queue of `capacity`.
    fn queued(capacity: usize, metrics: Arc<Metrics>) -> Hasher {
        let pepper = Peppers::single(SecretString::new("pepper-0123456789abcdef"));
        Hasher::with_queue(pepper, HashParams::OWASP, capacity, metrics).unwrap()
    }

    #[tokio::test]
    async fn default_parameters_are_cheap_argon2id_run_inline() {
        let h =
            Hasher::new(SecretString::new("pepper-0123456789abcdef"), HashParams::default(), Arc::default()).unwrap();
        let stored = h.hash(SecretString::new("k")).await.unwrap();
        assert!(stored.phc.starts_with("$argon2id$v=19$m=32,t=1,p=1$"), "{}", stored.phc);
        assert!(HashParams::default().is_inline() && !HashParams::OWASP.is_inline());
        assert!(h.inner.queue.is_none(), "no queue for a flood to fill");
    }

    #[tokio::test]
    async fn a_hash_with_other_parameters_or_pepper_needs_a_rehash() {
        let pepper = SecretString::new("pepper-0123456789abcdef");
        let owasp = Hasher::new(pepper.clone(), HashParams::OWASP, Arc::default()).unwrap();
        let cheap = Hasher::new(pepper, HashParams::default(), Arc::default()).unwrap();
        let old = owasp.hash(SecretString::new("k")).await.unwrap();
        let new = cheap.hash(SecretString::new("k")).await.unwrap();
        assert!(cheap.needs_rehash(&old));
        assert!(!cheap.needs_rehash(&new));
        assert!(owasp.needs_rehash(&new));
        let other_pepper = StoredHash { pepper_id: "0badc0de".into(), ..new };
        assert!(cheap.needs_rehash(&other_pepper));
    }

    /// The bound is on memory × passes, on one lane: a product just over it
    /// (whatever its sum or quotient) goes to the worker threads.
    #[test]
    fn hashing_runs_inline_only_up_to_256_kib_passes_on_one_lane() {
        let params = |memory_kib, iterations, parallelism| HashParams { memory_kib, iterations, parallelism };
        assert!(params(256, 1, 1).is_inline());
        assert!(params(8, 32, 1).is_inline());
        assert!(!params(257, 1, 1).is_inline());
        assert!(!params(128, 3, 1).is_inline());
        assert!(!params(32, 1, 2).is_inline(), "two lanes");
    }

    #[test]
    fn a_pepper_under_16_bytes_is_refused_at_startup_current_or_previous() {
        let (short, ok) = (SecretString::new("0123456789abcde"), SecretString::new("0123456789abcdef"));
        let hasher = |current: &SecretString, previous: &SecretString| {
            let peppers = Peppers { current: current.clone(), previous: vec![previous.clone()] };
            Hasher::with_queue(peppers, HashParams::default(), 8, Arc::default())
        };
        assert!(hasher(&ok, &ok).is_ok(), "16 bytes");
        for (current, previous) in [(&short, &ok), (&ok, &short)] {
            let err = hasher(current, previous).err().expect("a 15-byte pepper was accepted");
            assert!(err.to_string().contains("at least 16 bytes"), "{err}");
        }
    }

    /// Each of algorithm, version, memory, passes and lanes on its own makes
    /// a stored hash stale.
    #[tokio::test]
    async fn a_hash_differing_in_any_one_parameter_needs_a_rehash() {
        let h = cheap("pepper-0123456789abcdef");
        let new = h.hash(SecretString::new("k")).await.unwrap();
        assert!(new.phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{}", new.phc);
        assert!(!h.needs_rehash(&new));
        for (from, to) in
            [("$argon2id$", "$argon2i$"), ("v=19", "v=16"), ("m=1024", "m=2048"), (",t=1,", ",t=2,"), ("p=1$", "p=2$")]
        {
            let other = StoredHash { phc: new.phc.replacen(from, to, 1), ..new.clone() };
            assert!(h.needs_rehash(&other), "{to}: {}", other.phc);
        }
    }

    /// The argon2 queue depth gauge: jobs waiting or running, none after.
    #[tokio::test]
    async fn the_queue_depth_counts_the_jobs_queued_or_running() {
        let h = queued(64, Arc::default());
        // Tokio's lock: the test holds it across awaits; the worker threads,
        // outside the runtime, wait on it blocking.
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let held = gate.write().await;
        let mut jobs: Vec<_> = (0..5)
            .map(|_| {
                let gate = gate.clone();
                Box::pin(h.run(move |_| {
                    drop(gate.blocking_read());
                    Ok(())
                }))
            })
            .collect();
        for job in &mut jobs {
            assert!(futures::poll!(job).is_pending(), "a job ran past the held gate");
        }
        assert_eq!(h.queue_depth(), 5);
        drop(held);
        for job in jobs {
            job.await.unwrap();
        }
        assert_eq!(h.queue_depth(), 0);
    }

    /// Memory-hard hashing must not starve the async workers serving the
    /// cheap rejections: its threads run at a lower priority.
    #[tokio::test]
    async fn hashing_threads_run_at_a_lower_priority() {
        let h = queued(8, Arc::default());
        // SAFETY: getpriority on the calling thread reads, changes nothing.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let ours = nice();
        let worker = h.run(move |_| Ok(nice())).await.unwrap();
        if ours <= HASH_THREAD_NICE {
            assert_eq!(worker, HASH_THREAD_NICE);
        } else {
            // Started niced further: an unprivileged thread cannot go back up.
            assert!(worker >= HASH_THREAD_NICE, "{worker}");
        }
    }

    #[tokio::test]
    async fn a_queued_job_whose_caller_has_gone_is_not_run() {
        use futures::FutureExt;
        let metrics = Arc::new(Metrics::default());
        let h = queued(1024, metrics.clone());
        // Each future is polled once (which queues its job) and dropped, as
        // tonic drops a handler whose deadline passed or whose stream was reset.
        for _ in 0..64 {
            assert!(h.hash(SecretString::new("k")).now_or_never().is_none());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while h.queue_depth() > 0 {
            assert!(std::time::Instant::now() < deadline, "queue did not drain");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (ran, skipped) = (metrics.argon2_hashes.get(), metrics.argon2_abandoned.get());
        assert_eq!(ran + skipped, 64);
        // At most the jobs the workers had already picked up ran.
        assert!(ran <= 8, "{ran} abandoned hashes ran anyway");
        // A caller that waits still gets its answer.
        assert!(h.hash(SecretString::new("k")).await.is_ok());
    }

    #[tokio::test]
    async fn hash_verifies_only_with_the_same_pepper() {
        let a = cheap("pepper-one-0123456789");
        let b = cheap("pepper-two-0123456789");
        let stored = a.hash(SecretString::new("secret")).await.unwrap();
        assert!(stored.phc.starts_with("$argon2id$"));
        assert!(!stored.phc.contains("secret"));
        assert_eq!(stored.pepper_id, pepper_id(&SecretString::new("pepper-one-0123456789")));
        assert!(a.verify(SecretString::new("secret"), stored.clone()).await.unwrap());
        assert!(!a.verify(SecretString::new("secreT"), stored.clone()).await.unwrap());
        // b has never known a's pepper: a configuration error, not a denial.
        assert!(b.verify(SecretString::new("secret"), stored.clone()).await.is_err());
        // Even under a's pepper id, b's pepper does not verify a's hash.
        let forged = StoredHash { pepper_id: String::new(), ..stored };
        assert!(!b.verify(SecretString::new("secret"), forged).await.unwrap());
    }

    #[tokio::test]
    async fn a_rotated_pepper_still_verifies_the_hashes_it_keyed() {
        let old = SecretString::new("pepper-old-0123456789");
        let new = SecretString::new("pepper-new-0123456789");
        let before = Hasher::new(old.clone(), CHEAP, Arc::default()).unwrap();
        let stored = before.hash(SecretString::new("key")).await.unwrap();
        let after = Hasher::with_queue(Peppers { current: new.clone(), previous: vec![old] }, CHEAP, 8, Arc::default())
            .unwrap();
        assert!(after.verify(SecretString::new("key"), stored).await.unwrap());
        let fresh = after.hash(SecretString::new("key2")).await.unwrap();
        assert_eq!(fresh.pepper_id, pepper_id(&new));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_work_instead_of_growing() {
        let h = queued(1, Arc::default());
        let jobs: Vec<_> = (0..64).map(|_| h.hash(SecretString::new("k"))).collect();
        let results = futures::future::join_all(jobs).await;
        assert!(results.iter().any(|r| matches!(r, Err(Error::ResourceExhausted(_)))));
        assert!(results.iter().any(|r| r.is_ok()));
        assert_eq!(h.queue_depth(), 0);
    }
}
