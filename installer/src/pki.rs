//! The cluster's PKI: a CA (made here with rcgen, or supplied by the operator), one
//! certificate per node signed by it, and join tokens that let a new node check the CA before
//! it trusts anything the cluster sends.
//!
//! A node certificate names its role and name in the subject's common name, `master:<id>`,
//! `agent:<id>` or `admin:<name>` (organisation `cairn`), and is good for both ends of a TLS
//! connection (server and client auth): every node serves an API and calls others.
//!
//! A join token is `K10<sha256 of the CA certificate, hex>::<id>.<secret>` (the k3s shape).
//! The joiner fetches the CA without trusting the connection, checks its hash against the
//! token, and from then on trusts only that CA; it presents `<id>.<secret>` once with a
//! certificate signing request and receives its certificate. The cluster keeps only the
//! secret's SHA-256, so a stolen state snapshot does not let anyone join.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// File names in a node's TLS directory (`<data-dir>/tls` by default).
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";

/// How long a node certificate is good for, and the CA.
pub const NODE_CERT_DAYS: i64 = 365;
pub const CA_DAYS: i64 = 3650;

/// What a certificate lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A master: Raft peer, caller of agents' APIs.
    Master,
    /// An agent: reports to masters as itself only.
    Agent,
    /// An operator's client certificate (the CLI reading an agent's API directly).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Role> {
        Ok(match s {
            "master" => Role::Master,
            "agent" => Role::Agent,
            "admin" => Role::Admin,
            _ => bail!("unknown role {s:?}: use master, agent or admin"),
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node name as it may appear in a certificate: what agent ids and master ids look like.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("node name {name:?}: use 1-128 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// The cluster CA: its certificate and, on masters and in the installer, its key.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

impl Ca {
    /// A new CA (ECDSA P-256, ten years).
    pub fn generate(cluster: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("cairn CA {cluster}"));
        dn.push(DnType::OrganizationName, "cairn");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(CA_DAYS);
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA from its PEM certificate and key (checked to make a CA).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let ca = Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        };
        ca.issuer()
            .context("the CA certificate and key do not make a CA")?;
        Ok(ca)
    }

    /// The CA of a TLS directory (`ca.crt` and `ca.key`), with the file named on failure.
    pub fn load(dir: &Path) -> Result<Ca> {
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key_pem = read(&dir.join(CA_KEY))?;
        let ca = Ca { cert_pem, key_pem };
        ca.issuer().with_context(|| {
            format!(
                "{} and {} do not make a CA",
                dir.join(CA_CERT).display(),
                dir.join(CA_KEY).display()
            )
        })?;
        Ok(ca)
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write(&dir.join(CA_CERT), &self.cert_pem, 0o644)?;
        write(&dir.join(CA_KEY), &self.key_pem, 0o600)
    }

    /// The CA's private key (PEM): only for a master joining with a master token.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The SHA-256 of the CA certificate (DER), hex: what a join token carries.
    pub fn hash(&self) -> Result<String> {
        ca_hash(&self.cert_pem)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem).context("the CA key is not a PEM key")?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).context("the CA certificate does not parse")
    }

    fn params(role: Role, name: &str, sans: &[String], days: i64) -> Result<CertificateParams> {
        check_name(name)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{role}:{name}"));
        dn.push(DnType::OrganizationName, "cairn");
        p.distinguished_name = dn;
        p.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<Vec<_>>>()?;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::days(days);
        Ok(p)
    }

    /// A key and a certificate for a node, both PEM: `(cert, key)`.
    pub fn issue(&self, role: Role, name: &str, sans: &[String]) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let p = Self::params(role, name, sans, NODE_CERT_DAYS)?;
        let cert = p.signed_by(&key, &self.issuer()?)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a certificate signing request for `role:name`. Only the request's public key is
    /// taken: the role, name and addresses are the cluster's choice, never the requester's.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: Role,
        name: &str,
        sans: &[String],
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("csr: not a valid certificate signing request ({e})"))?;
        let p = Self::params(role, name, sans, NODE_CERT_DAYS)?;
        Ok(p.signed_by(&csr.public_key, &self.issuer()?)?.pem())
    }
}

/// A new key pair and a certificate signing request for it: `(csr, key)`, PEM.
pub fn make_csr(name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// SHA-256 (hex) of the first certificate in a PEM text.
pub fn ca_hash(cert_pem: &str) -> Result<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

/// Writes a node's TLS directory: the CA certificate (never its key), the node's certificate
/// and its key (0600).
pub fn write_node(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write(&dir.join(CA_CERT), ca_pem, 0o644)?;
    write(&dir.join(NODE_CERT), cert_pem, 0o644)?;
    write(&dir.join(NODE_KEY), key_pem, 0o600)
}

/// Where a PKI directory (of `cairn dev`, a lab, the installer) keeps its admin certificate.
pub const ADMIN_DIR: &str = "admin";

/// A client builder that trusts the CA of `pki_dir` and presents its admin certificate: what
/// the CLI of a lab, the test labs and the installer call the cluster with.
pub fn admin_client(pki_dir: &Path) -> Result<reqwest::ClientBuilder> {
    let read = |p: PathBuf| std::fs::read(&p).with_context(|| format!("reading {}", p.display()));
    let ca = read(pki_dir.join(CA_CERT))?;
    let mut id = read(pki_dir.join(ADMIN_DIR).join(NODE_CERT))?;
    id.extend(read(pki_dir.join(ADMIN_DIR).join(NODE_KEY))?);
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .identity(reqwest::Identity::from_pem(&id)?))
}

