//! Byte sizes that accept `10G`, `512M`, `1.5T` or a plain number of bytes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

const UNITS: [(char, u64); 5] = [
    ('K', 1 << 10),
    ('M', 1 << 20),
    ('G', 1 << 30),
    ('T', 1 << 40),
    ('P', 1 << 50),
];

/// A size in bytes. Parses binary suffixes (`K`, `M`, `G`, `T`, `P`, optional `i`/`iB`/`B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("Invalid size {input:?}: {reason}")]
pub struct ParseSizeError {
    pub input: String,
    pub reason: &'static str,
}

/// A quantity kept as f64 (bytes, microseconds, a rate) as a whole number: the
/// fraction goes, negatives and NaN are 0, beyond u64 is u64::MAX.
#[expect(
    clippy::cast_possible_truncation,
    reason = "Rust's float-to-int cast saturates: that is the intent"
)]
pub fn whole(x: f64) -> u64 {
    x as u64
}

impl ByteSize {
    pub fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    pub fn as_mib(self) -> u64 {
        self.0 >> 20
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .or_else(|| t.strip_suffix('i'))
            .unwrap_or(t);
        if t.is_empty() {
            return Err(err("empty"));
        }
        let last = t.chars().last().unwrap_or('0').to_ascii_uppercase();
        let (num, mult) = match UNITS.iter().find(|(c, _)| *c == last) {
            Some((_, m)) => (&t[..t.len() - 1], *m),
            None => (t, 1),
        };
        let num = num.trim();
        if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(err("expected a number with an optional K/M/G/T/P suffix"));
        }
        let v: f64 = num.parse().map_err(|_| err("not a number"))?;
        let bytes = v * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err("too large"));
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "finite, non-negative and below u64::MAX (checked above)"
        )]
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match UNITS.iter().rev().find(|(_, m)| b >= *m) {
            Some((c, m)) if b.is_multiple_of(*m) => write!(f, "{}{c}", b / m),
            Some((c, m)) => write!(f, "{:.1}{c}", b as f64 / *m as f64),
            None => write!(f, "{b}"),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl utoipa::PartialSchema for ByteSize {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::*;
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(0)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .examples(["10G"]),
            )
            .description(Some(
                "A size in bytes, or a string with a binary suffix: 512M, 10G",
            ))
            .into()
    }
}
impl utoipa::ToSchema for ByteSize {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_suffixes_binary_units() {
        assert_eq!("10G".parse::<ByteSize>().unwrap().0, 10 << 30);
        assert_eq!("512M".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1.5GiB".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("2k".parse::<ByteSize>().unwrap().0, 2048);
    }

    #[test]
    fn parse_garbage_rejected_with_reason() {
        for s in ["", "G", "-1G", "ten", "1X", "1e3", "99999999999P"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["10G", "512M", "1T", "3K"] {
            let b: ByteSize = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
        assert_eq!(ByteSize(24682416 * 1024).to_string(), "23.5G");
        assert_eq!(ByteSize(100).to_string(), "100");
    }

    #[test]
    fn deserialize_number_or_string() {
        let a: ByteSize = serde_json::from_str("\"1G\"").unwrap();
        let b: ByteSize = serde_json::from_str("1073741824").unwrap();
        assert_eq!(a, b);
    }
}
