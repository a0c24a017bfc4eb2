//! Helpers both benchmark binaries use (`verify` and `soak`), one module per
//! concern: the server process ([`server`]), the load engine ([`load`]),
//! `/proc` ([`procfs`]), the Prometheus endpoint ([`scrape`]), the results
//! files ([`report`]), a throwaway PostgreSQL database ([`pgdb`]) and the
//! statement-counting proxy in front of it ([`pgproxy`]), `h2load`
//! ([`h2load`]) and forged keys ([`keygen`]).

// Each bench binary compiles this whole module tree but uses only part of it.
#![allow(dead_code)]

pub mod h2load;
pub mod keygen;
pub mod load;
pub mod pgdb;
pub mod pgproxy;
pub mod procfs;
pub mod report;
pub mod scrape;
pub mod server;
