//! One call that h2load repeats, checked before each run (the own client and
//! `nghttp` send the same request) and after it (the server's counters must
//! account for every success h2load counted).

use prost::Message as _;
use std::time::Duration;
use takumo_keys::proto::pb::{
    ListKeysRequest, VerifyCode, VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient,
};
use tonic::{Code, metadata::AsciiMetadataValue};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::calls::{Expect, authed, bearer, check_verify, verify_req};
use crate::measure::{Counters, Ctx, Measured, Phase};
use crate::support::{
    h2load::{GrpcTarget, H2load, H2loadRun, grpc_frame, nghttp_grpc_status},
    load::{Outcome, Stats, status_text},
};
use crate::{HEALTH_PATH, LIST_KEYS_PATH, VERIFY_PATH};

/// A call h2load repeats, and what its answer must be.
pub struct H2Call {
    pub kind: Phase,
    pub target: GrpcTarget,
    pub expect: H2Expect,
}

#[derive(Clone)]
pub enum H2Expect {
    Serving,
    Verify(VerifyKeyRequest, Expect),
    Unauthenticated(ListKeysRequest),
}

impl H2Call {
    pub fn health(ctx: &Ctx<'_>) -> H2Call {
        let msg = HealthCheckRequest { service: String::new() };
        let target =
            GrpcTarget::new(ctx.addr, HEALTH_PATH, bearer(&ctx.auth), &grpc_frame(&msg), &ctx.dir, "health.bin");
        H2Call { kind: Phase::Baseline, target, expect: H2Expect::Serving }
    }

    pub fn verify(ctx: &Ctx<'_>, kind: Phase, key: &str, expect: Expect, file: &str) -> H2Call {
        let msg = verify_req(key);
        let target = GrpcTarget::new(ctx.addr, VERIFY_PATH, bearer(&ctx.auth), &grpc_frame(&msg), &ctx.dir, file);
        H2Call { kind, target, expect: H2Expect::Verify(msg, expect) }
    }

    /// A management call presenting a forged key as its credential.
    pub fn forged_list_keys(ctx: &Ctx<'_>, forged: &str) -> H2Call {
        let msg = ListKeysRequest::default();
        let auth = format!("Bearer {forged}");
        let target = GrpcTarget::new(ctx.addr, LIST_KEYS_PATH, &auth, &grpc_frame(&msg), &ctx.dir, "forged.bin");
        H2Call { kind: Phase::ForgedFlood, target, expect: H2Expect::Unauthenticated(msg) }
    }

    /// The gRPC status the answer must carry.
    fn grpc_status(&self) -> Code {
        match self.expect {
            H2Expect::Unauthenticated(_) => Code::Unauthenticated,
            _ => Code::Ok,
        }
    }

    /// Before h2load runs it: the same request through the own tonic client
    /// (status, `valid`, `code`), then the exact body file and headers
    /// through `nghttp` (the gRPC status h2load cannot see).
    pub async fn precheck(&self, ctx: &Ctx<'_>) -> Result<(), String> {
        let on_disk = std::fs::read(&self.target.body_file).map_err(|e| format!("read the body file: {e}"))?;
        let payload = grpc_payload(&on_disk)?;
        let ch = ctx.channels[0].clone();
        let auth: AsciiMetadataValue =
            self.target.header("authorization").expect("authorization header").parse().expect("ascii");
        let own = match &self.expect {
            H2Expect::Serving => {
                let msg = HealthCheckRequest::decode(payload).map_err(|e| e.to_string())?;
                match HealthClient::new(ch).check(authed(msg, &auth)).await {
                    Ok(r) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
                    Ok(r) => Err(format!("health status {:?}", r.get_ref().status())),
                    Err(s) => Err(status_text(&s)),
                }
            }
            H2Expect::Verify(msg, expect) => {
                let decoded = VerifyKeyRequest::decode(payload).map_err(|e| e.to_string())?;
                assert_eq!(&decoded, msg, "the body file holds another request");
                match check_verify(ApiKeyServiceClient::new(ch).verify_key(authed(decoded, &auth)).await, *expect) {
                    Outcome::Ok => Ok(()),
                    Outcome::Shed => Err("shed (RESOURCE_EXHAUSTED)".into()),
                    Outcome::Error(e) => Err(e),
                }
            }
            H2Expect::Unauthenticated(msg) => {
                let decoded = ListKeysRequest::decode(payload).map_err(|e| e.to_string())?;
                assert_eq!(&decoded, msg, "the body file holds another request");
                match ApiKeyServiceClient::new(ch).list_keys(authed(decoded, &auth)).await {
                    Err(s) if s.code() == Code::Unauthenticated => Ok(()),
                    Err(s) => Err(format!("expected UNAUTHENTICATED, got {}", status_text(&s))),
                    Ok(_) => Err("expected UNAUTHENTICATED, got OK: the forged key was accepted".into()),
                }
            }
        };
        own.map_err(|e| format!("own client: {e}"))?;
        let (status, message) = tokio::task::spawn_blocking({
            let t = self.target.clone();
            move || nghttp_grpc_status(&t)
        })
        .await
        .expect("nghttp task")?;
        if status != self.grpc_status() as i32 {
            return Err(format!(
                "nghttp with the h2load body and headers: grpc-status {status} ({message}), expected {}",
                self.grpc_status() as i32
            ));
        }
        Ok(())
    }

