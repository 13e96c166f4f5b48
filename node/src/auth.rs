//! Who may do what on the public API: bearer tokens (JWT) verified against
//! the operator's keys, and the rule deciding whether a verified caller may
//! take an action on a tenant. The rule ([`Principal::may`]) is plain code;
//! key files are read by [`Verifier`], which reloads them when they change.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a token allows within the tenants it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// List and download.
    Read,
    /// Put, clone, cancel.
    Write,
    /// Cluster administration: remove nodes, create and size tenants, see
    /// peer addresses. Not tied to a tenant.
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// Grants every tenant when named in a token's `tenants`.
pub const ALL_TENANTS: &str = "*";

/// A caller whose token verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    tenants: BTreeSet<String>,
    scopes: BTreeSet<Scope>,
}

/// Why a verified caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The token does not grant the tenant: answered exactly as a tenant
    /// that does not exist, so a token says nothing about other tenants.
    NotFound(String),
    /// The tenant is granted but not the scope the action needs.
    Permission(String),
}

impl Principal {
    pub fn new(
        subject: impl Into<String>,
        tenants: impl IntoIterator<Item = String>,
        scopes: impl IntoIterator<Item = Scope>,
    ) -> Principal {
        Principal {
            subject: subject.into(),
            tenants: tenants.into_iter().collect(),
            scopes: scopes.into_iter().collect(),
        }
    }

    /// Whether the token names `tenant` (or every tenant).
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenants.contains(ALL_TENANTS) || self.tenants.contains(tenant)
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// May this caller act with `scope` on `tenant`? A tenant the token does
    /// not name is NotFound before the scope is looked at.
    pub fn may(&self, scope: Scope, tenant: &str) -> Result<(), Denied> {
        if !self.sees(tenant) {
            return Err(Denied::NotFound(format!("tenant {tenant} not found")));
        }
        if !self.has(scope) {
            return Err(Denied::Permission(format!(
                "{} may not {} in tenant {tenant}: the token lacks the {} scope",
                self.subject,
                action_of(scope),
                scope.name()
            )));
        }
        Ok(())
    }

    /// May this caller administer the cluster?
    pub fn may_admin(&self, what: &str) -> Result<(), Denied> {
        if self.has(Scope::Admin) {
            Ok(())
        } else {
            Err(Denied::Permission(format!(
                "{} may not {what}: the token lacks the admin scope",
                self.subject
            )))
        }
    }
}

fn action_of(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "write",
        Scope::Admin => "administer",
    }
}

/// Why a request carries no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: pass --token, --token-file or BITCLONE_TOKEN")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("token refused: {0}")]
    Invalid(String),
}

/// The operator's settings for verifying tokens.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Public key files (PEM: Ed25519 or RSA) or directories of them; a key's
    /// id (`kid`) is its file name without the extension.
    pub public_keys: Vec<PathBuf>,
    /// A JWKS file (an OIDC provider's keys, fetched by the operator).
    pub jwks: Option<PathBuf>,
    /// A shared HS256 secret: only with `allow_hs256` (development).
    pub hs256_secret: Option<PathBuf>,
    pub allow_hs256: bool,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys as last read, and what they were read from.
struct Loaded {
    keys: Vec<Key>,
    stamp: Vec<FileStamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    modified: Option<SystemTime>,
    len: u64,
}

/// Verifies bearer tokens against the configured keys.
pub struct Verifier {
    settings: AuthSettings,
    loaded: RwLock<Arc<Loaded>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    tenants: Vec<String>,
    /// OAuth style: space-separated.
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    iat: Option<u64>,
}

