//! Password hashes: argon2id with its default cost (19 MiB, 2 passes), kept as PHC
//! strings (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// A new hash of `password` with a random salt.
pub fn hash(password: &str) -> String {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes make a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 takes any password with the default parameters")
        .to_string()
}

/// Whether `password` matches `phc` (false for a malformed hash).
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Spends the time of one verification, for a user that does not exist or has no
/// password (an answer as slow as a wrong password's does not tell which users exist).
pub fn verify_nothing(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let h = DUMMY.get_or_init(|| hash("ferry: no such user"));
    let _ = verify(password, h);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_their_password_and_are_salted() {
        let a = hash("correct horse battery");
        let b = hash("correct horse battery");
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify("correct horse battery", &a));
        assert!(!verify("correct horse batterY", &a));
        assert!(!verify("", &a));
        assert!(!verify("x", "not a hash"));
        verify_nothing("x");
    }
}
