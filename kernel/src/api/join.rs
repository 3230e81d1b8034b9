//! Joining the cluster (`/api/v1/join`, `/api/v1/join-tokens`): tokens made, listed and
//! revoked by a user; the CA served to anyone (a joiner checks it against its token's hash);
//! and a node's certificate signed for a valid token. See `crate::join` and
//! `cairn_installer::pki`.

use super::{now_ms, Ctx};
use crate::error::{ApiError, JsonBody};
use crate::join::JoinTokenRecord;
use crate::state::Command;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_installer::pki::{Ca, JoinToken, Role};
use serde::Deserialize;
use serde_json::json;

/// Longest a token may live, and the default.
const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn tls() -> Result<std::sync::Arc<cairn_raft::tls::NodeTls>, ApiError> {
    cairn_raft::tls::current().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "insecure",
            "this cluster runs without TLS (--insecure): there is no CA to join; start the \
             masters with --tls-dir (see `cairn ca init`)",
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateToken {
    /// How long the token is good for (`30m`, `24h`, `7d`); default 24 h, at most a year.
    ttl: Option<String>,
    description: Option<String>,
    /// How many nodes may join with it; 0 or absent: any number until it expires.
    max_uses: Option<u32>,
    /// `agent` (default) or `master`. A master token hands the joining master the CA key and
    /// the masters' peer credential: treat it like the CA key itself.
    role: Option<String>,
}

pub(super) async fn create_token(
    ctx: Ctx,
    JsonBody(b): JsonBody<CreateToken>,
) -> Result<Response, ApiError> {
    let ttl = match &b.ttl {
        None => DEFAULT_TTL,
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| ApiError::bad_request("ttl", format!("ttl {t:?}: {e} (e.g. 24h)")))?,
    };
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(ApiError::bad_request(
            "ttl",
            "ttl is more than 0 and at most 365d",
        ));
    }
    let description = b.description.unwrap_or_default();
    if description.len() > 200 || description.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "description",
            "description is at most 200 printable characters",
        ));
    }
    let role = b.role.unwrap_or_else(|| "agent".into());
    if role != "agent" && role != "master" {
        return Err(ApiError::bad_request(
            "role",
            format!("role {role:?}: use agent or master"),
        ));
    }
    let tls = tls()?;
    let hash = cairn_installer::pki::ca_hash(&tls.ca_pem)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca", e.to_string()))?;
    let token = JoinToken::generate(&hash);
    let now = now_ms();
    let rec = JoinTokenRecord {
        id: token.id.clone(),
        role,
        secret_sha256: JoinToken::secret_digest(&token.secret),
        description,
        created: now,
        expires: now + ttl.as_millis() as u64,
        revoked: false,
        uses: 0,
        max_uses: b.max_uses.unwrap_or(0),
        nodes: vec![],
    };
    let expires = rec.expires;
    ctx.propose(Command::PutJoinToken { token: rec }).await?;
    // The only time the secret is shown.
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": token.id, "token": token.to_string(), "expires": expires})),
    )
        .into_response())
}

pub(super) async fn list_tokens(ctx: Ctx) -> Result<Response, ApiError> {
    ctx.prepare_read(&Default::default(), |s| s.applied).await?;
    let now = now_ms();
    let list: Vec<serde_json::Value> = ctx.read(|s| {
        s.join_tokens
            .values()
            .map(|t| {
                json!({"id": t.id, "role": t.role, "description": t.description,
                       "created": t.created, "expires": t.expires, "revoked": t.revoked,
                       "uses": t.uses, "max_uses": t.max_uses, "nodes": t.nodes,
                       "usable": t.unusable(now).is_none()})
            })
            .collect()
    });
    Ok(Json(list).into_response())
}

