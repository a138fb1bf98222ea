//! One chunk as the store keeps it (sans-IO): its name (BLAKE3 of the plain data, keyed
//! when the backup is encrypted) and its file, a fixed header and the payload:
//!
//! ```text
//! 0   8  magic "FRYCHNK1"
//! 8   1  flags: 1 = zstd, 2 = encrypted (XChaCha20-Poly1305)
//! 9   3  zero
//! 12  4  plain length (little endian, ≤ 4 MiB)
//! 16  4  CRC-32 of the payload (the bytes after the header, as stored)
//! 20  …  payload: [24-byte nonce] data (zstd or plain) [16-byte tag]
//! ```
//!
//! The CRC lets the store check a chunk it cannot decrypt; the name lets anyone holding
//! the key (or anyone, for a plain chunk) check the content. Decoding never trusts a
//! length: a payload larger than a chunk can be, a plain length over the limit, a
//! decompressed size other than announced are all errors.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// The size of every chunk but a disk's last one.
pub const CHUNK_SIZE: usize = 4 << 20;
const MAGIC: &[u8; 8] = b"FRYCHNK1";
const HEADER_LEN: usize = 20;
const FLAG_ZSTD: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// zstd's fastest useful level: the goal is hundreds of MB/s per core.
const ZSTD_LEVEL: i32 = 1;
/// The largest payload a chunk file may hold: incompressible data stored plain plus
/// the encryption overhead.
const MAX_PAYLOAD: usize = CHUNK_SIZE + NONCE_LEN + TAG_LEN;
/// The largest chunk file.
pub const MAX_FILE: usize = HEADER_LEN + MAX_PAYLOAD;

/// A chunk's name: 32 bytes of BLAKE3.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_slice(b: &[u8]) -> Option<Digest> {
        <[u8; 32]>::try_from(b).ok().map(Digest)
    }

    /// A name from its 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.hex()[..16])
    }
}

/// An encryption key: never written to the store. From it come the key that names
/// chunks (so equal data dedups only under the same key) and the key that seals them.
#[derive(Clone)]
pub struct CryptKey {
    id_key: [u8; 32],
    cipher: XChaCha20Poly1305,
    fingerprint: String,
}

