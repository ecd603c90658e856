//! Signed job envelopes, version 1 (shared/spec/envelope.md): verifying an
//! SQS message body into an [`Envelope`] that may run, or a [`Rejection`]
//! with the spec's reason, and signing one for `submit`. Verification runs
//! the spec's steps in the spec's order so every implementation reports the
//! same reason for the same message. Nothing here may run, delete or
//! forward a job, and nothing here may read the clock: `now` is an argument.

pub mod keys;
pub mod spec;

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Serialize;

pub use keys::{Alg, GeneratedKey, KeySummary, Keyring, KeysError, SigningKey};
pub use spec::{Interrupt, JobSpec, Network, Resources, Transfer};

use spec::{quoted, Json, Members, Where};

/// The only envelope version this agent understands.
const ENVELOPE_VERSION: i128 = 1;
/// First line of every signing input (spec, "Signing input").
const SIGNING_DOMAIN: &str = "batchly-job-v1";
/// Spec default for clock skew between producer and worker.
const DEFAULT_SKEW: Duration = Duration::from_secs(60);
/// Spec default for the longest allowed `exp - iat`: 7 days.
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Why a message was refused; the strings are the spec's and travel to the
/// dead-letter queue and the `job.rejected` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Malformed,
    UnsupportedVersion,
    UnknownKey,
    BadSignature,
    NotYetValid,
    Expired,
    TtlTooLong,
    InvalidJob,
}

impl RejectReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::Expired => "expired",
            RejectReason::TtlTooLong => "ttl_too_long",
            RejectReason::InvalidJob => "invalid_job",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message: the spec's reason and a precise explanation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
    /// The job's id when the signature was good and the spec names a
    /// well-formed one (an expired or otherwise invalid but authentic job),
    /// so its `job.rejected` event can say which job it was.
    pub job_id: Option<String>,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
            job_id: None,
        }
    }

    fn for_signed_job(mut self, job_text: &str) -> Rejection {
        self.job_id = signed_job_id(job_text);
        self
    }
}

/// The `id` of a job spec whose signature verified, if it is a string that
/// follows the id rule; never used to run anything, only to name the job.
fn signed_job_id(job_text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(job_text).ok()?;
    let id = value.get("id")?.as_str()?;
    JobSpec::valid_id(id).then(|| id.to_string())
}

/// How much the worker's clock may disagree with the producer's, and how
/// long any envelope may live.
#[derive(Debug, Clone, Copy)]
pub struct VerifyPolicy {
    pub skew: Duration,
    pub max_ttl: Duration,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        VerifyPolicy {
            skew: DEFAULT_SKEW,
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

/// A verified envelope: signed by a trusted key, within its validity
/// window, and carrying a valid job spec.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub kid: String,
    pub iat: i64,
    pub exp: i64,
    pub job: JobSpec,
    /// The exact signed job text, for logging or re-publishing unchanged.
    pub job_text: String,
}

/// The outer object after step 1, before anything is trusted.
struct Unverified {
    version: i128,
    kid: String,
    iat: i64,
    exp: i64,
    job_text: String,
    sig: String,
}

/// Verifies a message body at `now_unix` (Unix seconds), following the
/// spec's steps in order; the first failure is the rejection.
pub fn verify(
    body: &[u8],
    keys: &Keyring,
    policy: &VerifyPolicy,
    now_unix: i64,
) -> Result<Envelope, Rejection> {
    let unverified =
        parse_outer(body).map_err(|detail| Rejection::new(RejectReason::Malformed, detail))?;

    if unverified.version != ENVELOPE_VERSION {
        return Err(Rejection::new(
            RejectReason::UnsupportedVersion,
            format!(
                "v is {}; this agent understands envelope version {ENVELOPE_VERSION}",
                unverified.version
            ),
        ));
    }

    let key = keys.get(&unverified.kid).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownKey,
            format!("kid {} is not in the keys file", quoted(&unverified.kid)),
        )
    })?;

    let signature = BASE64.decode(&unverified.sig).map_err(|e| {
        Rejection::new(
            RejectReason::BadSignature,
            format!("sig is not standard padded base64: {e}"),
        )
    })?;
    let message = signing_input(
        &unverified.kid,
        unverified.iat,
        unverified.exp,
        &unverified.job_text,
    );
    key.verify(&message, &signature).map_err(|problem| {
        Rejection::new(
            RejectReason::BadSignature,
            format!("kid {}: {problem}", quoted(&unverified.kid)),
        )
    })?;

    check_validity_window(unverified.iat, unverified.exp, policy, now_unix)
        .map_err(|r| r.for_signed_job(&unverified.job_text))?;

    let job = JobSpec::parse(&unverified.job_text).map_err(|detail| {
        Rejection::new(RejectReason::InvalidJob, format!("job spec: {detail}"))
            .for_signed_job(&unverified.job_text)
    })?;

    Ok(Envelope {
        kid: unverified.kid,
        iat: unverified.iat,
        exp: unverified.exp,
        job,
        job_text: unverified.job_text,
    })
}