    /// After an h2load run: the server's counters must account for every
    /// request h2load counted as a success (h2load itself cannot tell).
    pub fn postcheck(&self, run: &H2loadRun, counters: Option<&Counters>) -> Result<(), String> {
        let Some(c) = counters else { return Ok(()) };
        let n = run.succeeded as f64;
        let (counted, what) = match &self.expect {
            H2Expect::Serving => return Ok(()),
            H2Expect::Verify(_, Expect::Valid) => (c.valid, "VALID"),
            H2Expect::Verify(_, Expect::Code(VerifyCode::Malformed)) => (c.malformed, "MALFORMED"),
            H2Expect::Verify(..) => return Ok(()),
            H2Expect::Unauthenticated(_) => (c.list_keys_unauthenticated, "ListKeys UNAUTHENTICATED"),
        };
        if matches!(self.expect, H2Expect::Verify(..)) && c.verify_not_ok > 0.0 {
            return Err(format!(
                "the server answered {:.0} VerifyKey calls with a non-OK gRPC status",
                c.verify_not_ok
            ));
        }
        if counted < n {
            return Err(format!("h2load counted {n:.0} successes, the server only {counted:.0} {what} answers"));
        }
        Ok(())
    }

    /// One h2load run of `dur`, checked before and after, with the server's CPU and counters around it.
    pub async fn run(&self, ctx: &Ctx<'_>, h2load: &H2load, dur: Duration, failures: &mut Vec<String>) -> Measured {
        let label = format!("{} ({:?})", self.target.url, self.kind);
        if let Err(e) = self.precheck(ctx).await {
            let msg = format!("h2load pre-check of {label}: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg.clone());
            return Measured { stats: Stats::failed(msg), ..Measured::default() };
        }
        let m = ctx.mark();
        let result = tokio::task::spawn_blocking({
            let (h, t) = (h2load.clone(), self.target.clone());
            move || h.run(&t, dur)
        })
        .await
        .expect("h2load task");
        let run = match result {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("h2load on {label}: {e}"));
                return Measured { stats: Stats::failed(e), ..Measured::default() };
            }
        };
        let mut measured = ctx.since(m, h2load_stats(&run));
        if let Err(e) = self.postcheck(&run, measured.counters.as_ref()) {
            let msg = format!("h2load post-check of {label}: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg.clone());
            measured.stats.errors += run.succeeded.max(1);
            measured.stats.first_errors.push(msg);
        }
        measured.h2load = Some(run);
        measured
    }
}

/// The message inside one uncompressed gRPC frame, if the frame is whole.
fn grpc_payload(frame: &[u8]) -> Result<&[u8], String> {
    let (head, payload) = frame.split_at_checked(5).ok_or("body file shorter than a gRPC frame header")?;
    let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if head[0] != 0 || len != payload.len() {
        return Err(format!("body file is not one uncompressed gRPC frame ({} bytes, header says {len})", frame.len()));
    }
    Ok(payload)
}

/// h2load's counts as the own client's `Stats` (no latencies: it reports a mean only).
pub fn h2load_stats(run: &H2loadRun) -> Stats {
    Stats {
        ok: run.succeeded,
        errors: run.failed,
        first_errors: if run.failed > 0 {
            vec![format!("h2load: {} requests failed, errored, timed out or got a non-2xx status", run.failed)]
        } else {
            Vec::new()
        },
        elapsed: Duration::from_secs_f64(run.secs),
        ..Stats::default()
    }
}
