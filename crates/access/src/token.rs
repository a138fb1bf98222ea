//! API token values: `USER!ID=SECRET`, the secret 32 random bytes in hex. The store
//! keeps only the secret's SHA-256: it never holds a token that works.

use sha2::{Digest, Sha256};

/// A token's parts as a client sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenValue<'a> {
    pub user: &'a str,
    pub id: &'a str,
    pub secret: &'a str,
}

/// A new secret.
pub fn new_secret() -> String {
    let b: [u8; 32] = rand::random();
    hex(&b)
}

/// What the client sends.
pub fn format(user: &str, id: &str, secret: &str) -> String {
    format!("{user}!{id}={secret}")
}

/// Splits `USER!ID=SECRET`; None for anything else (the names are checked by the
/// caller against the store, the secret by its digest).
pub fn parse(v: &str) -> Option<TokenValue<'_>> {
    let (user, rest) = v.trim().split_once('!')?;
    let (id, secret) = rest.split_once('=')?;
    (!user.is_empty()
        && !id.is_empty()
        && secret.len() == 64
        && secret.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(TokenValue { user, id, secret })
}

/// What the store keeps of a secret.
pub fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.trim().as_bytes()))
}

/// Whether a token works at `now_ms`: not revoked, not expired.
pub fn usable(expires_ms: Option<u64>, revoked_ms: Option<u64>, now_ms: u64) -> bool {
    revoked_ms.is_none() && expires_ms.is_none_or(|x| now_ms < x)
}

/// Compares without stopping at the first difference.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_nothing_else_parses() {
        let s = new_secret();
        assert_eq!(s.len(), 64);
        let v = format("alice", "ci", &s);
        assert_eq!(
            parse(&v),
            Some(TokenValue {
                user: "alice",
                id: "ci",
                secret: &s
            })
        );
        for bad in [
            "",
            "alice",
            "alice!ci",
            "alice!ci=short",
            &format!("!ci={s}"),
            &format!("alice!={s}"),
            &format!("alice!ci={}", "z".repeat(64)),
            &s,
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(digest(&s), digest(&format!(" {s}\n")));
        assert_ne!(digest(&s), digest(&new_secret()));
        assert!(usable(None, None, 5) && usable(Some(6), None, 5));
        assert!(!usable(Some(5), None, 5) && !usable(None, Some(1), 5));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
