//! The shared state of the run and its checked calls: every answer is
//! checked for the outcome it must have, and counted.

use std::{
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use takumo_keys::{
    domain::keys::{self, KEY_LEN},
    proto::pb::{
        self, CreateKeyRequest, KeyStatus, SetKeyStatusRequest, VerifyCode, VerifyKeyRequest, VerifyKeyResponse,
    },
};
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
};

use crate::stats::{Kind, Stats};
use crate::support::{keygen::with_wrong_checksum, load::status_text};
use crate::tasks::Mix;
use crate::{ACTOR, Client, HELD_SCOPES, ID_RANGE, MISSING_SCOPE, Opts};

#[derive(Debug, Clone)]
pub struct TestKey {
    pub secret: String,
    pub id: String,
    pub org: usize,
}

pub struct Ctx {
    /// `[replica][connection]`.
    pub clients: Vec<Vec<Client>>,
    pub auth: AsciiMetadataValue,
    pub orgs: Vec<String>,
    /// Never changed: must verify VALID every time.
    pub stable: Vec<TestKey>,
    /// Toggled between ACTIVE and DISABLED by their owning toggle task.
    pub toggle: Vec<TestKey>,
    /// Created during the run and never changed afterwards.
    pub pool: RwLock<Vec<TestKey>>,
    pub malformed: Vec<String>,
    pub mix: Mix,
    pub bound: Duration,
    pub names: AtomicU64,
    pub opts: Opts,
}

/// One client and the replica it talks to.
pub struct Conn {
    pub replica: usize,
    pub c: Client,
}

/// What a VerifyKey answer may be.
#[derive(Clone, Copy)]
pub struct Expect<'a> {
    pub codes: &'a [VerifyCode],
    /// For answers that resolve to a key: the key it must name.
    pub key: Option<&'a TestKey>,
}

impl<'a> Expect<'a> {
    pub fn strict(code: VerifyCode, key: &'a TestKey) -> Self {
        Expect { codes: std::slice::from_ref(CODES.iter().find(|c| **c == code).expect("known code")), key: Some(key) }
    }

    pub fn code(code: VerifyCode) -> Self {
        Expect { codes: std::slice::from_ref(CODES.iter().find(|c| **c == code).expect("known code")), key: None }
    }
}

static CODES: [VerifyCode; 9] = [
    VerifyCode::Unspecified,
    VerifyCode::Valid,
    VerifyCode::Malformed,
    VerifyCode::NotFound,
    VerifyCode::Disabled,
    VerifyCode::Revoked,
    VerifyCode::Expired,
    VerifyCode::InsufficientScope,
    VerifyCode::WrongOrganization,
];

/// Answers whose secret was proven, whatever the key's status or scopes:
/// these, and only these, name the key (MALFORMED and NOT_FOUND carry no
/// identity). Usage is narrower: only VALID answers count as API calls.
pub fn proves_secret(code: VerifyCode) -> bool {
    !matches!(code, VerifyCode::Malformed | VerifyCode::NotFound | VerifyCode::Unspecified)
}

/// Answers that count as an API call of the key (`api_calls_24h`): accepted
/// ones only (the soak's management calls use a service token, which counts
/// nothing).
pub fn counts_as_call(code: VerifyCode) -> bool {
    code == VerifyCode::Valid
}

pub fn request<T>(auth: &AsciiMetadataValue, actor: bool, body: T) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert("authorization", auth.clone());
    if actor {
        r.metadata_mut().insert("x-takumo-actor", MetadataValue::from_static(ACTOR));
    }
    r
}

pub fn body(key: &str) -> VerifyKeyRequest {
    VerifyKeyRequest { key: key.to_owned(), required_scopes: vec![HELD_SCOPES[0].to_owned()], organization_id: None }
}

pub fn create_body(org: &str, name: String) -> CreateKeyRequest {
    CreateKeyRequest {
        organization_id: org.to_owned(),
        name,
        scopes: Some(pb::create_key_request::Scopes::Preset(pb::ScopePreset::ReadOnly as i32)),
        environment: pb::Environment::Live as i32,
        expires_at: None,
        ..Default::default()
    }
}