pub(super) async fn revoke_token(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    if id.len() > 64 {
        return Err(ApiError::bad_request(
            "id",
            "token ids are at most 64 characters",
        ));
    }
    ctx.propose(Command::RevokeJoinToken { id, at: now_ms() })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The cluster CA certificate, to anyone: a joiner checks its SHA-256 against its token.
pub(super) async fn join_ca() -> Result<Response, ApiError> {
    let tls = tls()?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        tls.ca_pem.clone(),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinRequest {
    /// The whole token, `K10<ca hash>::<id>.<secret>`.
    token: String,
    /// The node's name (an agent's id).
    name: String,
    /// A PEM certificate signing request for the node's key (only its public key is used).
    csr: String,
    /// The addresses and host names the node serves on (its certificate's SANs).
    #[serde(default)]
    addresses: Vec<String>,
}

/// Signs a joining node's certificate for a valid token: the token is spent through Raft
/// first, so a revoked, expired or used-up token signs nothing on any master.
pub(super) async fn join(
    ctx: Ctx,
    JsonBody(b): JsonBody<JoinRequest>,
) -> Result<Response, ApiError> {
    let unauthorized =
        |m: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m).field("token");
    let token = JoinToken::parse(&b.token).map_err(|e| unauthorized(e.to_string()))?;
    cairn_installer::pki::check_name(&b.name)
        .map_err(|e| ApiError::bad_request("name", e.to_string()))?;
    if b.csr.len() > 16 * 1024 {
        return Err(ApiError::bad_request("csr", "csr is at most 16 KiB of PEM"));
    }
    if b.addresses.len() > 16 || b.addresses.iter().any(|a| a.is_empty() || a.len() > 253) {
        return Err(ApiError::bad_request(
            "addresses",
            "at most 16 addresses, each an IP or a DNS name",
        ));
    }
    let tls = tls()?;
    let hash = cairn_installer::pki::ca_hash(&tls.ca_pem)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca", e.to_string()))?;
    if token.ca_hash != hash {
        return Err(unauthorized(
            "join token: it was made for another cluster's CA".into(),
        ));
    }
    let ca = Ca::load(&tls.dir).map_err(|e| {
        ApiError::unavailable(
            "cannot_sign",
            format!("this master cannot sign certificates ({e:#}); ask a master that holds ca.key"),
        )
    })?;
    let digest = JoinToken::secret_digest(&token.secret);
    // A token made a moment ago on another master is here after the read barrier.
    ctx.prepare_read(&Default::default(), |s| s.applied).await?;
    let known = ctx.read(|s| {
        s.join_tokens
            .get(&token.id)
            .map(|t| (t.secret_sha256.clone(), t.role.clone()))
    });
    let role = match known {
        Some((d, role))
            if {
                use subtle::ConstantTimeEq;
                bool::from(d.as_bytes().ct_eq(digest.as_bytes()))
            } =>
        {
            role
        }
        _ => {
            return Err(unauthorized(
                "join token: unknown id or wrong secret".into(),
            ))
        }
    };
    let role = if role == "master" {
        if b.name.parse::<u64>().map_or(true, |id| id == 0) {
            return Err(ApiError::bad_request(
                "name",
                "a master joins under its --node-id, a number above 0",
            ));
        }
        Role::Master
    } else {
        Role::Agent
    };
    // Sign first (a bad CSR spends nothing), then spend, then hand it out.
    let cert = ca
        .sign_csr(&b.csr, role, &b.name, &b.addresses)
        .map_err(|e| ApiError::bad_request("csr", format!("{e:#}")))?;
    ctx.propose(Command::SpendJoinToken {
        id: token.id,
        node: b.name.clone(),
        at: now_ms(),
    })
    .await?;
    tracing::info!("{role} {} joined with a token", b.name);
    let mut answer = json!({"certificate": cert, "ca": tls.ca_pem, "role": role.as_str(),
                            "name": b.name});
    if role == Role::Master {
        // What a master needs besides its certificate: the CA key (to sign joins itself)
        // and the masters' Raft credential.
        answer["ca_key"] = ca.key_pem().into();
        answer["peer_token"] = ctx.node.peer_token().into();
    }
    Ok(Json(answer).into_response())
}