impl CryptKey {
    pub fn new(master: &[u8; 32]) -> CryptKey {
        let id_key = blake3::derive_key("ferry backup chunk id v1", master);
        let seal = blake3::derive_key("ferry backup chunk seal v1", master);
        let fp = blake3::derive_key("ferry backup key fingerprint v1", master);
        let fingerprint = fp[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        CryptKey {
            id_key,
            cipher: XChaCha20Poly1305::new((&seal).into()),
            fingerprint,
        }
    }

    /// A fresh random key.
    pub fn generate() -> ([u8; 32], CryptKey) {
        let mut master = [0u8; 32];
        rand::rng().fill_bytes(&mut master);
        let key = CryptKey::new(&master);
        (master, key)
    }

    /// Names the key without revealing it (recorded with each encrypted backup).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("Not a ferry chunk (bad magic or header)")]
    Header,
    #[error("Chunk payload is {got} bytes, the header or the limit allows {limit}")]
    Length { got: usize, limit: usize },
    #[error("Chunk checksum mismatch: the stored bytes are damaged")]
    Crc,
    #[error("Chunk is encrypted and no key was given")]
    NeedKey,
    #[error("Chunk does not decrypt with this key (wrong key or damaged)")]
    Decrypt,
    #[error("Chunk does not decompress: {0}")]
    Decompress(String),
    #[error("Chunk content does not match its name")]
    Digest,
    #[error("Chunk compression failed: {0}")]
    Compress(String),
}

/// The name of `data` (keyed when `key` is given).
pub fn digest(data: &[u8], key: Option<&CryptKey>) -> Digest {
    match key {
        Some(k) => Digest(*blake3::keyed_hash(&k.id_key, data).as_bytes()),
        None => Digest(*blake3::hash(data).as_bytes()),
    }
}

/// The file content for `data`: compressed when that saves space, sealed when `key`.
pub fn encode(data: &[u8], key: Option<&CryptKey>) -> Result<Vec<u8>, ChunkError> {
    if data.len() > CHUNK_SIZE {
        return Err(ChunkError::Length {
            got: data.len(),
            limit: CHUNK_SIZE,
        });
    }
    let compressed =
        zstd::bulk::compress(data, ZSTD_LEVEL).map_err(|e| ChunkError::Compress(e.to_string()))?;
    let (mut flags, body) = if compressed.len() < data.len() {
        (FLAG_ZSTD, compressed)
    } else {
        (0, data.to_vec())
    };
    let payload = match key {
        None => body,
        Some(k) => {
            flags |= FLAG_ENCRYPTED;
            let mut nonce = [0u8; NONCE_LEN];
            rand::rng().fill_bytes(&mut nonce);
            let sealed = k
                .cipher
                .encrypt(XNonce::from_slice(&nonce), body.as_slice())
                .map_err(|_| ChunkError::Compress("encryption failed".into()))?;
            let mut p = Vec::with_capacity(NONCE_LEN + sealed.len());
            p.extend_from_slice(&nonce);
            p.extend_from_slice(&sealed);
            p
        }
    };
    let plain_len = u32::try_from(data.len()).map_err(|_| ChunkError::Header)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[flags, 0, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// What a chunk file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub compressed: bool,
    pub encrypted: bool,
    pub plain_len: usize,
}

/// Checks a chunk file without any key: header, lengths and CRC.
pub fn check(file: &[u8]) -> Result<Header, ChunkError> {
    if file.len() < HEADER_LEN || &file[..8] != MAGIC || file[9..12] != [0, 0, 0] {
        return Err(ChunkError::Header);
    }
    let flags = file[8];
    if flags & !(FLAG_ZSTD | FLAG_ENCRYPTED) != 0 {
        return Err(ChunkError::Header);
    }
    let word = |at: usize| u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
    let plain_len = word(12) as usize;
    if plain_len > CHUNK_SIZE {
        return Err(ChunkError::Length {
            got: plain_len,
            limit: CHUNK_SIZE,
        });
    }
    let payload = &file[HEADER_LEN..];
    if payload.len() > MAX_PAYLOAD {
        return Err(ChunkError::Length {
            got: payload.len(),
            limit: MAX_PAYLOAD,
        });
    }
    if crc32fast::hash(payload) != word(16) {
        return Err(ChunkError::Crc);
    }
    Ok(Header {
        compressed: flags & FLAG_ZSTD != 0,
        encrypted: flags & FLAG_ENCRYPTED != 0,
        plain_len,
    })
}

/// The plain data of a chunk file, checked against its expected name.
pub fn decode(file: &[u8], expect: &Digest, key: Option<&CryptKey>) -> Result<Vec<u8>, ChunkError> {
    let header = check(file)?;
    let payload = &file[HEADER_LEN..];
    let opened;
    let body: &[u8] = if header.encrypted {
        let k = key.ok_or(ChunkError::NeedKey)?;
        if payload.len() < NONCE_LEN + TAG_LEN {
            return Err(ChunkError::Decrypt);
        }
        let (nonce, sealed) = payload.split_at(NONCE_LEN);
        opened = k
            .cipher
            .decrypt(XNonce::from_slice(nonce), sealed)
            .map_err(|_| ChunkError::Decrypt)?;
        &opened
    } else {
        payload
    };
    let data = if header.compressed {
        let d = zstd::bulk::decompress(body, header.plain_len)
            .map_err(|e| ChunkError::Decompress(e.to_string()))?;
        if d.len() != header.plain_len {
            return Err(ChunkError::Decompress(format!(
                "{} bytes, the header says {}",
                d.len(),
                header.plain_len
            )));
        }
        d
    } else {
        if body.len() != header.plain_len {
            return Err(ChunkError::Length {
                got: body.len(),
                limit: header.plain_len,
            });
        }
        body.to_vec()
    };
    let key = if header.encrypted { key } else { None };
    if digest(&data, key) != *expect {
        return Err(ChunkError::Digest);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn chunk_plain_round_trips_and_is_compressed() {
        let data = sample();
        let d = digest(&data, None);
        let file = encode(&data, None).unwrap();
        assert!(file.len() < data.len() / 2);
        assert!(check(&file).unwrap().compressed);
        assert_eq!(decode(&file, &d, None).unwrap(), data);
    }

    #[test]
    fn chunk_encrypted_needs_the_key_and_names_differ() {
        let data = sample();
        let (_, key) = CryptKey::generate();
        let (_, other) = CryptKey::generate();
        let d = digest(&data, Some(&key));
        assert_ne!(d, digest(&data, None));
        let file = encode(&data, Some(&key)).unwrap();
        let h = check(&file).unwrap();
        assert!(h.encrypted);
        assert_eq!(decode(&file, &d, None), Err(ChunkError::NeedKey));
        assert_eq!(decode(&file, &d, Some(&other)), Err(ChunkError::Decrypt));
        assert_eq!(decode(&file, &d, Some(&key)).unwrap(), data);
    }

    #[test]
    fn chunk_flipped_bit_is_caught_without_the_key() {
        let data = sample();
        let (_, key) = CryptKey::generate();
        let mut file = encode(&data, Some(&key)).unwrap();
        let at = file.len() / 2;
        file[at] ^= 1;
        assert_eq!(check(&file), Err(ChunkError::Crc));
    }

    #[test]
    fn chunk_content_other_than_its_name_is_refused() {
        let file = encode(b"hello", None).unwrap();
        assert_eq!(
            decode(&file, &digest(b"world", None), None),
            Err(ChunkError::Digest)
        );
    }

    #[test]
    fn chunk_incompressible_data_is_stored_plain() {
        let mut data = vec![0u8; 65536];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
        let file = encode(&data, None).unwrap();
        assert!(!check(&file).unwrap().compressed);
        assert_eq!(decode(&file, &digest(&data, None), None).unwrap(), data);
    }

    proptest! {
        #[test]
        fn chunk_random_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = check(&bytes);
            let _ = decode(&bytes, &Digest([0; 32]), None);
        }

        #[test]
        fn chunk_header_with_valid_crc_and_lying_length_is_refused(len in any::<u32>(), flags in 0u8..4, body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut file = MAGIC.to_vec();
            file.extend_from_slice(&[flags, 0, 0, 0]);
            file.extend_from_slice(&len.to_le_bytes());
            file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            file.extend_from_slice(&body);
            let (_, key) = CryptKey::generate();
            let r = decode(&file, &digest(&body, None), Some(&key));
            if let Ok(d) = r {
                prop_assert_eq!(d, body);
            }
        }
    }
}
