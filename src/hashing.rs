//! Argon2id hashing of key material, keyed with the server-side pepper.
//!
//! Each hash or verify costs ~15 ms of CPU at the OWASP defaults, so it runs
//! on the blocking pool behind a semaphore: at most one job per core, so a
//! flood of bad keys queues here instead of starving the async workers or the
//! rest of the blocking pool.

use crate::{
    error::{Error, Result},
    secret::SecretString,
};
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use std::sync::Arc;
use tokio::sync::Semaphore;

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

#[derive(Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

struct Inner {
    pepper: SecretString,
    params: Params,
    permits: Semaphore,
}

impl Hasher {
    pub fn new(pepper: SecretString, params: HashParams) -> Result<Self> {
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
        // Validate that argon2 accepts the pepper as its secret input now, not on first use.
        Argon2::new_with_secret(
            pepper.expose().as_bytes(),
            Algorithm::Argon2id,
            Version::V0x13,
            p.clone(),
        )
        .map_err(|e| Error::invalid(format!("pepper: {e}")))?;
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            inner: Arc::new(Inner {
                pepper,
                params: p,
                permits: Semaphore::new(workers),
            }),
        })
    }

    fn argon2(&self) -> Argon2<'_> {
        Argon2::new_with_secret(
            self.inner.pepper.expose().as_bytes(),
            Algorithm::Argon2id,
            Version::V0x13,
            self.inner.params.clone(),
        )
        .expect("pepper length checked in Hasher::new")
    }

    /// Hashes `material` into a PHC string with a fresh random salt.
    pub async fn hash(&self, material: SecretString) -> Result<String> {
        self.run(move |h| {
            h.argon2()
                .hash_password(material.expose().as_bytes())
                .map(|ph| ph.to_string())
                .map_err(|e| Error::internal(anyhow::anyhow!("argon2 hash: {e}")))
        })
        .await
    }

    /// True when `material` matches `phc`. The cost parameters come from the
    /// stored string, so raising the defaults never invalidates old keys.
    pub async fn verify(&self, material: SecretString, phc: String) -> Result<bool> {
        self.run(move |h| {
            let parsed = PasswordHash::new(&phc).map_err(|e| {
                Error::internal(anyhow::anyhow!("stored hash is not a PHC string: {e}"))
            })?;
            // The comparison of the derived output inside is constant-time.
            Ok(h.argon2()
                .verify_password(material.expose().as_bytes(), &parsed)
                .is_ok())
        })
        .await
    }

    /// Jobs waiting for or holding a hashing slot; exported as a metric.
    pub fn available_permits(&self) -> usize {
        self.inner.permits.available_permits()
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Hasher) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(Error::internal)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || job(&me))
            .await
            .map_err(Error::internal)?
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
        )
        .unwrap()
    }

    #[tokio::test]
    async fn default_parameters_are_owasps_argon2id() {
        let h = Hasher::new(
            SecretString::new("pepper-0123456789abcdef"),
            HashParams::default(),
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
}
