//! Argon2id hashing of key material, keyed with the server-side pepper.
//!
//! Each hash or verify costs ~15 ms of CPU at the OWASP defaults. It runs on
//! a small pool of dedicated threads (one per core) with a bounded queue:
//! - off the async workers, so RPCs keep flowing while a hash runs;
//! - at a lower scheduling priority (nice 10), so a flood of cold or bad keys
//!   takes the CPU the warm path leaves over instead of starving it;
//! - with a bounded queue, so a flood is refused (RESOURCE_EXHAUSTED) instead
//!   of piling up memory and latency without end.

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    secret::SecretString,
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

/// Argon2id cost parameters. Defaults are OWASP's recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashParams {
    fn default() -> Self {
        Self {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

type Job = Box<dyn FnOnce(&Argon2<'_>) + Send>;

#[derive(Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::SyncSender<Job>,
    /// Jobs queued or running; exported as the argon2 queue depth.
    depth: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Hasher {
    pub fn new(pepper: SecretString, params: HashParams, metrics: Arc<Metrics>) -> Result<Self> {
        Self::with_queue(pepper, params, DEFAULT_QUEUE_CAPACITY, metrics)
    }

    pub fn with_queue(
        pepper: SecretString,
        params: HashParams,
        queue_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let p = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| Error::invalid(format!("argon2 parameters: {e}")))?;
        if pepper.expose().len() < 16 {
            return Err(Error::invalid("the pepper must be at least 16 bytes"));
        }
        // Fail at startup, not on first use, if argon2 refuses the pepper.
        Argon2::new_with_secret(
            pepper.expose().as_bytes(),
            Algorithm::Argon2id,
            Version::V0x13,
            p.clone(),
        )
        .map_err(|e| Error::invalid(format!("pepper: {e}")))?;
        let (tx, rx) = mpsc::sync_channel::<Job>(queue_capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        for i in 0..workers {
            let rx = rx.clone();
            let pepper = pepper.clone();
            let p = p.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || worker(rx, pepper, p))
                .map_err(Error::internal)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                queue: tx,
                depth: Arc::new(AtomicUsize::new(0)),
                metrics,
            }),
        })
    }

    /// Hashes `material` into a PHC string with a fresh random salt.
    pub async fn hash(&self, material: SecretString) -> Result<String> {
        self.run(move |a| {
            a.hash_password(material.expose().as_bytes())
                .map(|ph| ph.to_string())
                .map_err(|e| Error::internal(anyhow::anyhow!("argon2 hash: {e}")))
        })
        .await
    }

    /// True when `material` matches `phc`. The cost parameters come from the
    /// stored string, so raising the defaults never invalidates old keys.
    pub async fn verify(&self, material: SecretString, phc: String) -> Result<bool> {
        Metrics::inc(&self.inner.metrics.argon2_verifications);
        self.run(move |a| {
            let parsed = PasswordHash::new(&phc).map_err(|e| {
                Error::internal(anyhow::anyhow!("stored hash is not a PHC string: {e}"))
            })?;
            // The derived outputs are compared in constant time inside.
            Ok(a.verify_password(material.expose().as_bytes(), &parsed)
                .is_ok())
        })
        .await
    }

    /// Jobs queued or running.
    pub fn queue_depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Argon2<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let depth = self.inner.depth.clone();
        depth.fetch_add(1, Ordering::Relaxed);
        let boxed: Job = Box::new(move |a| {
            let result = job(a);
            depth.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(result);
        });
        if let Err(e) = self.inner.queue.try_send(boxed) {
            self.inner.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::TrySendError::Full(_) => {
                    Metrics::inc(&self.inner.metrics.argon2_rejected);
                    Error::ResourceExhausted(
                        "too many key verifications are waiting for hashing; retry with backoff"
                            .into(),
                    )
                }
                mpsc::TrySendError::Disconnected(_) => {
                    Error::internal(anyhow::anyhow!("hashing pool stopped"))
                }
            });
        }
        rx.await
            .map_err(|_| Error::internal(anyhow::anyhow!("hashing job dropped")))?
    }
}

fn worker(rx: Arc<Mutex<mpsc::Receiver<Job>>>, pepper: SecretString, params: Params) {
    lower_priority();
    let argon2 = Argon2::new_with_secret(
        pepper.expose().as_bytes(),
        Algorithm::Argon2id,
        Version::V0x13,
        params,
    )
    .expect("pepper validated in Hasher::new");
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(&argon2),
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

    fn cheap(pepper: &str) -> Hasher {
        Hasher::new(
            SecretString::new(pepper),
            HashParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            Arc::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn default_parameters_are_owasps_argon2id() {
        let h = Hasher::new(
            SecretString::new("pepper-0123456789abcdef"),
            HashParams::default(),
            Arc::default(),
        )
        .unwrap();
        let phc = h.hash(SecretString::new("k")).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    }

    #[tokio::test]
    async fn hash_verifies_only_with_the_same_pepper() {
        let a = cheap("pepper-one-0123456789");
        let b = cheap("pepper-two-0123456789");
        let phc = a.hash(SecretString::new("secret")).await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(!phc.contains("secret"));
        assert!(
            a.verify(SecretString::new("secret"), phc.clone())
                .await
                .unwrap()
        );
        assert!(
            !a.verify(SecretString::new("secreT"), phc.clone())
                .await
                .unwrap()
        );
        assert!(!b.verify(SecretString::new("secret"), phc).await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_work_instead_of_growing() {
        let h = Hasher::with_queue(
            SecretString::new("pepper-0123456789abcdef"),
            HashParams::default(),
            1,
            Arc::default(),
        )
        .unwrap();
        let jobs: Vec<_> = (0..64).map(|_| h.hash(SecretString::new("k"))).collect();
        let results = futures::future::join_all(jobs).await;
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(Error::ResourceExhausted(_))))
        );
        assert!(results.iter().any(|r| r.is_ok()));
        assert_eq!(h.queue_depth(), 0);
    }
}