pub fn check_created(r: &pb::CreateKeyResponse, orgs: &[String], org: usize) -> Result<TestKey, String> {
    let s = &r.secret;
    let k = r.key.as_ref().ok_or("no key in the answer")?;
    if s.len() != KEY_LEN || !s.starts_with("tk_live_") || keys::parse(s).is_none() {
        return Err(format!("secret of unexpected shape ({} characters)", s.len()));
    }
    let problems = [
        (k.id != s[ID_RANGE], "id is not the key's id part"),
        (k.prefix != s[..16], "prefix is not the key's first 16 characters"),
        (k.status != KeyStatus::Active as i32, "status is not ACTIVE"),
        (k.organization_id != orgs[org], "wrong organization"),
        (k.created_by != ACTOR, "created_by is not the x-takumo-actor"),
        (!HELD_SCOPES.iter().all(|h| k.scopes.iter().any(|s| s == h)), "read-only scopes missing"),
        (k.scopes.iter().any(|s| s == MISSING_SCOPE), "read-only key holds fleet.manage"),
    ];
    match problems.iter().find(|(bad, _)| *bad) {
        Some((_, what)) => Err(format!("created key {}: {what}", k.id)),
        None => Ok(TestKey { secret: s.clone(), id: k.id.clone(), org }),
    }
}

impl Ctx {
    pub fn conn(&self, replica: usize, i: usize) -> Conn {
        let cs = &self.clients[replica];
        Conn { replica, c: cs[i % cs.len()].clone() }
    }

    pub fn req<T>(&self, body: T) -> Request<T> {
        request(&self.auth, true, body)
    }

    pub fn name(&self, tag: &str) -> String {
        format!("{tag}-{}", self.names.fetch_add(1, Ordering::Relaxed))
    }

    fn judge(&self, r: &VerifyKeyResponse, exp: &Expect<'_>) -> Result<VerifyCode, String> {
        let code = VerifyCode::try_from(r.code).map_err(|_| format!("unknown verify code {}", r.code))?;
        if !exp.codes.contains(&code) {
            let want: Vec<&str> = exp.codes.iter().map(|c| c.as_str_name()).collect();
            return Err(format!("expected {}, got {}", want.join(" or "), code.as_str_name()));
        }
        if r.valid != (code == VerifyCode::Valid) {
            return Err(format!("valid={} with {}", r.valid, code.as_str_name()));
        }
        if proves_secret(code) {
            if let Some(k) = exp.key
                && (r.key_id != k.id || r.organization_id != self.orgs[k.org])
            {
                return Err(format!(
                    "{} names key {} of {}, expected key {} of {}",
                    code.as_str_name(),
                    r.key_id,
                    r.organization_id,
                    k.id,
                    self.orgs[k.org]
                ));
            }
            if code == VerifyCode::InsufficientScope && r.missing_scopes != [MISSING_SCOPE] {
                return Err(format!("missing_scopes {:?}, expected [{MISSING_SCOPE}]", r.missing_scopes));
            }
        } else if !r.key_id.is_empty() || !r.organization_id.is_empty() {
            return Err(format!("{} answer carries a key identity", code.as_str_name()));
        }
        Ok(code)
    }

    /// One checked VerifyKey. Every answer is counted (codes, resolved usage) whatever was expected.
    pub async fn verify(
        &self,
        st: &mut Stats,
        kind: Kind,
        c: &mut Conn,
        body: VerifyKeyRequest,
        exp: Expect<'_>,
    ) -> Option<VerifyCode> {
        let t0 = Instant::now();
        let r = c.c.verify_key(request(&self.auth, false, body)).await;
        let r = match r {
            Err(s) => Err(status_text(&s)),
            Ok(r) => {
                let r = r.into_inner();
                st.note_verify(&r, &self.orgs);
                self.judge(&r, &exp)
            }
        };
        st.record(kind, c.replica, t0, r)
    }