/// The claims `bitclone token issue` writes.
#[derive(Debug, Serialize)]
pub struct IssueClaims {
    pub sub: String,
    pub tenants: Vec<String>,
    pub scopes: Vec<Scope>,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Verifier {
    /// Reads the keys; fails when there are none or one cannot be read.
    pub fn new(settings: AuthSettings) -> Result<Verifier, String> {
        if settings.hs256_secret.is_some() && !settings.allow_hs256 {
            return Err(
                "auth.hs256_secret is set but HS256 is for development only: \
                 set auth.allow_hs256 = true to use it"
                    .into(),
            );
        }
        if settings.jwks.is_some() && settings.audience.is_none() {
            return Err(
                "auth.jwks is set but auth.audience is not: tokens an identity \
                        provider issues for other services would be accepted; set the \
                        audience BitClone's tokens carry"
                    .into(),
            );
        }
        let loaded = load(&settings)?;
        if loaded.keys.is_empty() {
            return Err("no token keys: set auth.public_keys or auth.jwks (`bitclone certs dev` makes a dev key, token.pub)".into());
        }
        Ok(Verifier {
            settings,
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the keys again if a key file changed (or appeared or went).
    /// On an error the keys in use stay. Returns whether the keys changed.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let stamp = stamps(&self.settings)?;
        if stamp == self.current().stamp {
            return Ok(false);
        }
        let loaded = load(&self.settings)?;
        if loaded.keys.is_empty() {
            // Every key was removed: every token is refused from now on.
            tracing::error!("no token keys left: every call will be refused");
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(true)
    }

    /// Verifies a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let invalid = |m: String| AuthError::Invalid(m);
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("not a JWT ({e})")))?;
        match header.alg {
            Algorithm::EdDSA | Algorithm::RS256 => {}
            Algorithm::HS256 if self.settings.allow_hs256 => {}
            alg => return Err(invalid(format!("algorithm {alg:?} is not accepted"))),
        }
        let loaded = self.current();
        // Keys named by the token's `kid` first, then the others of its
        // algorithm: a key file need not be named after the kid.
        let named = |k: &&Key| header.kid.is_some() && k.kid == header.kid;
        let same_alg = loaded.keys.iter().filter(|k| k.alg == header.alg);
        let candidates: Vec<&Key> = same_alg
            .clone()
            .filter(named)
            .chain(same_alg.filter(|k| !named(k)))
            .collect();
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        match &self.settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
        }
        let mut refusal = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return self.principal(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    let why = match e.kind() {
                        K::InvalidSignature => continue,
                        K::ExpiredSignature => "expired".to_string(),
                        K::ImmatureSignature => "not valid yet (nbf)".to_string(),
                        K::InvalidAudience => "wrong audience (aud)".to_string(),
                        K::InvalidIssuer => "wrong issuer (iss)".to_string(),
                        K::MissingRequiredClaim(c) => format!("no {c} claim"),
                        _ => e.to_string(),
                    };
                    refusal.get_or_insert(why);
                }
            }
        }
        Err(invalid(
            refusal.unwrap_or_else(|| "signed by an unknown key".into()),
        ))
    }

    fn principal(&self, c: Claims) -> Result<Principal, AuthError> {
        if let Some(iat) = c.iat {
            if iat > now_secs() + self.settings.leeway.as_secs() {
                return Err(AuthError::Invalid("issued in the future (iat)".into()));
            }
        }
        let named = c
            .scope
            .iter()
            .flat_map(|s| s.split_whitespace())
            .chain(c.scopes.iter().map(String::as_str));
        // Scopes of other services (an OIDC provider's `openid`, say) are
        // not ours to refuse.
        let scopes: Vec<Scope> = named.filter_map(Scope::parse).collect();
        Ok(Principal::new(c.sub, c.tenants, scopes))
    }
}

/// The key files a reload reads, in order, with what they look like now.
/// A key file or directory that is gone is a key removed (revoked), not an
/// error: it is left out.
fn stamps(s: &AuthSettings) -> Result<Vec<FileStamp>, String> {
    let mut files = Vec::new();
    for p in &s.public_keys {
        if !p.exists() {
            continue;
        }
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("reading key directory {}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| matches!(f.extension().and_then(|x| x.to_str()), Some("pem" | "pub")))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    files.extend(s.jwks.iter().cloned());
    files.extend(s.hs256_secret.iter().cloned());
    let mut out = Vec::new();
    for path in files {
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("reading key file {}: {e}", path.display())),
        };
        out.push(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            path,
        });
    }
    Ok(out)
}