/// Step 1: a UTF-8 JSON object with exactly the six members, each of its
/// type, with a well-formed kid and `exp > iat`.
fn parse_outer(body: &[u8]) -> Result<Unverified, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    let root: Json = serde_json::from_str(text).map_err(|e| format!("body is not JSON: {e}"))?;
    let mut members = Members::of(root, Where::Root).map_err(|e| format!("body {e}"))?;

    let version = members.required("v")?.into_integer("v")?;
    let kid = members.required("kid")?.into_string("kid")?;
    let iat = members.required("iat")?;
    let exp = members.required("exp")?;
    let job_text = members.required("job")?.into_string("job")?;
    let sig = members.required("sig")?.into_string("sig")?;
    members.finish()?;

    keys::check_kid(&kid).map_err(|problem| format!("kid {} {problem}", quoted(&kid)))?;
    let iat = unix_seconds(iat, "iat")?;
    let exp = unix_seconds(exp, "exp")?;
    if exp <= iat {
        return Err(format!("exp {exp} must be after iat {iat}"));
    }

    Ok(Unverified {
        version,
        kid,
        iat,
        exp,
        job_text,
        sig,
    })
}

/// The signing input writes times as unsigned decimals, so a negative time
/// cannot be signed as the spec describes.
fn unix_seconds(value: Json, name: &str) -> Result<i64, String> {
    let seconds = value.into_integer(name)?;
    if seconds < 0 {
        return Err(format!("{name} must not be negative, got {seconds}"));
    }
    i64::try_from(seconds).map_err(|_| format!("{name} {seconds} is too large"))
}

/// Step 5. i128 keeps every sum exact whatever the inputs.
fn check_validity_window(
    iat: i64,
    exp: i64,
    policy: &VerifyPolicy,
    now: i64,
) -> Result<(), Rejection> {
    let skew = i128::from(policy.skew.as_secs());
    let max_ttl = i128::from(policy.max_ttl.as_secs());
    let (iat, exp, now) = (i128::from(iat), i128::from(exp), i128::from(now));

    if now < iat - skew {
        return Err(Rejection::new(
            RejectReason::NotYetValid,
            format!("iat {iat} is {} s in the future (skew {skew} s)", iat - now),
        ));
    }
    if now > exp + skew {
        return Err(Rejection::new(
            RejectReason::Expired,
            format!("exp {exp} is {} s in the past (skew {skew} s)", now - exp),
        ));
    }
    let ttl = exp - iat;
    if ttl > max_ttl {
        return Err(Rejection::new(
            RejectReason::TtlTooLong,
            format!("exp - iat is {ttl} s, more than the maximum {max_ttl} s"),
        ));
    }
    Ok(())
}

/// The exact bytes that are signed (spec, "Signing input").
pub fn signing_input(kid: &str, iat: i64, exp: i64, job_text: &str) -> Vec<u8> {
    format!("{SIGNING_DOMAIN}\n{kid}\n{iat}\n{exp}\n{job_text}").into_bytes()
}

/// The outer object in the order the spec lists its members.
#[derive(Serialize)]
struct SignedBody<'a> {
    v: i128,
    kid: &'a str,
    iat: i64,
    exp: i64,
    job: &'a str,
    sig: String,
}