    /// After a change made elsewhere at `since`: verifies until the answer is
    /// `want`; `stale` (the answer before the change) is accepted only within
    /// the propagation bound.
    async fn converge(
        &self,
        st: &mut Stats,
        c: &mut Conn,
        key: &TestKey,
        want: VerifyCode,
        stale: VerifyCode,
        since: Instant,
    ) {
        let both = [want, stale];
        let mut first = true;
        loop {
            // Lag is when the first request that saw the change was sent, so that a
            // slow answer (a cache miss queued for argon2) is not counted as propagation.
            let sent = since.elapsed();
            let within = sent < self.bound;
            let codes: &[VerifyCode] = if within { &both } else { &both[..1] };
            let exp = Expect { codes, key: Some(key) };
            match self.verify(st, Kind::VerifyCheck, c, body(&key.secret), exp).await {
                Some(code) if code == want => {
                    st.converged += 1;
                    st.converged_at_once += u64::from(first);
                    st.max_lag = st.max_lag.max(sent);
                    return;
                }
                Some(_) => {
                    st.stale += 1;
                    first = false;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None => {
                    if !within {
                        st.late += 1;
                    }
                    return;
                }
            }
        }
    }

    /// Right after a change made through `here`: checks it there (at once) and on
    /// `there` (until it converges) concurrently, so that a slow answer on one
    /// side (a miss waiting for argon2) does not delay the other's first look.
    pub async fn check_change(
        &self,
        st: &mut Stats,
        here: &mut Conn,
        there: &mut Conn,
        key: &TestKey,
        want: VerifyCode,
        stale: VerifyCode,
    ) {
        let since = Instant::now();
        let mut other = Stats::new(self.orgs.len());
        tokio::join!(
            self.verify(st, Kind::VerifyCheck, here, body(&key.secret), Expect::strict(want, key)),
            self.converge(&mut other, there, key, want, stale, since),
        );
        st.merge(other);
    }

    pub async fn create(&self, st: &mut Stats, c: &mut Conn, org: usize, tag: &str) -> Option<TestKey> {
        let t0 = Instant::now();
        let r = c.c.create_key(self.req(create_body(&self.orgs[org], self.name(tag)))).await;
        let r = r.map_err(|s| status_text(&s)).and_then(|r| check_created(&r.into_inner(), &self.orgs, org));
        st.record(Kind::Create, c.replica, t0, r)
    }

    /// SetKeyStatus that must succeed and answer the new status.
    pub async fn set_status(&self, st: &mut Stats, c: &mut Conn, key: &TestKey, status: KeyStatus) -> bool {
        let t0 = Instant::now();
        let r = c.c.set_key_status(self.req(SetKeyStatusRequest { id: key.id.clone(), status: status as i32 })).await;
        let r = match r {
            Ok(r) if r.get_ref().id == key.id && r.get_ref().status == status as i32 => Ok(()),
            Ok(r) => {
                Err(format!("key {} answered status {} after setting {}", key.id, r.get_ref().status, status as i32))
            }
            Err(s) => Err(status_text(&s)),
        };
        st.record(Kind::SetStatus, c.replica, t0, r).is_some()
    }
}

/// `Ok` when the call failed with exactly `code`.
pub fn expect_code<T>(r: Result<T, Status>, code: Code) -> Result<(), String> {
    match r {
        Err(s) if s.code() == code => Ok(()),
        Err(s) => Err(format!("expected {code:?}, got {}", status_text(&s))),
        Ok(_) => Err(format!("expected {code:?}, got OK")),
    }
}

/// Keys that must be MALFORMED: garbage, wrong lengths, typos (checksum), wrong alphabet.
pub fn malformed_keys(k: &str) -> Vec<String> {
    let mut typo = k.as_bytes().to_vec();
    typo[30] = if typo[30] == b'a' { b'b' } else { b'a' };
    vec![
        String::new(),
        "tk_live_".into(),
        "not-a-key-at-all".into(),
        k[..KEY_LEN - 1].into(),
        format!("{k}0"),
        String::from_utf8(typo).expect("ascii"),
        with_wrong_checksum(k),
        k.replacen("tk_live_", "tk_prod_", 1),
        k.to_ascii_uppercase(),
        format!("tk_live_{}", "-".repeat(KEY_LEN - 8)),
        format!("tk_live_{}", "é".repeat((KEY_LEN - 8) / 2)),
        format!(" {}", &k[..KEY_LEN - 1]),
        "A".repeat(4096),
    ]
}