fn load(s: &AuthSettings) -> Result<Loaded, String> {
    let stamp = stamps(s)?;
    let mut keys = Vec::new();
    for f in &stamp {
        let path = &f.path;
        let bytes =
            std::fs::read(path).map_err(|e| format!("reading key file {}: {e}", path.display()))?;
        if Some(path) == s.jwks.as_ref() {
            keys.extend(jwks_keys(path, &bytes)?);
        } else if Some(path) == s.hs256_secret.as_ref() {
            let secret = trim_ascii(&bytes);
            if secret.len() < 32 {
                return Err(format!(
                    "{}: an HS256 secret needs at least 32 bytes",
                    path.display()
                ));
            }
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            });
        } else {
            keys.push(pem_key(path, &bytes)?);
        }
    }
    Ok(Loaded { keys, stamp })
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fn pem_key(path: &Path, pem: &[u8]) -> Result<Key, String> {
    let kid = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok(Key {
            kid,
            alg: Algorithm::EdDSA,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(Key {
            kid,
            alg: Algorithm::RS256,
            key,
        });
    }
    Err(format!(
        "{}: not a PEM Ed25519 or RSA public key",
        path.display()
    ))
}

fn jwks_keys(path: &Path, bytes: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(bytes)
        .map_err(|e| format!("{}: not a JWKS ({e})", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::EdDSA), _) | (None, AlgorithmParameters::OctetKeyPair(_)) => {
                Algorithm::EdDSA
            }
            (Some(KeyAlgorithm::RS256), _) | (None, AlgorithmParameters::RSA(_)) => {
                Algorithm::RS256
            }
            // Keys for algorithms we do not accept are skipped, not refused:
            // a provider's set often holds several kinds.
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            format!(
                "{}: key {:?}: {e}",
                path.display(),
                jwk.common.key_id.as_deref().unwrap_or("")
            )
        })?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    Ok(keys)
}

