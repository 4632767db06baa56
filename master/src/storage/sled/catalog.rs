//! [`CatalogStore`] on sled.
//!
//! Trees:
//! - `catalog`: kind tag + id -> scope (length-prefixed) + name (length-prefixed) + body
//! - `catalog_names`: kind tag + scope (length-prefixed) + name -> id (the unique index)
//!
//! A record and its index entry change in one transaction over both trees.
use super::{push_part, take_part, tx_error};
use crate::error::{MasterError, Result};
use crate::storage::{BoxFuture, CatalogKind, CatalogRecord, CatalogStore, PutOutcome};
use sled::Transactional;
use sled::transaction::ConflictableTransactionResult;

/// The catalog's trees of one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SledCatalog {
    db: sled::Db,
    records: sled::Tree,
    names: sled::Tree,
}

fn record_key(kind: CatalogKind, id: &str) -> Vec<u8> {
    let mut k = vec![kind.tag()];
    k.extend_from_slice(id.as_bytes());
    k
}

fn scope_prefix(kind: CatalogKind, scope: &str) -> Vec<u8> {
    let mut k = vec![kind.tag()];
    push_part(&mut k, scope);
    k
}

fn name_key(kind: CatalogKind, scope: &str, name: &str) -> Vec<u8> {
    let mut k = scope_prefix(kind, scope);
    k.extend_from_slice(name.as_bytes());
    k
}

fn encode(rec: &CatalogRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + rec.scope.len() + rec.name.len() + rec.body.len());
    push_part(&mut v, &rec.scope);
    push_part(&mut v, &rec.name);
    v.extend_from_slice(&rec.body);
    v
}

fn decode(kind: CatalogKind, id: &str, v: &[u8]) -> Result<CatalogRecord> {
    let bad = || MasterError::Corrupt(format!("catalog record {id}"));
    let (scope, rest) = take_part(v).ok_or_else(bad)?;
    let (name, body) = take_part(rest).ok_or_else(bad)?;
    Ok(CatalogRecord {
        kind,
        id: id.to_string(),
        scope,
        name,
        body: body.to_vec(),
    })
}

impl SledCatalog {
    pub(super) fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            records: db.open_tree("catalog")?,
            names: db.open_tree("catalog_names")?,
            db: db.clone(),
        })
    }

    fn put_now(&self, rec: &CatalogRecord, create: bool) -> Result<PutOutcome> {
        let key = record_key(rec.kind, &rec.id);
        (&self.records, &self.names)
            .transaction(
                |(records, names)| -> ConflictableTransactionResult<_, std::convert::Infallible> {
                    let old = records.get(&key)?;
                    let scope = match (&old, create) {
                        (Some(_), true) => return Ok(PutOutcome::IdTaken),
                        (None, false) => return Ok(PutOutcome::Missing),
                        (None, true) => rec.scope.clone(),
                        // The scope of an existing record never changes.
                        (Some(v), false) => match take_part(v) {
                            Some((scope, _)) => scope,
                            None => rec.scope.clone(),
                        },
                    };
                    let new_name = name_key(rec.kind, &scope, &rec.name);
                    if let Some(holder) = names.get(&new_name)?
                        && holder.as_ref() != rec.id.as_bytes()
                    {
                        return Ok(PutOutcome::NameTaken);
                    }
                    if let Some(v) = &old
                        && let Some((_, rest)) = take_part(v)
                        && let Some((old_name, _)) = take_part(rest)
                        && old_name != rec.name
                    {
                        names.remove(name_key(rec.kind, &scope, &old_name))?;
                    }
                    names.insert(new_name, rec.id.as_bytes())?;
                    let stored = CatalogRecord {
                        scope: scope.clone(),
                        ..rec.clone()
                    };
                    records.insert(key.as_slice(), encode(&stored))?;
                    Ok(PutOutcome::Stored)
                },
            )
            .map_err(tx_error)
    }

    fn get_now(&self, kind: CatalogKind, id: &str) -> Result<Option<CatalogRecord>> {
        self.records
            .get(record_key(kind, id))?
            .map(|v| decode(kind, id, &v))
            .transpose()
    }

    fn find_now(
        &self,
        kind: CatalogKind,
        scope: &str,
        name: &str,
    ) -> Result<Option<CatalogRecord>> {
        match self.names.get(name_key(kind, scope, name))? {
            None => Ok(None),
            Some(id) => self.get_now(kind, &String::from_utf8_lossy(&id)),
        }
    }

    fn list_now(
        &self,
        kind: CatalogKind,
        scope: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<CatalogRecord>> {
        let prefix = scope_prefix(kind, scope);
        let mut from = name_key(kind, scope, after);
        // Exclusive of `after` itself (the empty name starts at the beginning).
        if !after.is_empty() {
            from.push(0);
        }
        let mut out = Vec::new();
        for kv in self.names.range(from..) {
            let (k, id) = kv?;
            if !k.starts_with(&prefix) || out.len() == limit {
                break;
            }
            if let Some(rec) = self.get_now(kind, &String::from_utf8_lossy(&id))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn delete_now(&self, kind: CatalogKind, id: &str) -> Result<bool> {
        let key = record_key(kind, id);
        (&self.records, &self.names)
            .transaction(
                |(records, names)| -> ConflictableTransactionResult<_, std::convert::Infallible> {
                    let Some(v) = records.remove(key.as_slice())? else {
                        return Ok(false);
                    };
                    if let Some((scope, rest)) = take_part(&v)
                        && let Some((name, _)) = take_part(rest)
                    {
                        names.remove(name_key(kind, &scope, &name))?;
                    }
                    Ok(true)
                },
            )
            .map_err(tx_error)
    }
}

impl CatalogStore for SledCatalog {
    fn put(&self, rec: CatalogRecord, create: bool) -> BoxFuture<'_, PutOutcome> {
        Box::pin(async move {
            let outcome = self.put_now(&rec, create)?;
            if outcome == PutOutcome::Stored {
                self.db.flush_async().await?;
            }
            Ok(outcome)
        })
    }

    fn get(&self, kind: CatalogKind, id: String) -> BoxFuture<'_, Option<CatalogRecord>> {
        Box::pin(async move { self.get_now(kind, &id) })
    }

    fn find(
        &self,
        kind: CatalogKind,
        scope: String,
        name: String,
    ) -> BoxFuture<'_, Option<CatalogRecord>> {
        Box::pin(async move { self.find_now(kind, &scope, &name) })
    }

    fn list(
        &self,
        kind: CatalogKind,
        scope: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Vec<CatalogRecord>> {
        Box::pin(async move { self.list_now(kind, &scope, &after, limit) })
    }

    fn delete(&self, kind: CatalogKind, id: String) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let deleted = self.delete_now(kind, &id)?;
            if deleted {
                self.db.flush_async().await?;
            }
            Ok(deleted)
        })
    }
}
