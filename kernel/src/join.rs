//! Join tokens as replicated state: what `cairn token create|list|revoke` manage and what
//! `POST /api/v1/join` spends. The cluster keeps only each secret's SHA-256; whether a token
//! may still be used (not revoked, not expired, uses left) is decided in `apply`, in log
//! order, so a revocation and a join racing each other have one answer on every master.

use crate::state::{Outcome, State};
use serde::{Deserialize, Serialize};

/// At most this many tokens are kept (revoked and expired ones go first).
pub const JOIN_TOKENS_KEPT: usize = 1000;
/// The nodes that joined with one token, newest last, at most this many.
const NODES_KEPT: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub id: String,
    /// `agent` (masters join with certificates made by the installer, not tokens, for now).
    pub role: String,
    /// SHA-256 (hex) of the secret.
    pub secret_sha256: String,
    pub description: String,
    /// Unix milliseconds.
    pub created: u64,
    pub expires: u64,
    pub revoked: bool,
    pub uses: u32,
    /// 0: any number of nodes.
    pub max_uses: u32,
    /// Names of the nodes that joined with it.
    pub nodes: Vec<String>,
}

impl JoinTokenRecord {
    /// Why this token cannot be used at `at`, if it cannot.
    pub fn unusable(&self, at: u64) -> Option<String> {
        if self.revoked {
            Some(format!("join token {} was revoked", self.id))
        } else if at >= self.expires {
            Some(format!("join token {} has expired", self.id))
        } else if self.max_uses > 0 && self.uses >= self.max_uses {
            Some(format!(
                "join token {} was used {} times, its limit",
                self.id, self.uses
            ))
        } else {
            None
        }
    }
}

fn rejected(code: &str, field: &str, message: String) -> Outcome {
    Outcome::Rejected {
        code: code.into(),
        field: field.into(),
        message,
    }
}

pub fn put(state: &mut State, index: u64, token: JoinTokenRecord) -> Outcome {
    if state.join_tokens.contains_key(&token.id) {
        return rejected("conflict", "id", format!("join token {} exists", token.id));
    }
    if state.join_tokens.len() >= JOIN_TOKENS_KEPT {
        // Make room: drop the oldest revoked or expired token, else refuse.
        let at = token.created;
        let old = state
            .join_tokens
            .values()
            .filter(|t| t.revoked || t.expires <= at)
            .min_by_key(|t| t.created)
            .map(|t| t.id.clone());
        match old {
            Some(id) => {
                state.join_tokens.remove(&id);
            }
            None => {
                return rejected(
                    "too_many",
                    "id",
                    format!(
                    "{JOIN_TOKENS_KEPT} join tokens are live: revoke some (`cairn token revoke`)"
                ),
                )
            }
        }
    }
    state.join_tokens.insert(token.id.clone(), token);
    Outcome::Done { index }
}

pub fn revoke(state: &mut State, index: u64, id: &str) -> Outcome {
    match state.join_tokens.get_mut(id) {
        None => rejected("not_found", "id", format!("no join token {id:?}")),
        Some(t) => {
            t.revoked = true;
            Outcome::Done { index }
        }
    }
}

pub fn spend(state: &mut State, index: u64, id: &str, node: &str, at: u64) -> Outcome {
    let Some(t) = state.join_tokens.get_mut(id) else {
        return rejected("unauthorized", "token", format!("no join token {id:?}"));
    };
    if let Some(why) = t.unusable(at) {
        return rejected("unauthorized", "token", why);
    }
    t.uses += 1;
    t.nodes.push(node.to_string());
    if t.nodes.len() > NODES_KEPT {
        t.nodes.remove(0);
    }
    Outcome::Done { index }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(id: &str, expires: u64, max_uses: u32) -> JoinTokenRecord {
        JoinTokenRecord {
            id: id.into(),
            role: "agent".into(),
            secret_sha256: "x".into(),
            description: String::new(),
            created: 0,
            expires,
            revoked: false,
            uses: 0,
            max_uses,
            nodes: vec![],
        }
    }

    #[test]
    fn spending_follows_revocation_expiry_and_limits() {
        let mut s = State::default();
        assert!(matches!(
            put(&mut s, 1, tok("a", 100, 2)),
            Outcome::Done { .. }
        ));
        assert!(matches!(
            put(&mut s, 2, tok("a", 100, 2)),
            Outcome::Rejected { .. }
        ));
        // (now, expected) in order: two uses allowed, the third refused.
        let table: &[(&str, u64, bool)] = &[("a", 10, true), ("a", 20, true), ("a", 30, false)];
        for (i, (id, at, ok)) in table.iter().enumerate() {
            let o = spend(&mut s, 3 + i as u64, id, &format!("n{i}"), *at);
            assert_eq!(matches!(o, Outcome::Done { .. }), *ok, "{i}: {o:?}");
        }
        assert_eq!(s.join_tokens["a"].nodes, vec!["n0", "n1"]);
        put(&mut s, 9, tok("b", 100, 0));
        assert!(matches!(
            spend(&mut s, 10, "b", "n", 100),
            Outcome::Rejected { .. }
        ));
        assert!(matches!(
            spend(&mut s, 11, "b", "n", 99),
            Outcome::Done { .. }
        ));
        assert!(matches!(revoke(&mut s, 12, "b"), Outcome::Done { .. }));
        let Outcome::Rejected { message, .. } = spend(&mut s, 13, "b", "n", 50) else {
            panic!("a revoked token joined")
        };
        assert!(message.contains("revoked"), "{message}");
        assert!(matches!(
            spend(&mut s, 14, "zz", "n", 1),
            Outcome::Rejected { .. }
        ));
        assert!(matches!(revoke(&mut s, 15, "zz"), Outcome::Rejected { .. }));
    }

    #[test]
    fn a_full_table_drops_dead_tokens_first() {
        let mut s = State::default();
        for i in 0..JOIN_TOKENS_KEPT {
            put(&mut s, i as u64, tok(&format!("t{i}"), 1_000, 0));
        }
        let mut t = tok("new", 2_000, 0);
        t.created = 500;
        assert!(matches!(
            put(&mut s, 5000, t.clone()),
            Outcome::Rejected { .. }
        ));
        revoke(&mut s, 5001, "t7");
        assert!(matches!(put(&mut s, 5002, t), Outcome::Done { .. }));
        assert!(!s.join_tokens.contains_key("t7"));
    }
}
