//! The phases on the running server: creating the keys; baseline, warm and
//! malformed in rounds (own client, then h2load); cold; and the flood.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::{
    domain::keys::KEY_LEN,
    proto::pb::{VerifyCode, VerifyKeyRequest, api_key_service_client::ApiKeyServiceClient},
};

use crate::ID_RANGE;
use crate::calls::{Expect, FloodJob, create_keys, verify_req};
use crate::h2call::{H2Call, h2load_stats};
use crate::measure::{Client, Ctx, Keys, Mark, Measured, Phase, Row};
use crate::support::{
    h2load::{H2load, H2loadLoop},
    keygen::{random_key, with_wrong_checksum},
    load::{Job as _, Outcome, Stats, connect, run_for, run_jobs},
    procfs::{ProcCpu, busy_seconds},
    report::fmt_rps,
};

/// Warm keys, cold keys and fresh keys, created concurrently through CreateKey.
pub async fn create_all_keys(ctx: &Ctx<'_>, notes: &mut Vec<String>) -> Keys {
    let opts = ctx.opts;
    let t = Instant::now();
    let create = |n: usize, tag: &'static str| create_keys(&ctx.channels, &ctx.auth, n, opts.create_concurrency, tag);
    let keys = Keys {
        warm: create(opts.warm_keys, "warm").await,
        cold: create(opts.cold_keys, "cold").await,
        fresh: create(opts.fresh_keys, "fresh").await,
    };
    let n = keys.warm.len() + keys.cold.len() + keys.fresh.len();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("created {n} keys in {secs:.1} s");
    notes.push(format!(
        "setup: {n} keys created through `CreateKey` ({} concurrent, own client) in {secs:.1} s, {} keys/s",
        opts.create_concurrency,
        fmt_rps(n as f64 / secs.max(1e-9))
    ));
    keys
}

/// Baseline, warm and malformed with the own client, interleaved in rounds of
/// a slice each, so that drifting machine load hits all three alike.
pub async fn own_client_rounds(ctx: &Ctx<'_>, keys: &Keys, notes: &mut Vec<String>) -> Vec<Row> {
    let opts = ctx.opts;
    let c = opts.concurrency;
    let warm_reqs: Arc<[VerifyKeyRequest]> = keys.warm.iter().map(|k| verify_req(k)).collect();
    let malformed_reqs = malformed_requests(&keys.warm[0]);
    let warm = |i: usize| ctx.verify_job(i, &warm_reqs, Expect::Valid);
    let malformed = |i: usize| ctx.verify_job(i, &malformed_reqs, Expect::Code(VerifyCode::Malformed));
    let health = |i: usize| ctx.health(i);

    // Warm-up: every warm key once (first sight), then each load for the warm-up time.
    for k in &keys.warm {
        let mut j = warm(0);
        j.reqs = Arc::new([verify_req(k)]);
        if let Some(Outcome::Error(e)) = j.call().await {
            eprintln!("warning: warm-up verify failed: {e}");
        }
    }
    let warmup = Duration::from_secs_f64(opts.warmup);
    run_for(c, warmup, health).await;
    run_for(c, warmup, warm).await;
    run_for(c, warmup, malformed).await;

    let rounds = opts.rounds.max(1);
    let slice = Duration::from_secs_f64(opts.duration) / rounds as u32;
    let (mut base_m, mut warm_m, mut bad_m) = (Measured::default(), Measured::default(), Measured::default());
    let me = ProcCpu::new(std::process::id());
    let (sys0, srv0, me0, t0) = (busy_seconds(), ctx.cpu.seconds(), me.seconds(), Instant::now());
    for _ in 0..rounds {
        base_m.add(ctx.measure(c, slice, health).await);
        warm_m.add(ctx.measure(c, slice, warm).await);
        bad_m.add(ctx.measure(c, slice, malformed).await);
    }
    // CPU used by anything but the server and this bench (PostgreSQL included) while measuring.
    let others = (|| {
        let busy = busy_seconds()? - sys0?;
        let ours = (ctx.cpu.seconds()? - srv0?) + (me.seconds()? - me0?);
        Some(((busy - ours) / t0.elapsed().as_secs_f64()).max(0.0))
    })();
    if let Some(o) = others {
        let flag = if o > 0.25 { " — **noisy: compare with care**" } else { "" };
        notes.push(format!(
            "other processes used {o:.2} CPUs on average while the own client measured baseline, warm and \
             malformed{flag}"
        ));
    }
    let n = keys.warm.len();
    vec![
        base_m.row(Phase::Baseline, Client::Own, "health baseline (`Health/Check`)", c.to_string()),
        warm_m.row(Phase::Warm, Client::Own, &format!("warm verify ({n} keys)"), c.to_string()),
        bad_m.row(Phase::Malformed, Client::Own, "malformed verify (4 kinds)", c.to_string()),
    ]
}