/// Signs `job_text` and returns the whole message body: compact JSON with
/// members in the order v, kid, iat, exp, job, sig. The caller supplies
/// sensible times (`0 <= iat < exp`); `verify` refuses anything else.
pub fn sign(key: &SigningKey, iat: i64, exp: i64, job_text: &str) -> String {
    let signature = key.sign_bytes(&signing_input(key.kid(), iat, exp, job_text));
    let body = SignedBody {
        v: ENVELOPE_VERSION,
        kid: key.kid(),
        iat,
        exp,
        job: job_text,
        sig: BASE64.encode(signature),
    };
    serde_json::to_string(&body)
        .expect("a struct of strings and integers always serializes to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::Path;

    const VECTORS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/envelope-vectors.json"
    ));
    const NOW: i64 = 1_763_851_000;
    const IAT: i64 = 1_763_850_000;
    const EXP: i64 = 1_763_853_600;
    const JOB: &str = r#"{"id": "j-1", "command": ["/bin/true"]}"#;

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).expect("vectors file is JSON")
    }

    fn field<'a>(value: &'a Value, name: &str) -> &'a str {
        value[name]
            .as_str()
            .unwrap_or_else(|| panic!("vector field {name} is a string"))
    }

    /// Keys from the vectors file, as the agent and a producer would load them.
    struct VectorKeys {
        keyring: Keyring,
        signing: Vec<SigningKey>,
        policy: VerifyPolicy,
    }

    fn vector_keys() -> VectorKeys {
        let vectors = vectors();
        let mut keyring_toml = String::new();
        let mut signing = Vec::new();
        for key in vectors["keys"].as_array().expect("keys array") {
            let (kid, alg) = (field(key, "kid"), field(key, "alg"));
            let (public, private) = match alg {
                "ed25519" => (
                    format!("public_key = \"{}\"", field(key, "public_key")),
                    format!("private_key = \"{}\"", field(key, "private_key")),
                ),
                _ => {
                    let secret = format!("secret = \"{}\"", field(key, "secret"));
                    (secret.clone(), secret)
                }
            };
            let head = format!("[[key]]\nkid = \"{kid}\"\nalg = \"{alg}\"\n");
            keyring_toml.push_str(&format!("{head}{public}\n"));
            signing.push(
                SigningKey::from_toml(&format!("{head}{private}\n"), Path::new("vectors"))
                    .expect("vector signing key"),
            );
        }
        let seconds = |name: &str| {
            Duration::from_secs(vectors[name].as_u64().expect("policy seconds in vectors"))
        };
        VectorKeys {
            keyring: Keyring::from_toml(&keyring_toml, Path::new("vectors")).expect("vector keys"),
            signing,
            policy: VerifyPolicy {
                skew: seconds("skew_s"),
                max_ttl: seconds("max_ttl_s"),
            },
        }
    }

    fn outcome(result: &Result<Envelope, Rejection>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(rejection) => rejection.reason.as_str(),
        }
    }

    fn reject(body: &str, keys: &VectorKeys) -> Rejection {
        match verify(body.as_bytes(), &keys.keyring, &keys.policy, NOW) {
            Ok(envelope) => panic!("expected {body} to be rejected, got {envelope:?}"),
            Err(rejection) => rejection,
        }
    }

    fn hmac_key(keys: &VectorKeys) -> &SigningKey {
        keys.signing
            .iter()
            .find(|k| k.alg() == Alg::HmacSha256)
            .expect("vectors have an hmac key")
    }

    fn ed_key(keys: &VectorKeys) -> &SigningKey {
        keys.signing
            .iter()
            .find(|k| k.alg() == Alg::Ed25519)
            .expect("vectors have an ed25519 key")
    }

    #[test]
    fn every_vector_verifies_to_its_expected_outcome() {
        let keys = vector_keys();
        let vectors = vectors();
        let list = vectors["vectors"].as_array().expect("vectors array");
        assert!(list.len() >= 20, "the vectors file lost entries");
        for vector in list {
            let now = vector["now"].as_i64().expect("now is an integer");
            let result = verify(
                field(vector, "body").as_bytes(),
                &keys.keyring,
                &keys.policy,
                now,
            );
            assert_eq!(
                outcome(&result),
                field(vector, "expect"),
                "vector {}: {result:?}",
                field(vector, "name")
            );
        }
    }

    #[test]
    fn every_valid_vector_re_signs_to_the_same_signature() {
        let keys = vector_keys();
        let vectors = vectors();
        let mut checked_algs = Vec::new();
        for vector in vectors["vectors"].as_array().expect("vectors array") {
            if field(vector, "expect") != "ok" {
                continue;
            }
            let now = vector["now"].as_i64().expect("now is an integer");
            let body = field(vector, "body");
            let envelope =
                verify(body.as_bytes(), &keys.keyring, &keys.policy, now).expect("valid vector");
            let key = keys
                .signing
                .iter()
                .find(|k| k.kid() == envelope.kid)
                .expect("vector kid has a signing key");
            let resigned = sign(key, envelope.iat, envelope.exp, &envelope.job_text);
            let resigned: Value = serde_json::from_str(&resigned).expect("sign emits JSON");
            let original: Value = serde_json::from_str(body).expect("vector body is JSON");
            assert_eq!(
                resigned["sig"],
                original["sig"],
                "vector {}",
                field(vector, "name")
            );
            checked_algs.push(key.alg());
        }
        for alg in [Alg::Ed25519, Alg::HmacSha256] {
            assert!(
                checked_algs.contains(&alg),
                "no valid {alg} vector was re-signed"
            );
        }
    }

    #[test]
    fn signing_input_matches_the_spec_example() {
        let vectors = vectors();
        let example = &vectors["signing_input_example"];
        let input = signing_input(
            field(example, "kid"),
            example["iat"].as_i64().expect("iat"),
            example["exp"].as_i64().expect("exp"),
            field(example, "job"),
        );
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, field(example, "signing_input_hex"));
    }

    #[test]
    fn signed_body_is_compact_json_with_members_in_spec_order() {
        let keys = vector_keys();
        let body = sign(hmac_key(&keys), IAT, EXP, "{\"id\": \"x\"}\n");
        let prefix = format!(
            r#"{{"v":1,"kid":"test-hmac","iat":{IAT},"exp":{EXP},"job":"{{\"id\": \"x\"}}\n","sig":""#
        );
        assert!(body.starts_with(&prefix), "{body}");
        assert!(body.ends_with("\"}"), "{body}");
    }

    #[test]
    fn signed_message_verifies_and_carries_the_parsed_job() {
        let keys = vector_keys();
        for key in &keys.signing {
            let body = sign(key, IAT, EXP, JOB);
            let envelope = verify(body.as_bytes(), &keys.keyring, &keys.policy, NOW)
                .expect("own signature verifies");
            assert_eq!(envelope.kid, key.kid());
            assert_eq!((envelope.iat, envelope.exp), (IAT, EXP));
            assert_eq!(envelope.job.id, "j-1");
            assert_eq!(envelope.job_text, JOB);
        }
    }

    #[test]
    fn generated_keys_round_trip_through_their_files_for_both_algorithms() {
        for alg in [Alg::Ed25519, Alg::HmacSha256] {
            let generated = SigningKey::generate(alg, "rt-2026").expect("generate");
            let signing =
                SigningKey::from_toml(&generated.to_signing_file_toml(), Path::new("signing.toml"))
                    .expect("signing file parses");
            let keyring =
                Keyring::from_toml(&generated.verification_entry_toml(), Path::new("keys.toml"))
                    .expect("verification entry parses");
            let body = sign(&signing, IAT, EXP, JOB);
            let envelope = verify(body.as_bytes(), &keyring, &VerifyPolicy::default(), NOW)
                .unwrap_or_else(|r| panic!("{alg}: {r}"));
            assert_eq!(envelope.kid, "rt-2026");

            let other = SigningKey::generate(alg, "rt-2026").expect("generate");
            let forged = sign(&other, IAT, EXP, JOB);
            let rejection = verify(forged.as_bytes(), &keyring, &VerifyPolicy::default(), NOW)
                .expect_err("a different key's signature must not verify");
            assert_eq!(rejection.reason, RejectReason::BadSignature);
        }
    }

    #[test]
    fn reasons_use_the_spec_strings() {
        let all = [
            (RejectReason::Malformed, "malformed"),
            (RejectReason::UnsupportedVersion, "unsupported_version"),
            (RejectReason::UnknownKey, "unknown_key"),
            (RejectReason::BadSignature, "bad_signature"),
            (RejectReason::NotYetValid, "not_yet_valid"),
            (RejectReason::Expired, "expired"),
            (RejectReason::TtlTooLong, "ttl_too_long"),
            (RejectReason::InvalidJob, "invalid_job"),
        ];
        for (reason, text) in all {
            assert_eq!(reason.as_str(), text);
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn expired_detail_says_how_far_past_and_the_skew() {
        let keys = vector_keys();
        let body = sign(ed_key(&keys), 1_763_840_000, 1_763_850_939, JOB);
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::Expired);
        assert_eq!(
            rejection.detail,
            "exp 1763850939 is 61 s in the past (skew 60 s)"
        );
        assert_eq!(
            rejection.to_string(),
            "expired: exp 1763850939 is 61 s in the past (skew 60 s)"
        );
    }

    #[test]
    fn not_yet_valid_detail_says_how_far_ahead() {
        let keys = vector_keys();
        let body = sign(ed_key(&keys), NOW + 61, NOW + 3600, JOB);
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::NotYetValid);
        assert_eq!(
            rejection.detail,
            format!("iat {} is 61 s in the future (skew 60 s)", NOW + 61)
        );
    }

    #[test]
    fn an_authentic_but_expired_job_is_rejected_by_name_and_a_forged_one_is_not() {
        let keys = vector_keys();
        let expired = sign(ed_key(&keys), NOW - 7200, NOW - 3600, JOB);
        let rejection = reject(&expired, &keys);
        assert_eq!(rejection.reason, RejectReason::Expired);
        assert_eq!(rejection.job_id.as_deref(), Some("j-1"));
        let forged = expired.replace("j-1", "j-2");
        let rejection = reject(&forged, &keys);
        assert_eq!(rejection.reason, RejectReason::BadSignature);
        assert_eq!(rejection.job_id, None);
    }

    #[test]
    fn validity_window_edges_are_inclusive() {
        let keys = vector_keys();
        let key = ed_key(&keys);
        let at_skew_edge = sign(key, NOW + 60, NOW + 3600, JOB);
        assert!(verify(at_skew_edge.as_bytes(), &keys.keyring, &keys.policy, NOW).is_ok());
        let at_exp_edge = sign(key, NOW - 3600, NOW - 60, JOB);
        assert!(verify(at_exp_edge.as_bytes(), &keys.keyring, &keys.policy, NOW).is_ok());
        let max_ttl = sign(key, NOW - 10, NOW - 10 + 604_800, JOB);
        assert!(verify(max_ttl.as_bytes(), &keys.keyring, &keys.policy, NOW).is_ok());
    }

    #[test]
    fn unknown_key_detail_names_the_kid() {
        let keys = vector_keys();
        let body = format!(
            r#"{{"v": 1, "kid": "nobody", "iat": {IAT}, "exp": {EXP}, "job": "{{}}", "sig": ""}}"#
        );
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::UnknownKey);
        assert_eq!(rejection.detail, r#"kid "nobody" is not in the keys file"#);
    }

    /// The vectors' valid ed25519 body with one member's raw JSON replaced.
    fn body_with(member: &str, raw: &str) -> String {
        let mut members = vec![
            ("v", "1".to_owned()),
            ("kid", r#""test-ed""#.to_owned()),
            ("iat", IAT.to_string()),
            ("exp", EXP.to_string()),
            ("job", r#""{}""#.to_owned()),
            ("sig", r#""AAAA""#.to_owned()),
        ];
        for (name, value) in &mut members {
            if *name == member {
                *value = raw.to_owned();
            }
        }
        let joined: Vec<String> = members
            .iter()
            .map(|(name, value)| format!(r#""{name}": {value}"#))
            .collect();
        format!("{{{}}}", joined.join(", "))
    }

    #[test]
    fn integers_given_as_floats_or_strings_are_malformed() {
        let keys = vector_keys();
        for (member, raw, detail) in [
            (
                "iat",
                "1763850000.0",
                "iat: must be an integer, got the non-integer number 1763850000.0",
            ),
            (
                "exp",
                r#""1763853600""#,
                "exp: must be an integer, got a string",
            ),
            (
                "v",
                "1.0",
                "v: must be an integer, got the non-integer number 1.0",
            ),
        ] {
            let rejection = reject(&body_with(member, raw), &keys);
            assert_eq!(rejection.reason, RejectReason::Malformed);
            assert_eq!(rejection.detail, detail);
        }
    }

    #[test]
    fn job_given_as_an_object_is_malformed() {
        let keys = vector_keys();
        let rejection = reject(&body_with("job", JOB), &keys);
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert_eq!(rejection.detail, "job: must be a string, got an object");
    }

    #[test]
    fn duplicate_member_is_malformed() {
        let keys = vector_keys();
        let body = body_with("v", r#"1, "v": 1"#);
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert!(
            rejection.detail.contains(r#"duplicate member "v""#),
            "{rejection}"
        );
    }

    #[test]
    fn array_holding_the_members_in_order_is_malformed() {
        let keys = vector_keys();
        let body = format!(r#"[1, "test-ed", {IAT}, {EXP}, "{{}}", "AAAA"]"#);
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert_eq!(rejection.detail, "body must be a JSON object, got an array");
    }

    #[test]
    fn invalid_utf8_body_is_malformed() {
        let keys = vector_keys();
        let rejection =
            verify(b"{\"v\": \xff}", &keys.keyring, &keys.policy, NOW).expect_err("not UTF-8");
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert!(
            rejection.detail.starts_with("body is not UTF-8"),
            "{rejection}"
        );
    }

    #[test]
    fn missing_and_unknown_members_are_named() {
        let keys = vector_keys();
        let missing = reject(
            &format!(r#"{{"v": 1, "kid": "test-ed", "iat": {IAT}, "exp": {EXP}, "job": "{{}}"}}"#),
            &keys,
        );
        assert_eq!(missing.reason, RejectReason::Malformed);
        assert_eq!(missing.detail, r#"missing member "sig""#);
        let unknown = reject(&body_with("sig", r#""AAAA", "alg": "none""#), &keys);
        assert_eq!(unknown.reason, RejectReason::Malformed);
        assert_eq!(unknown.detail, r#"unknown member "alg""#);
    }

    #[test]
    fn kid_outside_the_charset_is_malformed_and_says_so() {
        let keys = vector_keys();
        let rejection = reject(&body_with("kid", r#""../etc/passwd""#), &keys);
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert_eq!(
            rejection.detail,
            r#"kid "../etc/passwd" contains '/'; allowed are A-Z a-z 0-9 . _ -"#
        );
        let long = format!(r#""{}""#, "k".repeat(65));
        let rejection = reject(&body_with("kid", &long), &keys);
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert!(rejection
            .detail
            .ends_with("must be 1 to 64 characters, got 65"));
    }

    #[test]
    fn exp_not_after_iat_is_malformed() {
        let keys = vector_keys();
        let rejection = reject(&body_with("exp", &IAT.to_string()), &keys);
        assert_eq!(rejection.reason, RejectReason::Malformed);
        assert_eq!(
            rejection.detail,
            format!("exp {IAT} must be after iat {IAT}")
        );
    }

    #[test]
    fn negative_or_oversized_times_are_malformed() {
        let keys = vector_keys();
        let negative = reject(&body_with("iat", "-1"), &keys);
        assert_eq!(negative.reason, RejectReason::Malformed);
        assert_eq!(negative.detail, "iat must not be negative, got -1");
        let huge = reject(&body_with("exp", "9223372036854775808"), &keys);
        assert_eq!(huge.reason, RejectReason::Malformed);
        assert_eq!(huge.detail, "exp 9223372036854775808 is too large");
    }

    #[test]
    fn times_at_the_limits_of_i64_are_judged_without_overflow() {
        let keys = vector_keys();
        let key = ed_key(&keys);
        let far_future = sign(key, i64::MAX - 1, i64::MAX, JOB);
        let rejection = reject(&far_future, &keys);
        assert_eq!(rejection.reason, RejectReason::NotYetValid);

        let forever = sign(key, 0, i64::MAX, JOB);
        let rejection = reject(&forever, &keys);
        assert_eq!(rejection.reason, RejectReason::TtlTooLong);

        let ancient = sign(key, 0, 1, JOB);
        let rejection =
            verify(ancient.as_bytes(), &keys.keyring, &keys.policy, i64::MAX).expect_err("ancient");
        assert_eq!(rejection.reason, RejectReason::Expired);

        let huge_policy = VerifyPolicy {
            skew: Duration::from_secs(u64::MAX),
            max_ttl: Duration::from_secs(u64::MAX),
        };
        assert!(verify(forever.as_bytes(), &keys.keyring, &huge_policy, i64::MIN).is_ok());
    }

    #[test]
    fn version_is_checked_before_the_key() {
        let keys = vector_keys();
        let body = body_with("v", "2").replace("test-ed", "nobody");
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::UnsupportedVersion);
        assert_eq!(
            rejection.detail,
            "v is 2; this agent understands envelope version 1"
        );
    }

    #[test]
    fn signature_is_checked_before_times_and_job() {
        let keys = vector_keys();
        let expired_forgery = body_with("exp", &(IAT + 1).to_string());
        let rejection = verify(
            expired_forgery.as_bytes(),
            &keys.keyring,
            &keys.policy,
            NOW + 100_000,
        )
        .expect_err("forged");
        assert_eq!(rejection.reason, RejectReason::BadSignature);
        let rejection = reject(&body_with("job", r#""not json""#), &keys);
        assert_eq!(rejection.reason, RejectReason::BadSignature);
    }

    #[test]
    fn signature_of_the_wrong_length_is_a_bad_signature() {
        let keys = vector_keys();
        let body = sign(hmac_key(&keys), IAT, EXP, JOB);
        let mut value: Value = serde_json::from_str(&body).expect("JSON");
        let sig = BASE64
            .decode(value["sig"].as_str().expect("sig"))
            .expect("base64");
        value["sig"] = Value::from(BASE64.encode(&sig[..16]));
        let rejection = reject(&value.to_string(), &keys);
        assert_eq!(rejection.reason, RejectReason::BadSignature);
        assert_eq!(
            rejection.detail,
            r#"kid "test-hmac": an hmac-sha256 signature is 32 bytes, got 16 bytes"#
        );
    }

    #[test]
    fn unpadded_base64_signature_is_a_bad_signature() {
        let keys = vector_keys();
        let body = sign(hmac_key(&keys), IAT, EXP, JOB);
        let unpadded = body.replace("=\"}", "\"}");
        assert_ne!(unpadded, body, "a 32-byte signature is padded in base64");
        let rejection = reject(&unpadded, &keys);
        assert_eq!(rejection.reason, RejectReason::BadSignature);
        assert!(rejection
            .detail
            .starts_with("sig is not standard padded base64"));
    }

    #[test]
    fn invalid_job_detail_names_the_member() {
        let keys = vector_keys();
        let body = sign(
            ed_key(&keys),
            IAT,
            EXP,
            r#"{"id": "j", "command": ["/bin/true"], "comand": ["x"]}"#,
        );
        let rejection = reject(&body, &keys);
        assert_eq!(rejection.reason, RejectReason::InvalidJob);
        assert_eq!(rejection.detail, r#"job spec: unknown member "comand""#);
    }

    #[test]
    fn default_policy_is_sixty_seconds_skew_and_seven_days_ttl() {
        let policy = VerifyPolicy::default();
        assert_eq!(policy.skew, Duration::from_secs(60));
        assert_eq!(policy.max_ttl, Duration::from_secs(604_800));
    }
}
