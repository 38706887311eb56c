//! Signed visitor tokens for the tests: `[[issuers]]` entries, HS256 secrets
//! in temporary files, fixed Ed25519 keys (tests/fixtures/jwt), tokens minted
//! on the app's clock, and a tiny JWKS server that counts its fetches.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use keyapi_proxy::config::IssuerConfig;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The `iss` of the test issuer.
pub const ISS: &str = "https://auth.example.test/";
/// The `aud` the test issuer expects.
pub const AUD: &str = "keyapi-proxy";

/// A `[[issuers]]` entry named `site` for [`ISS`] and [`AUD`], without a key.
fn issuer() -> IssuerConfig {
    IssuerConfig {
        name: "site".into(),
        issuer: ISS.into(),
        audience: AUD.into(),
        jwks_url: None,
        hs256_secret_file: None,
        rate_per_minute: None,
        burst: None,
        daily_budget: None,
        max_subjects: 100_000,
    }
}

/// The test issuer verifying HS256 with the secret in `file`.
pub fn hs256_issuer(file: &HsSecret) -> IssuerConfig {
    IssuerConfig {
        hs256_secret_file: Some(file.path.clone()),
        ..issuer()
    }
}

/// The test issuer verifying with the keys served at `url` (see [`JwksServer::url`]).
pub fn jwks_issuer(url: &str) -> IssuerConfig {
    IssuerConfig {
        jwks_url: Some(url.into()),
        ..issuer()
    }
}

/// An HS256 secret written to a file of its own (removed on drop).
pub struct HsSecret {
    pub secret: Vec<u8>,
    pub path: PathBuf,
}

impl HsSecret {
    /// `secret` in a new temporary file (with a final newline, as editors write it).
    pub fn new(secret: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keyapi-proxy-hs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwt_secret");
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        Self {
            secret: secret.as_bytes().to_vec(),
            path,
        }
    }

    /// A token signed with this secret.
    pub fn mint(&self, claims: &Value) -> String {
        let key = EncodingKey::from_secret(&self.secret).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }
}

impl Drop for HsSecret {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Claims of a token for `sub` from the test issuer to the proxy, valid
/// from `now` (the app's clock) for an hour.
pub fn claims(sub: &str, now: SystemTime) -> Value {
    let now = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    json!({ "iss": ISS, "aud": AUD, "sub": sub, "iat": now, "exp": now + 3600 })
}

/// `claims` with `field` set to `value` (or removed, for `Value::Null`).
pub fn with(mut claims: Value, field: &str, value: Value) -> Value {
    let object = claims.as_object_mut().unwrap();
    if value.is_null() {
        object.remove(field);
    } else {
        object.insert(field.into(), value);
    }
    claims
}

/// A token whose header says `alg: none`, with no signature.
pub fn unsigned(claims: &Value) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// One of the fixed Ed25519 test keys (`a` or `b`) under tests/fixtures/jwt.
pub fn ed25519(name: &str) -> EncodingKey {
    let path = format!(
        "{}/tests/fixtures/jwt/ed25519-{name}.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    let pem = std::fs::read_to_string(path).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    EncodingKey::from_ed_der(&der)
}

/// An EdDSA token signed with `key`, naming `kid`.
pub fn mint_eddsa(key: &EncodingKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A JWKS endpoint on a free loopback port that counts its fetches.
pub struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    /// Serves the public halves of `keys` (kid, key) at `/jwks.json`.
    pub async fn start(keys: &[(&str, &EncodingKey)]) -> Self {
        let document = Arc::new(Mutex::new(Value::Null));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (Arc::clone(&document), Arc::clone(&fetches));
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                count.fetch_add(1, Ordering::SeqCst);
                let body = doc.lock().unwrap().to_string();
                async move { body }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let server = Self {
            addr,
            document,
            fetches,
        };
        server.serve(keys);
        server
    }

    /// From now on serves `keys` (a rotation).
    pub fn serve(&self, keys: &[(&str, &EncodingKey)]) {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(kid, key)| {
                let mut jwk = Jwk::from_encoding_key(key, Algorithm::EdDSA).unwrap();
                jwk.common.key_id = Some((*kid).into());
                serde_json::to_value(jwk).unwrap()
            })
            .collect();
        *self.document.lock().unwrap() = json!({ "keys": keys });
    }

    /// `http://127.0.0.1:<port>/jwks.json`.
    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    /// How many times the keys were fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// A minute and a bit: long enough for the JWKS to be fetched again.
pub const AFTER_A_MINUTE: Duration = Duration::from_secs(61);