fn malformed_requests(key: &str) -> Arc<[VerifyKeyRequest]> {
    [
        "tk_live_notakey".to_owned(),
        "not-a-key-at-all".to_owned(),
        // Right shape and alphabet, wrong checksum.
        with_wrong_checksum(key),
        format!("tk_test_{}", "x".repeat(KEY_LEN - 8)),
    ]
    .iter()
    .map(|k| verify_req(k))
    .collect()
}

/// Baseline, warm and malformed with h2load, interleaved in rounds.
pub async fn h2load_rounds(ctx: &Ctx<'_>, h2load: &H2load, keys: &Keys, failures: &mut Vec<String>) -> Vec<Row> {
    let opts = ctx.opts;
    let calls = [
        H2Call::health(ctx),
        H2Call::verify(ctx, Phase::Warm, &keys.warm[0], Expect::Valid, "warm.bin"),
        H2Call::verify(
            ctx,
            Phase::Malformed,
            &with_wrong_checksum(&keys.warm[0]),
            Expect::Code(VerifyCode::Malformed),
            "malformed.bin",
        ),
    ];
    // Unmeasured warm-up of each (checked like the measured runs).
    let warmup = Duration::from_secs_f64(opts.warmup);
    if !warmup.is_zero() {
        for call in &calls {
            call.run(ctx, h2load, warmup, failures).await;
        }
    }
    let rounds = opts.rounds.max(1);
    let slice = Duration::from_secs_f64(opts.duration) / rounds as u32;
    let mut sums: Vec<Measured> = calls.iter().map(|_| Measured::default()).collect();
    for _ in 0..rounds {
        for (call, sum) in calls.iter().zip(&mut sums) {
            sum.add(call.run(ctx, h2load, slice, failures).await);
        }
    }
    let in_flight = format!("{} ({} × {})", h2load.connections * h2load.streams, h2load.connections, h2load.streams);
    let labels = ["health baseline (`Health/Check`)", "warm verify (1 key)", "malformed verify (wrong checksum)"];
    calls
        .iter()
        .zip(sums)
        .zip(labels)
        .map(|((call, m), label)| m.row(call.kind, Client::H2load, label, in_flight.clone()))
        .collect()
}

/// Each cold key verified once, at the own client's usual concurrency, so
/// that its rate compares with the own client's baseline.
pub async fn cold_phase(ctx: &Ctx<'_>, cold: &[String]) -> Row {
    let reqs: Arc<[VerifyKeyRequest]> = cold.iter().map(|k| verify_req(k)).collect();
    let m = ctx.measure_jobs(ctx.once_each(ctx.opts.concurrency, reqs)).await;
    let mut row = m.row(
        Phase::Cold,
        Client::Own,
        &format!("cold verify ({} distinct keys, once each)", cold.len()),
        ctx.opts.concurrency.to_string(),
    );
    // Every first sight must have run argon2; fewer means the keys were cached some other way.
    if let Some(v) = row.counters.and_then(|c| c.argon2_verifications)
        && v < cold.len() as f64 * 0.99
    {
        row.extra = format!("only {v:.0} argon2 verifications for {} first sights: cached at creation?", cold.len());
    }
    row
}

