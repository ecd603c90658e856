//! Key material: the agent's verification keys file ([`Keyring`]) and a
//! producer's signing key file ([`SigningKey`]), both TOML with one
//! `[[key]]` table per key. It owns the file permission rules and the
//! checks that make a loaded key usable. It must never print, log or
//! format key material (secrets, seeds, or anything derived from them
//! other than a truncated fingerprint), and never let a message choose
//! a key's algorithm.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::Signer;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Longest key id (spec: 1–64 chars).
const MAX_KID_CHARS: usize = 64;
/// Shortest accepted HMAC secret (spec: "at least 32 bytes").
const MIN_HMAC_SECRET_BYTES: usize = 32;
/// Length of a secret made by [`SigningKey::generate`]: RFC 2104 asks for at
/// least the hash output length, 32 bytes for SHA-256.
const GENERATED_HMAC_SECRET_BYTES: usize = 32;
/// Hex characters of SHA-256 shown in a fingerprint: enough to tell keys apart.
const FINGERPRINT_HEX_CHARS: usize = 16;
/// Permission bits meaning "group or others may write".
const GROUP_OR_OTHER_WRITE: u32 = 0o022;
/// Permission bits meaning "group or others may read".
const GROUP_OR_OTHER_READ: u32 = 0o044;

type HmacSha256 = Hmac<Sha256>;

/// A key's algorithm. It belongs to the key, never to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Ed25519,
    HmacSha256,
}

impl Alg {
    pub fn as_str(&self) -> &'static str {
        match self {
            Alg::Ed25519 => "ed25519",
            Alg::HmacSha256 => "hmac-sha256",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Alg {
    type Err = String;

    fn from_str(s: &str) -> Result<Alg, String> {
        match s {
            "ed25519" => Ok(Alg::Ed25519),
            "hmac-sha256" => Ok(Alg::HmacSha256),
            _ => Err(format!(
                "unknown alg \"{s}\"; expected \"ed25519\" or \"hmac-sha256\""
            )),
        }
    }
}

/// What went wrong with a keys file, a signing key file, or key generation.
/// Every message names the file and says how to fix it where that is known.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading {role} {}: {source}", path.display())]
    Read {
        role: FileRole,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{role} {} is writable by group or others (mode {mode:04o}); run: chmod 600 {}",
        path.display(), path.display()
    )]
    WritableByOthers {
        role: FileRole,
        path: PathBuf,
        mode: u32,
    },

    #[error(
        "{role} {} holds {material} and is readable by group or others (mode {mode:04o}); run: chmod 600 {}",
        path.display(), path.display()
    )]
    SecretReadableByOthers {
        role: FileRole,
        path: PathBuf,
        mode: u32,
        material: &'static str,
    },

    #[error("{role} {}: {problem}", path.display())]
    Syntax {
        role: FileRole,
        path: PathBuf,
        problem: String,
    },

    #[error("{role} {}: no [[key]] entries", path.display())]
    NoKeys { role: FileRole, path: PathBuf },

    #[error("{role} {}: {}: {problem}", path.display(), entry_label(*entry, kid.as_deref()))]
    Entry {
        role: FileRole,
        path: PathBuf,
        /// 1-based position of the `[[key]]` table.
        entry: usize,
        kid: Option<String>,
        problem: String,
    },

    #[error("{role} {}: duplicate kid \"{kid}\" (entries {first} and {second})", path.display())]
    DuplicateKid {
        role: FileRole,
        path: PathBuf,
        kid: String,
        first: usize,
        second: usize,
    },

    #[error(
        "keys file {}: key \"{kid}\" (entry {entry}) has a private_key: this is a signing key file; \
         workers need only the public_key (the verification entry printed by keygen)",
        path.display()
    )]
    PrivateKeyInKeysFile {
        path: PathBuf,
        entry: usize,
        kid: String,
    },

    #[error("signing key file {}: must hold exactly one [[key]], found {count}", path.display())]
    NotOneSigningKey { path: PathBuf, count: usize },

    #[error("key id \"{kid}\": {problem}")]
    InvalidKid { kid: String, problem: String },

    #[error("gathering random bytes for a new key: {source}")]
    Random {
        #[source]
        source: rand::Error,
    },
}

impl KeysError {
    /// The file the error is about, if it is about a file.
    pub fn path(&self) -> Option<&Path> {
        match self {
            KeysError::Read { path, .. }
            | KeysError::WritableByOthers { path, .. }
            | KeysError::SecretReadableByOthers { path, .. }
            | KeysError::Syntax { path, .. }
            | KeysError::NoKeys { path, .. }
            | KeysError::Entry { path, .. }
            | KeysError::DuplicateKid { path, .. }
            | KeysError::PrivateKeyInKeysFile { path, .. }
            | KeysError::NotOneSigningKey { path, .. } => Some(path),
            KeysError::InvalidKid { .. } | KeysError::Random { .. } => None,
        }
    }
}

