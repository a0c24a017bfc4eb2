//! The process: settings in, a running server out. Builds every layer below
//! and wires them together; nothing below imports from here.
//!
//! - [`config`]: flags and `TAKUMO_*` environment variables.
//! - [`secrets`]: the pepper and service tokens, from files or the environment.
//! - [`startup`]: `Application::build` (wiring) and `run_until` (the lifecycle and its drain order).
//! - [`health`]: the gRPC health status, kept true to the store.
//! - [`commands`]: the `bootstrap`, `migrate` and `health` subcommands.
//! - [`telemetry`]: logs and OTLP trace export.

pub mod commands;
pub mod config;
pub mod health;
pub mod secrets;
pub mod startup;
pub mod telemetry;