/// Signs a token with an Ed25519 private key (PKCS#8 PEM), as `bitclone
/// token issue` does with the dev key.
pub fn issue(key_pem: &[u8], kid: &str, claims: &IssueClaims) -> Result<String, String> {
    let key = EncodingKey::from_ed_pem(key_pem)
        .map_err(|e| format!("not an Ed25519 private key (PKCS#8 PEM): {e}"))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

/// Claims for a token valid from now for `ttl`.
pub fn claims_for(
    subject: &str,
    tenants: Vec<String>,
    scopes: Vec<Scope>,
    ttl: Duration,
) -> IssueClaims {
    let now = now_secs();
    IssueClaims {
        sub: subject.to_string(),
        tenants,
        scopes,
        iat: now,
        nbf: now,
        exp: now + ttl.as_secs(),
    }
}

/// The token in an `authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_key(dir: &Path, name: &str) -> Vec<u8> {
        bitclone_raft::tls::generate_token_key(dir, name).unwrap();
        std::fs::read(dir.join(format!("{name}.key"))).unwrap()
    }

    fn settings(keys: Vec<PathBuf>) -> AuthSettings {
        AuthSettings {
            public_keys: keys,
            leeway: Duration::from_secs(30),
            ..AuthSettings::default()
        }
    }

    fn token(key: &[u8], kid: &str, f: impl FnOnce(&mut IssueClaims)) -> String {
        let mut c = claims_for(
            "alice",
            vec!["a".into()],
            vec![Scope::Read, Scope::Write],
            Duration::from_secs(600),
        );
        f(&mut c);
        issue(key, kid, &c).unwrap()
    }

    #[test]
    fn the_rule_hides_other_tenants_and_checks_scopes() {
        let p = Principal::new("bob", ["a".to_string()], [Scope::Read]);
        assert_eq!(p.may(Scope::Read, "a"), Ok(()));
        assert!(matches!(p.may(Scope::Read, "b"), Err(Denied::NotFound(_))));
        // Another tenant is NotFound even for a scope the token lacks.
        assert!(matches!(p.may(Scope::Write, "b"), Err(Denied::NotFound(_))));
        assert!(matches!(
            p.may(Scope::Write, "a"),
            Err(Denied::Permission(_))
        ));
        assert!(p.may_admin("remove nodes").is_err());
        let all = Principal::new("root", [ALL_TENANTS.to_string()], [Scope::Admin]);
        assert!(all.sees("anything"));
        assert!(all.may_admin("remove nodes").is_ok());
        assert!(matches!(
            all.may(Scope::Read, "x"),
            Err(Denied::Permission(_))
        ));
    }

    #[test]
    fn tokens_verify_only_with_a_known_key_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let good = dev_key(dir.path(), "k1");
        let other = tempfile::tempdir().unwrap();
        let stranger = dev_key(other.path(), "k1");
        let v = Verifier::new(settings(vec![dir.path().join("k1.pub")])).unwrap();

        let p = v.verify(&token(&good, "k1", |_| {})).unwrap();
        assert_eq!(p.subject, "alice");
        assert!(p.may(Scope::Write, "a").is_ok());

        let e = v.verify(&token(&stranger, "k1", |_| {})).unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
        let e = v
            .verify(&token(&good, "k1", |c| c.exp = now_secs() - 120))
            .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        // Within the allowed skew it still verifies.
        v.verify(&token(&good, "k1", |c| c.exp = now_secs() - 5))
            .unwrap();
        let e = v
            .verify(&token(&good, "k1", |c| c.nbf = now_secs() + 600))
            .unwrap_err();
        assert!(e.to_string().contains("nbf"), "{e}");
        let e = v
            .verify(&token(&good, "k1", |c| c.iat = now_secs() + 600))
            .unwrap_err();
        assert!(e.to_string().contains("iat"), "{e}");
        assert!(v.verify("not-a-token").is_err());
        // A key id no file is named after: the keys are tried all the same.
        v.verify(&token(&good, "k9", |_| {})).unwrap();
        let e = v.verify(&token(&stranger, "k9", |_| {})).unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dev_key(dir.path(), "k1");
        let v = Verifier::new(settings(vec![dir.path().join("k1.pub")])).unwrap();
        let enc = EncodingKey::from_ed_pem(&key).unwrap();
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &serde_json::json!({"sub": "x", "tenants": ["a"], "scopes": ["read"]}),
            &enc,
        )
        .unwrap();
        let e = v.verify(&t).unwrap_err();
        assert!(e.to_string().contains("exp"), "{e}");
    }

    #[test]
    fn audience_issuer_and_oauth_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dev_key(dir.path(), "k1");
        let mut s = settings(vec![dir.path().to_path_buf()]);
        s.audience = Some("bitclone".into());
        s.issuer = Some("https://idp.example".into());
        let v = Verifier::new(s).unwrap();
        let enc = EncodingKey::from_ed_pem(&key).unwrap();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &enc).unwrap()
        };
        let exp = now_secs() + 600;
        let p = v
            .verify(&sign(serde_json::json!({
                "sub": "svc", "exp": exp, "aud": "bitclone", "iss": "https://idp.example",
                "tenants": ["t"], "scope": "openid read admin"
            })))
            .unwrap();
        assert!(p.may(Scope::Read, "t").is_ok());
        assert!(p.has(Scope::Admin));
        assert!(!p.has(Scope::Write));
        let e = v
            .verify(&sign(serde_json::json!({
                "sub": "svc", "exp": exp, "aud": "other", "iss": "https://idp.example"
            })))
            .unwrap_err();
        assert!(e.to_string().contains("aud"), "{e}");
        let e = v
            .verify(&sign(serde_json::json!({
                "sub": "svc", "exp": exp, "aud": "bitclone", "iss": "https://evil.example"
            })))
            .unwrap_err();
        assert!(e.to_string().contains("iss"), "{e}");
    }

    #[test]
    fn hs256_only_when_allowed_and_keys_reload_when_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hs.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
        let mut s = settings(vec![]);
        s.hs256_secret = Some(secret.clone());
        assert!(Verifier::new(s.clone()).is_err());
        s.allow_hs256 = true;
        let v = Verifier::new(s).unwrap();
        let c = claims_for(
            "d",
            vec!["a".into()],
            vec![Scope::Read],
            Duration::from_secs(60),
        );
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        v.verify(&t).unwrap();

        // Rotation: a key directory gains a key; tokens of both verify until
        // the old file is removed.
        let keys = tempfile::tempdir().unwrap();
        let old = dev_key(keys.path(), "old");
        let v = Verifier::new(settings(vec![keys.path().to_path_buf()])).unwrap();
        assert!(!v.reload_if_changed().unwrap());
        let new = dev_key(keys.path(), "new");
        assert!(v.verify(&token(&new, "new", |_| {})).is_err());
        assert!(v.reload_if_changed().unwrap());
        v.verify(&token(&new, "new", |_| {})).unwrap();
        v.verify(&token(&old, "old", |_| {})).unwrap();
        std::fs::remove_file(keys.path().join("old.pub")).unwrap();
        assert!(v.reload_if_changed().unwrap());
        assert!(v.verify(&token(&old, "old", |_| {})).is_err());
        // A key file named on its own that goes is revoked too, even the
        // last one: then nothing verifies.
        let single = Verifier::new(settings(vec![keys.path().join("new.pub")])).unwrap();
        std::fs::remove_file(keys.path().join("new.pub")).unwrap();
        assert!(single.reload_if_changed().unwrap());
        assert!(single.verify(&token(&new, "new", |_| {})).is_err());
        // A JWKS without a required audience is refused at start.
        let mut s = settings(vec![]);
        s.jwks = Some(keys.path().join("jwks.json"));
        let Err(e) = Verifier::new(s) else {
            panic!("a JWKS without an audience was accepted")
        };
        assert!(e.contains("audience"), "{e}");
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::Malformed));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::Malformed));
    }
}