fn entry_label(entry: usize, kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("key \"{kid}\" (entry {entry})"),
        None => format!("entry {entry}"),
    }
}

/// Which kind of file an error is about, as the user calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    KeysFile,
    SigningKeyFile,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::KeysFile => "keys file",
            FileRole::SigningKeyFile => "signing key file",
        })
    }
}

/// Checks the spec's key id rule; shared with the envelope parser.
pub(super) fn check_kid(kid: &str) -> Result<(), String> {
    let len = kid.chars().count();
    if len == 0 || len > MAX_KID_CHARS {
        return Err(format!(
            "must be 1 to {MAX_KID_CHARS} characters, got {len}"
        ));
    }
    if let Some(bad) = kid
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("contains {bad:?}; allowed are A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// What a key looks like in a listing: never the material itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySummary {
    pub kid: String,
    pub alg: Alg,
    /// `sha256:` and the first 16 hex chars of SHA-256 of the public key
    /// (ed25519) or of the secret (hmac-sha256).
    pub fingerprint: String,
}

fn fingerprint(material: &[u8]) -> String {
    let digest = Sha256::digest(material);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{}", &hex[..FINGERPRINT_HEX_CHARS])
}

/// What the agent checks a signature with.
#[derive(Clone)]
pub(super) enum VerificationKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    Hmac(Vec<u8>),
}

impl VerificationKey {
    fn alg(&self) -> Alg {
        match self {
            VerificationKey::Ed25519(_) => Alg::Ed25519,
            VerificationKey::Hmac(_) => Alg::HmacSha256,
        }
    }

    fn fingerprint(&self) -> String {
        match self {
            VerificationKey::Ed25519(public) => fingerprint(public.as_bytes()),
            VerificationKey::Hmac(secret) => fingerprint(secret),
        }
    }

    /// Checks `signature` over `message` with this key's own algorithm. The
    /// error says why, without echoing any material.
    pub(super) fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), String> {
        match self {
            VerificationKey::Ed25519(public) => {
                let signature = ed25519_dalek::Signature::from_slice(signature).map_err(|_| {
                    format!(
                        "an ed25519 signature is 64 bytes, got {} bytes",
                        signature.len()
                    )
                })?;
                // verify_strict also refuses malleable signatures and small-order points.
                public
                    .verify_strict(message, &signature)
                    .map_err(|_| "ed25519 signature does not verify with this key".to_owned())
            }
            VerificationKey::Hmac(secret) => {
                if signature.len() != 32 {
                    return Err(format!(
                        "an hmac-sha256 signature is 32 bytes, got {} bytes",
                        signature.len()
                    ));
                }
                let mut mac = new_hmac(secret);
                mac.update(message);
                // verify_slice compares in constant time.
                mac.verify_slice(signature)
                    .map_err(|_| "hmac-sha256 signature does not match this key".to_owned())
            }
        }
    }
}

fn new_hmac(secret: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(secret)
        .expect("HMAC accepts keys of any length, so new_from_slice cannot fail")
}

/// The keys the agent trusts, by kid. Several may be live at once (rotation).
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<String, VerificationKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.summaries()).finish()
    }
}

impl Keyring {
    /// Reads a verification keys file, refusing it if its permissions
    /// would let someone else plant a key or read a secret.
    pub fn load(path: &Path) -> Result<Keyring, KeysError> {
        let (text, mode) = read_private_file(path, FileRole::KeysFile)?;
        let keyring = Keyring::from_toml(&text, path)?;
        if keyring
            .keys
            .values()
            .any(|key| matches!(key, VerificationKey::Hmac(_)))
        {
            refuse_if_readable(path, FileRole::KeysFile, mode, "an hmac-sha256 secret")?;
        }
        Ok(keyring)
    }