/// Warm verifications just before the flood, then, while h2load sends
/// forged-key management calls and the own client's attacking side sends
/// wrong secrets: warm verifications again (same client, same concurrency)
/// and first verifications of fresh keys at a low, legitimate rate.
pub async fn flood_phase(ctx: &Ctx<'_>, h2load: &H2load, keys: &Keys, failures: &mut Vec<String>) -> Vec<Row> {
    let opts = ctx.opts;
    let (c, dur, warmup) =
        (opts.concurrency, Duration::from_secs_f64(opts.duration), Duration::from_secs_f64(opts.warmup));
    let warm_reqs: Arc<[VerifyKeyRequest]> = keys.warm.iter().map(|k| verify_req(k)).collect();
    let warm = |i: usize| ctx.verify_job(i, &warm_reqs, Expect::Valid);
    let mut rows = Vec::new();

    run_for(c, warmup, warm).await;
    let before = ctx.measure(c, dur, warm).await;
    rows.push(before.row(Phase::WarmBeforeFlood, Client::Own, "warm verify, just before the flood", c.to_string()));

    // The attack: h2load with one forged key for the first warm key's id, and
    // the own client's distinct wrong secrets for every warm key's id.
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::from_os_rng();
    let forged = H2Call::forged_list_keys(ctx, &random_key(&mut rng, Some(&keys.warm[0][ID_RANGE])));
    let h2_stop = Arc::new(AtomicBool::new(false));
    let h2_flood = match forged.precheck(ctx).await {
        Ok(()) => Some((ctx.mark(), h2load.run_until(&forged.target, Duration::from_secs(1), h2_stop.clone()))),
        Err(e) => {
            let msg = format!("h2load pre-check of the forged-key flood: {e}");
            eprintln!("FAILED CHECK: {msg}");
            failures.push(msg);
            None
        }
    };
    let flood_channels = connect(ctx.addr, opts.flood_connections.max(1), None).await;
    let warm_ids: Arc<[String]> = keys.warm.iter().map(|k| k[ID_RANGE].to_owned()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_jobs: Vec<FloodJob> = (0..opts.flood_concurrency)
        .map(|i| FloodJob {
            client: ApiKeyServiceClient::new(flood_channels[i % flood_channels.len()].clone()),
            auth: ctx.auth.clone(),
            ids: warm_ids.clone(),
            next: i,
            rng: rand::SeedableRng::from_os_rng(),
        })
        .collect();
    let own_flood = (!flood_jobs.is_empty()).then(|| {
        let stop = stop.clone();
        tokio::spawn(async move { run_jobs(flood_jobs, None, Some(stop)).await })
    });
    let in_flight = |n: usize| {
        let mut s = n.to_string();
        if h2_flood.is_some() {
            let _ = write!(s, " + {} h2load", h2load.connections * h2load.streams);
        }
        if own_flood.is_some() {
            let _ = write!(s, " + {} wrong secrets", opts.flood_concurrency);
        }
        s
    };

    run_for(c, warmup, warm).await;
    let during = ctx.measure(c, dur, warm).await;
    let mut row = during.row(Phase::WarmUnderFlood, Client::Own, "warm verify under the flood", in_flight(c));
    let unloaded = rows[0].stats.rps();
    if unloaded > 0.0 {
        row.extra = format!("{:.2}× the rate just before", row.stats.rps() / unloaded);
    }
    rows.push(row);

    let fresh: Arc<[VerifyKeyRequest]> = keys.fresh.iter().map(|k| verify_req(k)).collect();
    if !fresh.is_empty() {
        let m = ctx.measure_jobs(ctx.once_each(opts.fresh_concurrency, fresh)).await;
        let label = format!("first verification of {} fresh keys under the flood", keys.fresh.len());
        rows.push(m.row(Phase::FreshUnderFlood, Client::Own, &label, in_flight(opts.fresh_concurrency)));
    }

    h2_stop.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    if let Some((mark, flood)) = h2_flood {
        rows.push(forged_flood_row(ctx, h2load, &forged, mark, flood, failures).await);
    }
    if let Some(flood) = own_flood {
        rows.push(wrong_secret_flood_row(flood.await.expect("flood task"), opts.flood_concurrency));
    }
    rows
}

/// The row of h2load's forged-key flood, once stopped: its whole run (every
/// load during it included), checked against the server's counters.
async fn forged_flood_row(
    ctx: &Ctx<'_>,
    h2load: &H2load,
    forged: &H2Call,
    mark: Mark,
    flood: H2loadLoop,
    failures: &mut Vec<String>,
) -> Row {
    let (run, errors) = tokio::task::spawn_blocking(move || flood.join()).await.expect("h2load flood");
    let mut m = ctx.since(mark, h2load_stats(&run));
    for e in errors.into_iter().take(3) {
        m.stats.errors += 1;
        m.stats.first_errors.push(e);
    }
    if let Err(e) = forged.postcheck(&run, m.counters.as_ref()) {
        let msg = format!("h2load post-check of the forged-key flood: {e}");
        eprintln!("FAILED CHECK: {msg}");
        failures.push(msg.clone());
        m.stats.first_errors.push(msg);
        m.stats.errors += 1;
    }
    m.h2load = Some(run);
    let in_flight = (h2load.connections * h2load.streams).to_string();
    let mut row = m.row(
        Phase::ForgedFlood,
        Client::H2load,
        "↳ the flood: `ListKeys` with a forged key (expect UNAUTHENTICATED)",
        in_flight,
    );
    row.extra = "CPU and counters: the whole flood, every load above included".into();
    row
}

/// The row of the own client's wrong-secret flood, `concurrency` in flight.
fn wrong_secret_flood_row(stats: Stats, concurrency: usize) -> Row {
    let mut row = Measured { stats, ..Measured::default() }.row(
        Phase::WrongSecretFlood,
        Client::Own,
        "↳ the flood: wrong secrets for real ids (expect NOT_FOUND)",
        concurrency.to_string(),
    );
    if row.stats.shed > 0 {
        row.extra = format!("{} shed (RESOURCE_EXHAUSTED)", row.stats.shed);
    }
    row
}