/// The admin client certificate of a PKI directory (`<pki_dir>/admin`), made once.
pub fn ensure_admin(ca: &Ca, pki_dir: &Path, name: &str) -> Result<()> {
    ensure_node(ca, &pki_dir.join(ADMIN_DIR), Role::Admin, name, &[])
}

/// A TLS directory for a node of a cluster whose CA is in `ca`: writes it unless it is
/// already there (re-runs keep existing certificates).
pub fn ensure_node(ca: &Ca, dir: &Path, role: Role, name: &str, sans: &[String]) -> Result<()> {
    if dir.join(NODE_CERT).exists() && dir.join(NODE_KEY).exists() {
        return Ok(());
    }
    let (cert, key) = ca.issue(role, name, sans)?;
    write_node(dir, &ca.cert_pem, &cert, &key)
}

fn san(s: &str) -> Result<SanType> {
    let dns_ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    Ok(match s.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) if !dns_ok => bail!("address {s:?} is neither an IP nor a DNS name"),
        Err(_) => {
            SanType::DnsName(s.to_string().try_into().map_err(|e| {
                anyhow::anyhow!("address {s:?} is neither an IP nor a DNS name: {e}")
            })?)
        }
    })
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn write(p: &Path, text: &str, mode: u32) -> Result<()> {
    write_file(p, text.as_bytes(), mode)
}

/// Writes `data` to `p` atomically (a temporary file renamed into place) with `mode`.
pub fn write_file(p: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))
}

/// A join token: `K10<ca hash>::<id>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_hash: String,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, even in a debug print.
        write!(
            f,
            "JoinToken({}, K10{}::{}.…)",
            self.id, self.ca_hash, self.id
        )
    }
}

impl JoinToken {
    /// A fresh token for the CA with hash `ca_hash`: a 6-byte id and a 16-byte secret.
    pub fn generate(ca_hash: &str) -> JoinToken {
        use rand::RngCore;
        let mut id = [0u8; 6];
        let mut secret = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        rand::thread_rng().fill_bytes(&mut secret);
        JoinToken {
            ca_hash: ca_hash.to_string(),
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    /// Parses a token, naming what is wrong with it.
    pub fn parse(s: &str) -> Result<JoinToken> {
        let s = s.trim();
        let rest = s
            .strip_prefix("K10")
            .context("join token: it starts with K10 (made by `cairn token create`)")?;
        let (hash, cred) = rest
            .split_once("::")
            .context("join token: expected K10<ca hash>::<id>.<secret>")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("join token: the CA hash is 64 hex digits (the SHA-256 of the cluster CA)");
        }
        let (id, secret) = cred
            .split_once('.')
            .context("join token: expected <id>.<secret> after ::")?;
        let hexy =
            |x: &str| !x.is_empty() && x.len() <= 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hexy(id) || !hexy(secret) {
            bail!("join token: the id and secret are hex digits");
        }
        Ok(JoinToken {
            ca_hash: hash.to_ascii_lowercase(),
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// What the cluster stores in place of the secret.
    pub fn secret_digest(secret: &str) -> String {
        hex::encode(Sha256::digest(secret.as_bytes()))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K10{}::{}.{}", self.ca_hash, self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_role_and_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t").unwrap();
        ca.save(dir.path()).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let (cert, _key) = ca
            .issue(Role::Agent, "a1", &["127.0.0.1".into(), "node-1".into()])
            .unwrap();
        let text = x509_text(&cert);
        assert!(text.contains("agent:a1"), "{text}");
        // The CSR path takes only the public key: role and name are ours.
        let (csr, _k) = make_csr("master:evil").unwrap();
        let signed = ca.sign_csr(&csr, Role::Agent, "a2", &[]).unwrap();
        assert!(x509_text(&signed).contains("agent:a2"));
        assert!(!x509_text(&signed).contains("evil"));
        assert!(ca.sign_csr("garbage", Role::Agent, "a2", &[]).is_err());
        assert!(ca.issue(Role::Agent, "bad name", &[]).is_err());
        assert!(ca.issue(Role::Agent, "a", &["not a name!".into()]).is_err());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(CA_KEY))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    fn x509_text(pem: &str) -> String {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        c.subject().to_string()
    }

    #[test]
    fn join_tokens_round_trip_and_refuse_garbage() {
        let ca = Ca::generate("t").unwrap();
        let h = ca.hash().unwrap();
        assert_eq!(h.len(), 64);
        let t = JoinToken::generate(&h);
        let s = t.to_string();
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        for bad in [
            "",
            "K10",
            "X10abc::a.b",
            &format!("K10{}::nodot", h),
            &format!("K10{}::a.", h),
            &format!("K10{}::a.zz", h),
            "K10abcd::a.b",
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("join token"), "{bad:?}: {e}");
        }
        assert_ne!(JoinToken::secret_digest("a"), JoinToken::secret_digest("b"));
    }
}