    /// Parses a keys file's text; `origin` only names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Keyring, KeysError> {
        let role = FileRole::KeysFile;
        let entries = parse_entries(text, origin, role)?;
        let mut keys = BTreeMap::new();
        let mut first_entry: BTreeMap<String, usize> = BTreeMap::new();
        for (entry, raw) in entries {
            let kid = raw.kid.clone();
            let key = verification_key(raw, origin, entry)?;
            if let Some(&first) = first_entry.get(&kid) {
                return Err(KeysError::DuplicateKid {
                    role,
                    path: origin.to_owned(),
                    kid,
                    first,
                    second: entry,
                });
            }
            first_entry.insert(kid.clone(), entry);
            keys.insert(kid, key);
        }
        Ok(Keyring { keys })
    }

    /// Keys for display, material redacted, sorted by kid.
    pub fn summaries(&self) -> Vec<KeySummary> {
        self.keys
            .iter()
            .map(|(kid, key)| KeySummary {
                kid: kid.clone(),
                alg: key.alg(),
                fingerprint: key.fingerprint(),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(super) fn get(&self, kid: &str) -> Option<&VerificationKey> {
        self.keys.get(kid)
    }
}

/// A producer's key: signs envelopes for `batchly-agent submit`.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    material: SigningMaterial,
}

#[derive(Clone)]
enum SigningMaterial {
    Ed25519(ed25519_dalek::SigningKey),
    Hmac(Vec<u8>),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .field("fingerprint", &self.summary().fingerprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a signing key file, which must hold exactly one key and be
    /// readable and writable by its owner only.
    pub fn load(path: &Path) -> Result<SigningKey, KeysError> {
        let (text, mode) = read_private_file(path, FileRole::SigningKeyFile)?;
        let key = SigningKey::from_toml(&text, path)?;
        let material = match key.alg() {
            Alg::Ed25519 => "an ed25519 private key",
            Alg::HmacSha256 => "an hmac-sha256 secret",
        };
        refuse_if_readable(path, FileRole::SigningKeyFile, mode, material)?;
        Ok(key)
    }

    /// Parses a signing key file's text; `origin` only names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<SigningKey, KeysError> {
        let mut entries = parse_entries(text, origin, FileRole::SigningKeyFile)?;
        if entries.len() != 1 {
            return Err(KeysError::NotOneSigningKey {
                path: origin.to_owned(),
                count: entries.len(),
            });
        }
        let (entry, raw) = entries.remove(0);
        signing_key(raw, origin, entry)
    }

    /// Makes a new random key from the operating system's generator.
    pub fn generate(alg: Alg, kid: &str) -> Result<SigningKey, KeysError> {
        check_kid(kid).map_err(|problem| KeysError::InvalidKid {
            kid: kid.to_owned(),
            problem,
        })?;
        let material = match alg {
            Alg::Ed25519 => {
                let mut seed = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
                OsRng
                    .try_fill_bytes(&mut seed)
                    .map_err(|source| KeysError::Random { source })?;
                SigningMaterial::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed))
            }
            Alg::HmacSha256 => {
                let mut secret = vec![0u8; GENERATED_HMAC_SECRET_BYTES];
                OsRng
                    .try_fill_bytes(&mut secret)
                    .map_err(|source| KeysError::Random { source })?;
                SigningMaterial::Hmac(secret)
            }
        };
        Ok(SigningKey {
            kid: kid.to_owned(),
            material,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Alg {
        match self.material {
            SigningMaterial::Ed25519(_) => Alg::Ed25519,
            SigningMaterial::Hmac(_) => Alg::HmacSha256,
        }
    }

    /// The summary a worker's keyring shows for the matching verification entry.
    pub fn summary(&self) -> KeySummary {
        KeySummary {
            kid: self.kid.clone(),
            alg: self.alg(),
            fingerprint: match &self.material {
                SigningMaterial::Ed25519(key) => fingerprint(key.verifying_key().as_bytes()),
                SigningMaterial::Hmac(secret) => fingerprint(secret),
            },
        }
    }

    /// The whole signing key file. Holds the private seed or secret: write it
    /// with mode 0600.
    pub fn to_signing_file_toml(&self) -> String {
        let material = match &self.material {
            SigningMaterial::Ed25519(key) => {
                format!("private_key = \"{}\"", BASE64.encode(key.to_bytes()))
            }
            SigningMaterial::Hmac(secret) => format!("secret = \"{}\"", BASE64.encode(secret)),
        };
        // kid passed check_kid and base64 has no quote or backslash, so no TOML escaping is needed.
        format!(
            "# batchly signing key: keep private (chmod 600)\n[[key]]\nkid = \"{}\"\nalg = \"{}\"\n{material}\n",
            self.kid,
            self.alg()
        )
    }

    /// The `[[key]]` table to append to workers' keys files. For ed25519
    /// this is public; for hmac-sha256 it carries the shared secret.
    pub fn verification_entry_toml(&self) -> String {
        let material = match &self.material {
            SigningMaterial::Ed25519(key) => format!(
                "public_key = \"{}\"",
                BASE64.encode(key.verifying_key().as_bytes())
            ),
            SigningMaterial::Hmac(secret) => format!("secret = \"{}\"", BASE64.encode(secret)),
        };
        format!(
            "[[key]]\nkid = \"{}\"\nalg = \"{}\"\n{material}\n",
            self.kid,
            self.alg()
        )
    }

    /// The raw signature over `message` with this key's algorithm.
    pub(super) fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        match &self.material {
            SigningMaterial::Ed25519(key) => key.sign(message).to_bytes().to_vec(),
            SigningMaterial::Hmac(secret) => {
                let mut mac = new_hmac(secret);
                mac.update(message);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }
}

/// A newly generated key with both files' contents, as `keygen` hands them
/// out: the signing file for the producer, the entry for every worker.
pub struct GeneratedKey {
    pub signing_key: SigningKey,
    /// Private: write with mode 0600.
    pub signing_file_toml: String,
    /// Append to workers' keys files (secret too for hmac-sha256).
    pub verification_entry_toml: String,
}

impl GeneratedKey {
    pub fn new(alg: Alg, kid: &str) -> Result<GeneratedKey, KeysError> {
        let signing_key = SigningKey::generate(alg, kid)?;
        Ok(GeneratedKey {
            signing_file_toml: signing_key.to_signing_file_toml(),
            verification_entry_toml: signing_key.verification_entry_toml(),
            signing_key,
        })
    }

    pub fn summary(&self) -> KeySummary {
        self.signing_key.summary()
    }
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("signing_key", &self.signing_key)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Reading and parsing.

/// Reads the file through one open descriptor, so the mode checked is the
/// mode of the bytes read, and refuses group- or other-writable files.
fn read_private_file(path: &Path, role: FileRole) -> Result<(String, u32), KeysError> {
    let read_error = |source| KeysError::Read {
        role,
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
    if mode & GROUP_OR_OTHER_WRITE != 0 {
        return Err(KeysError::WritableByOthers {
            role,
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_error)?;
    Ok((text, mode))
}

fn refuse_if_readable(
    path: &Path,
    role: FileRole,
    mode: u32,
    material: &'static str,
) -> Result<(), KeysError> {
    if mode & GROUP_OR_OTHER_READ != 0 {
        return Err(KeysError::SecretReadableByOthers {
            role,
            path: path.to_owned(),
            mode,
            material,
        });
    }
    Ok(())
}

/// One `[[key]]` table as written; only ever seen inside this module.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: String,
    alg: String,
    public_key: Option<String>,
    private_key: Option<String>,
    secret: Option<String>,
}

/// Parses the file into its `[[key]]` tables with their 1-based positions,
/// the kid of each already checked.
fn parse_entries(
    text: &str,
    path: &Path,
    role: FileRole,
) -> Result<Vec<(usize, RawKey)>, KeysError> {
    let syntax = |problem: String| KeysError::Syntax {
        role,
        path: path.to_owned(),
        problem,
    };
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| syntax(toml_problem(&e, text)))?;
    let keys = table.remove("key");
    if let Some(other) = table.keys().next() {
        return Err(syntax(format!(
            "unknown top-level field `{other}`; keys go in [[key]] tables"
        )));
    }
    let tables = match keys {
        None => Vec::new(),
        Some(toml::Value::Array(tables)) => tables,
        Some(_) => return Err(syntax("`key` must be a list of [[key]] tables".to_owned())),
    };
    if tables.is_empty() {
        return Err(KeysError::NoKeys {
            role,
            path: path.to_owned(),
        });
    }
    let mut entries = Vec::with_capacity(tables.len());
    for (index, value) in tables.into_iter().enumerate() {
        let entry = index + 1;
        let entry_error = |kid: Option<String>, problem: String| KeysError::Entry {
            role,
            path: path.to_owned(),
            entry,
            kid,
            problem,
        };
        if !value.is_table() {
            return Err(entry_error(None, "must be a [[key]] table".to_owned()));
        }
        let raw: RawKey = value
            .try_into()
            .map_err(|e: toml::de::Error| entry_error(None, e.message().trim().to_owned()))?;
        check_kid(&raw.kid).map_err(|problem| {
            entry_error(
                None,
                format!("kid \"{}\" {problem}", raw.kid.escape_debug()),
            )
        })?;
        entries.push((entry, raw));
    }
    Ok(entries)
}

/// toml's own Display spans several lines; users get one line with a line number.
fn toml_problem(error: &toml::de::Error, text: &str) -> String {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

fn verification_key(raw: RawKey, path: &Path, entry: usize) -> Result<VerificationKey, KeysError> {
    let problem = |problem: String| KeysError::Entry {
        role: FileRole::KeysFile,
        path: path.to_owned(),
        entry,
        kid: Some(raw.kid.clone()),
        problem,
    };
    let alg = Alg::from_str(&raw.alg).map_err(&problem)?;
    match alg {
        Alg::Ed25519 => {
            if raw.private_key.is_some() {
                return Err(KeysError::PrivateKeyInKeysFile {
                    path: path.to_owned(),
                    entry,
                    kid: raw.kid.clone(),
                });
            }
            if raw.secret.is_some() {
                return Err(problem(
                    "an ed25519 key takes public_key, not secret".to_owned(),
                ));
            }
            let encoded = raw
                .public_key
                .as_deref()
                .ok_or_else(|| problem("an ed25519 key needs public_key".to_owned()))?;
            let bytes = decode_exact::<32>(encoded, "public_key").map_err(&problem)?;
            let public = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|_| problem("public_key is not a valid ed25519 point".to_owned()))?;
            if public.is_weak() {
                return Err(problem(
                    "public_key is a small-order point that any signature could match".to_owned(),
                ));
            }
            Ok(VerificationKey::Ed25519(public))
        }
        Alg::HmacSha256 => {
            if raw.public_key.is_some() || raw.private_key.is_some() {
                return Err(problem(
                    "an hmac-sha256 key takes secret, not public_key or private_key".to_owned(),
                ));
            }
            let secret = hmac_secret(raw.secret.as_deref()).map_err(&problem)?;
            Ok(VerificationKey::Hmac(secret))
        }
    }
}

fn signing_key(raw: RawKey, path: &Path, entry: usize) -> Result<SigningKey, KeysError> {
    let problem = |problem: String| KeysError::Entry {
        role: FileRole::SigningKeyFile,
        path: path.to_owned(),
        entry,
        kid: Some(raw.kid.clone()),
        problem,
    };
    let alg = Alg::from_str(&raw.alg).map_err(&problem)?;
    let material = match alg {
        Alg::Ed25519 => {
            if raw.secret.is_some() {
                return Err(problem(
                    "an ed25519 key takes private_key, not secret".to_owned(),
                ));
            }
            let encoded = raw.private_key.as_deref().ok_or_else(|| {
                problem(
                    "an ed25519 signing key needs private_key (this looks like a workers' keys file)"
                        .to_owned(),
                )
            })?;
            let seed = decode_exact::<32>(encoded, "private_key").map_err(&problem)?;
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            // A public_key alongside is optional, but a wrong one means a mixed-up file.
            if let Some(encoded) = raw.public_key.as_deref() {
                let public = decode_exact::<32>(encoded, "public_key").map_err(&problem)?;
                if public != key.verifying_key().to_bytes() {
                    return Err(problem(
                        "public_key does not belong to private_key".to_owned(),
                    ));
                }
            }
            SigningMaterial::Ed25519(key)
        }
        Alg::HmacSha256 => {
            if raw.public_key.is_some() || raw.private_key.is_some() {
                return Err(problem(
                    "an hmac-sha256 key takes secret, not public_key or private_key".to_owned(),
                ));
            }
            SigningMaterial::Hmac(hmac_secret(raw.secret.as_deref()).map_err(&problem)?)
        }
    };
    Ok(SigningKey {
        kid: raw.kid.clone(),
        material,
    })
}

fn hmac_secret(encoded: Option<&str>) -> Result<Vec<u8>, String> {
    let encoded = encoded.ok_or_else(|| "an hmac-sha256 key needs secret".to_owned())?;
    let secret = BASE64
        .decode(encoded)
        .map_err(|e| format!("secret is not standard padded base64 ({e})"))?;
    if secret.len() < MIN_HMAC_SECRET_BYTES {
        return Err(format!(
            "secret must be base64 of at least {MIN_HMAC_SECRET_BYTES} bytes, got {} bytes",
            secret.len()
        ));
    }
    Ok(secret)
}

fn decode_exact<const N: usize>(encoded: &str, field: &str) -> Result<[u8; N], String> {
    let bytes = BASE64
        .decode(encoded)
        .map_err(|e| format!("{field} is not standard padded base64 ({e})"))?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "{field} must be base64 of {N} bytes, got {} bytes",
            bytes.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const ED_PUBLIC: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
    const ED_SEED: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const HMAC_SECRET: &str = "YmF0Y2hseS10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWJjZGVm";

    fn ed_entry(kid: &str) -> String {
        format!("[[key]]\nkid = \"{kid}\"\nalg = \"ed25519\"\npublic_key = \"{ED_PUBLIC}\"\n")
    }

    fn hmac_entry(kid: &str) -> String {
        format!("[[key]]\nkid = \"{kid}\"\nalg = \"hmac-sha256\"\nsecret = \"{HMAC_SECRET}\"\n")
    }

    fn origin() -> &'static Path {
        Path::new("/etc/batchly/keys.toml")
    }

    fn keyring_err(text: &str) -> String {
        match Keyring::from_toml(text, origin()) {
            Ok(keys) => panic!("expected an error, got {keys:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn signing_err(text: &str) -> String {
        match SigningKey::from_toml(text, Path::new("/home/u/signing.toml")) {
            Ok(key) => panic!("expected an error, got {key:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn write_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).expect("write test file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod test file");
        path
    }

    #[test]
    fn group_writable_keys_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_with_mode(dir.path(), "keys.toml", &ed_entry("prod"), 0o664);
        let err = Keyring::load(&path).expect_err("group-writable file must be refused");
        let shown = path.display();
        assert_eq!(
            err.to_string(),
            format!(
                "keys file {shown} is writable by group or others (mode 0664); run: chmod 600 {shown}"
            )
        );
        assert_eq!(err.path(), Some(path.as_path()));
    }

    #[test]
    fn hmac_secret_readable_by_group_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_with_mode(dir.path(), "keys.toml", &hmac_entry("legacy"), 0o640);
        let err = Keyring::load(&path).expect_err("readable secret must be refused");
        let shown = path.display();
        assert_eq!(
            err.to_string(),
            format!(
                "keys file {shown} holds an hmac-sha256 secret and is readable by group or others \
                 (mode 0640); run: chmod 600 {shown}"
            )
        );
    }

    #[test]
    fn hmac_secret_file_with_mode_0600_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!("{}\n{}", ed_entry("prod"), hmac_entry("legacy"));
        let path = write_with_mode(dir.path(), "keys.toml", &text, 0o600);
        let keys = Keyring::load(&path).expect("0600 file with a secret loads");
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn public_only_ed25519_keys_file_may_be_world_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_with_mode(dir.path(), "keys.toml", &ed_entry("prod"), 0o644);
        let keys = Keyring::load(&path).expect("public keys need no secrecy");
        assert_eq!(keys.summaries()[0].kid, "prod");
    }

    #[test]
    fn missing_keys_file_error_names_file_and_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        let err = Keyring::load(&path).expect_err("missing file");
        assert_eq!(
            err.to_string(),
            format!(
                "reading keys file {}: No such file or directory (os error 2)",
                path.display()
            )
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn signing_key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text =
            format!("[[key]]\nkid = \"p\"\nalg = \"ed25519\"\nprivate_key = \"{ED_SEED}\"\n");
        let path = write_with_mode(dir.path(), "signing.toml", &text, 0o644);
        let err = SigningKey::load(&path).expect_err("private key must not be readable");
        assert!(
            err.to_string().starts_with(&format!(
                "signing key file {} holds an ed25519 private key and is readable by group or others (mode 0644)",
                path.display()
            )),
            "{err}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(SigningKey::load(&path).expect("0600 loads").kid(), "p");
    }

    #[test]
    fn short_public_key_is_reported_with_kid_entry_and_length() {
        let short = BASE64.encode([7u8; 31]);
        let text = format!(
            "{}[[key]]\nkid = \"prod\"\nalg = \"ed25519\"\npublic_key = \"{short}\"\n",
            hmac_entry("legacy")
        );
        assert_eq!(
            keyring_err(&text),
            "keys file /etc/batchly/keys.toml: key \"prod\" (entry 2): public_key must be base64 of 32 bytes, got 31 bytes"
        );
    }

    #[test]
    fn public_key_that_is_not_base64_is_reported() {
        let text = "[[key]]\nkid = \"prod\"\nalg = \"ed25519\"\npublic_key = \"not base64!\"\n";
        assert!(keyring_err(text).contains("public_key is not standard padded base64"));
    }

    #[test]
    fn duplicate_kid_names_both_entries() {
        let text = format!(
            "{}{}{}",
            ed_entry("prod"),
            hmac_entry("legacy"),
            ed_entry("prod")
        );
        assert_eq!(
            keyring_err(&text),
            "keys file /etc/batchly/keys.toml: duplicate kid \"prod\" (entries 1 and 3)"
        );
    }

    #[test]
    fn keys_file_without_entries_is_refused() {
        assert_eq!(
            keyring_err("# nothing here\n"),
            "keys file /etc/batchly/keys.toml: no [[key]] entries"
        );
    }

    #[test]
    fn unknown_field_in_an_entry_is_named() {
        let text =
            format!("[[key]]\nkid = \"prod\"\nalg = \"ed25519\"\npubkey = \"{ED_PUBLIC}\"\n");
        let err = keyring_err(&text);
        assert!(
            err.starts_with("keys file /etc/batchly/keys.toml: entry 1: unknown field `pubkey`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let text = format!("version = 1\n{}", ed_entry("prod"));
        let err = keyring_err(&text);
        assert!(err.contains("unknown top-level field `version`"), "{err}");
    }

    #[test]
    fn toml_syntax_error_is_reported_with_its_line() {
        let err = keyring_err("[[key]]\nkid = \"prod\"\nalg = ed25519\n");
        assert!(
            err.starts_with("keys file /etc/batchly/keys.toml: line 3: "),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line for the user: {err}");
    }

    #[test]
    fn kid_outside_the_allowed_characters_is_refused() {
        let err = keyring_err(&ed_entry("prod key"));
        assert_eq!(
            err,
            "keys file /etc/batchly/keys.toml: entry 1: kid \"prod key\" contains ' '; allowed are A-Z a-z 0-9 . _ -"
        );
        let long = "k".repeat(65);
        assert!(keyring_err(&ed_entry(&long)).contains("must be 1 to 64 characters, got 65"));
    }

    #[test]
    fn unknown_alg_is_refused() {
        let text = "[[key]]\nkid = \"prod\"\nalg = \"rsa\"\npublic_key = \"x\"\n";
        assert_eq!(
            keyring_err(text),
            "keys file /etc/batchly/keys.toml: key \"prod\" (entry 1): unknown alg \"rsa\"; expected \"ed25519\" or \"hmac-sha256\""
        );
    }

    #[test]
    fn ed25519_entry_with_a_secret_is_refused() {
        let text = format!(
            "[[key]]\nkid = \"prod\"\nalg = \"ed25519\"\npublic_key = \"{ED_PUBLIC}\"\nsecret = \"{HMAC_SECRET}\"\n"
        );
        assert!(keyring_err(&text).ends_with("an ed25519 key takes public_key, not secret"));
    }

    #[test]
    fn hmac_entry_with_a_public_key_is_refused() {
        let text = format!(
            "[[key]]\nkid = \"legacy\"\nalg = \"hmac-sha256\"\npublic_key = \"{ED_PUBLIC}\"\n"
        );
        assert!(keyring_err(&text)
            .ends_with("an hmac-sha256 key takes secret, not public_key or private_key"));
    }

    #[test]
    fn hmac_secret_shorter_than_32_bytes_is_refused() {
        let short = BASE64.encode([1u8; 31]);
        let text =
            format!("[[key]]\nkid = \"legacy\"\nalg = \"hmac-sha256\"\nsecret = \"{short}\"\n");
        assert_eq!(
            keyring_err(&text),
            "keys file /etc/batchly/keys.toml: key \"legacy\" (entry 1): secret must be base64 of at least 32 bytes, got 31 bytes"
        );
    }

    #[test]
    fn private_key_in_a_keys_file_is_called_a_signing_key_file() {
        let text =
            format!("[[key]]\nkid = \"prod\"\nalg = \"ed25519\"\nprivate_key = \"{ED_SEED}\"\n");
        let err = keyring_err(&text);
        assert!(
            err.starts_with("keys file /etc/batchly/keys.toml: key \"prod\" (entry 1) has a private_key: this is a signing key file"),
            "{err}"
        );
    }

    #[test]
    fn small_order_ed25519_public_key_is_refused() {
        // The identity point: every signature with S = 0 would verify against it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let text = format!(
            "[[key]]\nkid = \"weak\"\nalg = \"ed25519\"\npublic_key = \"{}\"\n",
            BASE64.encode(identity)
        );
        assert!(keyring_err(&text).contains("small-order point"));
    }

    #[test]
    fn signing_key_file_must_hold_exactly_one_key() {
        let seed_entry =
            format!("[[key]]\nkid = \"a\"\nalg = \"ed25519\"\nprivate_key = \"{ED_SEED}\"\n");
        assert_eq!(
            signing_err(&format!("{seed_entry}{}", hmac_entry("b"))),
            "signing key file /home/u/signing.toml: must hold exactly one [[key]], found 2"
        );
    }

    #[test]
    fn keys_file_used_as_signing_key_file_is_explained() {
        assert!(signing_err(&ed_entry("prod")).contains("needs private_key"));
    }

    #[test]
    fn signing_file_public_key_must_match_its_private_key() {
        let other = BASE64.encode(
            ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
                .verifying_key()
                .as_bytes(),
        );
        let text = format!(
            "[[key]]\nkid = \"a\"\nalg = \"ed25519\"\nprivate_key = \"{ED_SEED}\"\npublic_key = \"{other}\"\n"
        );
        assert!(signing_err(&text).ends_with("public_key does not belong to private_key"));
        let matching = format!(
            "[[key]]\nkid = \"a\"\nalg = \"ed25519\"\nprivate_key = \"{ED_SEED}\"\npublic_key = \"{ED_PUBLIC}\"\n"
        );
        assert!(SigningKey::from_toml(&matching, Path::new("s.toml")).is_ok());
    }

    #[test]
    fn summaries_show_fingerprints_and_never_the_material() {
        let keys = Keyring::from_toml(
            &format!("{}{}", ed_entry("b-ed"), hmac_entry("a-hmac")),
            origin(),
        )
        .expect("valid keys");
        let summaries = keys.summaries();
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[0].kid, "a-hmac");
        assert_eq!(summaries[0].alg, Alg::HmacSha256);
        for summary in &summaries {
            assert!(summary.fingerprint.starts_with("sha256:"));
            assert_eq!(summary.fingerprint.len(), "sha256:".len() + 16);
        }
        let shown = format!("{keys:?}{summaries:?}");
        assert!(
            !shown.contains(HMAC_SECRET) && !shown.contains(ED_PUBLIC),
            "{shown}"
        );
    }

    #[test]
    fn signing_key_fingerprint_matches_its_verification_entry() {
        for alg in [Alg::Ed25519, Alg::HmacSha256] {
            let key = SigningKey::generate(alg, "fp").expect("generate");
            let keys =
                Keyring::from_toml(&key.verification_entry_toml(), origin()).expect("entry parses");
            assert_eq!(keys.summaries(), vec![key.summary()]);
        }
    }

    #[test]
    fn debug_output_of_a_signing_key_hides_the_secret() {
        let text = format!(
            "[[key]]\nkid = \"legacy\"\nalg = \"hmac-sha256\"\nsecret = \"{HMAC_SECRET}\"\n"
        );
        let key = SigningKey::from_toml(&text, Path::new("s.toml")).expect("valid");
        let shown = format!("{key:?}");
        assert!(
            shown.contains("legacy") && !shown.contains(HMAC_SECRET),
            "{shown}"
        );
        let secret_bytes = BASE64.decode(HMAC_SECRET).expect("test secret is base64");
        assert!(!shown.contains(&String::from_utf8_lossy(&secret_bytes).to_string()));
    }

    #[test]
    fn generated_signing_file_parses_back_to_the_same_key() {
        for alg in [Alg::Ed25519, Alg::HmacSha256] {
            let generated = GeneratedKey::new(alg, "gen-1").expect("generate");
            let reread = SigningKey::from_toml(&generated.signing_file_toml, Path::new("g.toml"))
                .expect("generated file parses");
            assert_eq!(reread.kid(), "gen-1");
            assert_eq!(reread.alg(), alg);
            assert_eq!(reread.summary(), generated.summary());
            assert_eq!(
                reread.sign_bytes(b"m"),
                generated.signing_key.sign_bytes(b"m")
            );
        }
    }

    #[test]
    fn generated_keys_differ_each_time() {
        let a = SigningKey::generate(Alg::HmacSha256, "a").expect("generate");
        let b = SigningKey::generate(Alg::HmacSha256, "a").expect("generate");
        assert_ne!(a.summary().fingerprint, b.summary().fingerprint);
    }

    #[test]
    fn generate_refuses_a_kid_the_spec_does_not_allow() {
        let err = SigningKey::generate(Alg::Ed25519, "bad/kid").expect_err("bad kid");
        assert_eq!(
            err.to_string(),
            "key id \"bad/kid\": contains '/'; allowed are A-Z a-z 0-9 . _ -"
        );
    }

    #[test]
    fn alg_names_round_trip_through_from_str() {
        for alg in [Alg::Ed25519, Alg::HmacSha256] {
            assert_eq!(Alg::from_str(alg.as_str()), Ok(alg));
        }
        assert!(Alg::from_str("HS256").is_err());
    }

    #[test]
    fn verification_checks_signature_with_the_keys_own_algorithm() {
        let keys = Keyring::from_toml(
            &format!("{}{}", ed_entry("ed"), hmac_entry("mac")),
            origin(),
        )
        .expect("valid");
        let seed: [u8; 32] = decode_exact(ED_SEED, "seed").expect("test seed");
        let ed_sig = ed25519_dalek::SigningKey::from_bytes(&seed)
            .sign(b"msg")
            .to_bytes();
        let ed = keys.get("ed").expect("ed key");
        let mac = keys.get("mac").expect("hmac key");
        assert_eq!(ed.verify(b"msg", &ed_sig), Ok(()));
        assert!(ed.verify(b"msh", &ed_sig).is_err());
        assert_eq!(
            mac.verify(b"msg", &ed_sig),
            Err("an hmac-sha256 signature is 32 bytes, got 64 bytes".to_owned())
        );
        assert_eq!(
            mac.verify(b"msg", &ed_sig[..32]),
            Err("hmac-sha256 signature does not match this key".to_owned())
        );
    }
}
