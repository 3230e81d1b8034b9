//! Browser sessions without server-side state, so any master serves any session: the cookie
//! is the credential sealed with ChaCha20-Poly1305 (ring) under a key derived from the
//! cluster token, with its expiry and a random CSRF secret. Forms carry the CSRF secret; a
//! post without it (or from another site) is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "cairn_session";
/// How long a login lasts.
pub const TTL_SECS: u64 = 12 * 3600;

/// What a session cookie holds once opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// The credential the UI presents to the API on the user's behalf.
    #[serde(rename = "t")]
    pub token: String,
    /// Unix seconds after which the cookie is refused.
    #[serde(rename = "e")]
    pub expires: u64,
    /// The CSRF secret every form of this session carries.
    #[serde(rename = "c")]
    pub csrf: String,
}

/// The sealing key, derived from the cluster token (the same on every master).
pub struct Keys {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Keys {
    pub fn new(cluster_token: &str) -> Keys {
        let mut h = Sha256::new();
        h.update(b"cairn-ui-session-v1\0");
        h.update(cluster_token.as_bytes());
        let k = h.finalize();
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &k).expect("32-byte ChaCha20-Poly1305 key"),
        );
        Keys {
            key,
            rng: SystemRandom::new(),
        }
    }

    fn random<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        self.rng.fill(&mut b).expect("system randomness");
        b
    }

    /// A new session for `token`, valid `TTL_SECS` from `now`.
    pub fn issue(&self, token: &str, now: u64) -> Session {
        Session {
            token: token.to_string(),
            expires: now + TTL_SECS,
            csrf: B64.encode(self.random::<16>()),
        }
    }

    /// The cookie value: base64url(nonce ‖ sealed JSON).
    pub fn seal(&self, s: &Session) -> String {
        let nonce = self.random::<NONCE_LEN>();
        let mut data = serde_json::to_vec(s).expect("session encodes");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(COOKIE.as_bytes()),
                &mut data,
            )
            .expect("seal");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        B64.encode(out)
    }

    /// The session in a cookie value, if it was sealed with this key and has not expired.
    pub fn open(&self, cookie: &str, now: u64) -> Option<Session> {
        if cookie.len() > 4096 {
            return None;
        }
        let raw = B64.decode(cookie).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (n, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(COOKIE.as_bytes()), &mut buf)
            .ok()?;
        let s: Session = serde_json::from_slice(plain).ok()?;
        (s.expires > now).then_some(s)
    }
}

/// Whether a submitted CSRF value matches the session's (constant time).
pub fn csrf_ok(s: &Session, submitted: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(s.csrf.as_bytes().ct_eq(submitted.as_bytes()))
}

/// The session cookie's value in a `Cookie` header, if any.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// `Set-Cookie` for a session (`secure` under TLS): HttpOnly, SameSite=Strict, Path=/ui.
pub fn set_cookie(value: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/ui; Max-Age={TTL_SECS}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that removes the session.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_session_opens_only_with_the_same_token_and_before_expiry() {
        let k = Keys::new("cluster-token-1");
        let s = k.issue("user-token", 1000);
        let c = k.seal(&s);
        assert!(
            !c.contains("user-token"),
            "the cookie does not show the token"
        );
        assert_eq!(k.open(&c, 1001), Some(s.clone()));
        assert_eq!(k.open(&c, 1000 + TTL_SECS), None, "expired");
        assert_eq!(Keys::new("another-token").open(&c, 1001), None);
        // Any change to the cookie is refused.
        let mut bad = c.clone().into_bytes();
        let i = bad.len() / 2;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.open(&String::from_utf8(bad).unwrap(), 1001), None);
        assert_eq!(k.open("", 1001), None);
        assert_eq!(k.open("!!!", 1001), None);
    }

    #[test]
    fn csrf_and_cookies() {
        let k = Keys::new("t");
        let s = k.issue("x", 0);
        assert!(csrf_ok(&s, &s.csrf));
        assert!(!csrf_ok(&s, ""));
        assert!(!csrf_ok(&s, "nope"));
        assert_eq!(
            cookie_value("a=1; cairn_session=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie_value("a=1", COOKIE), None);
        assert!(set_cookie("v", false).contains("HttpOnly; SameSite=Strict"));
        assert!(set_cookie("v", true).ends_with("; Secure"));
    }
}
