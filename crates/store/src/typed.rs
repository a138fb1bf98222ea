//! JSON helpers on top of any [`Store`].

use crate::{Cmp, Compare, KeyValue, Op, Store, StoreError, Txn};
use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};

#[async_trait]
pub trait StoreJson {
    async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, KeyValue)>, StoreError>;
    async fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError>;
    async fn put_json<T: Serialize + Sync>(&self, key: &str, v: &T) -> Result<i64, StoreError>;
    /// Creates `key` only if it does not exist; returns false if it did.
    async fn create_json<T: Serialize + Sync>(&self, key: &str, v: &T) -> Result<bool, StoreError>;
    /// Replaces `key` only if its mod revision is still `mod_rev`.
    async fn cas_json<T: Serialize + Sync>(
        &self,
        key: &str,
        mod_rev: i64,
        v: &T,
    ) -> Result<bool, StoreError>;
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
        key: kv.key.clone(),
        source,
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("types serialise to JSON")
}

#[async_trait]
impl<S: Store + ?Sized> StoreJson for S {
    async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, KeyValue)>, StoreError> {
        match self.get(key).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv))),
            None => Ok(None),
        }
    }
    async fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        self.list(prefix).await?.iter().map(decode).collect()
    }
    async fn put_json<T: Serialize + Sync>(&self, key: &str, v: &T) -> Result<i64, StoreError> {
        self.put(key, encode(v), None).await
    }
    async fn create_json<T: Serialize + Sync>(&self, key: &str, v: &T) -> Result<bool, StoreError> {
        let r = self
            .txn(Txn {
                compare: vec![Compare::Version(key.into(), Cmp::Equal, 0)],
                success: vec![Op::Put {
                    key: key.into(),
                    value: encode(v),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }
    async fn cas_json<T: Serialize + Sync>(
        &self,
        key: &str,
        mod_rev: i64,
        v: &T,
    ) -> Result<bool, StoreError> {
        let r = self
            .txn(Txn {
                compare: vec![Compare::ModRev(key.into(), Cmp::Equal, mod_rev)],
                success: vec![Op::Put {
                    key: key.into(),
                    value: encode(v),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }
}
