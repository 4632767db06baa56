//! [`AuditStore`] on sled.
//!
//! Trees:
//! - `audit`: sequence (BE u64) -> at_ms (ordered i64) + body
//! - `audit_by_time`: at_ms (ordered) + sequence (BE u64) -> () (the listing's index)
//!
//! Sequence numbers come from sled's `generate_id` (ascending, never reused after a restart).
use super::{i64_from_ordered, ordered_i64, tx_error};
use crate::error::{MasterError, Result};
use crate::storage::{AuditRecord, AuditStore, BoxFuture};
use sled::Transactional;
use sled::transaction::ConflictableTransactionResult;
use std::ops::Range;

/// The audit log's trees of one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SledAudit {
    db: sled::Db,
    events: sled::Tree,
    by_time: sled::Tree,
}

fn time_key(at_ms: i64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ordered_i64(at_ms));
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl SledAudit {
    pub(super) fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            events: db.open_tree("audit")?,
            by_time: db.open_tree("audit_by_time")?,
            db: db.clone(),
        })
    }

    fn append_now(&self, at_ms: i64, body: &[u8]) -> Result<u64> {
        // Sequence 0 means "not stored" in `AuditRecord`.
        let seq = self.db.generate_id()? + 1;
        let mut value = ordered_i64(at_ms).to_vec();
        value.extend_from_slice(body);
        (&self.events, &self.by_time)
            .transaction(
                |(events, by_time)| -> ConflictableTransactionResult<_, std::convert::Infallible> {
                    events.insert(&seq.to_be_bytes(), value.as_slice())?;
                    by_time.insert(&time_key(at_ms, seq), &[][..])?;
                    Ok(())
                },
            )
            .map_err(tx_error)?;
        Ok(seq)
    }

    fn list_now(
        &self,
        range: Range<i64>,
        after: Option<(i64, u64)>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>> {
        let mut from = time_key(range.start, 0).to_vec();
        if let Some((at, seq)) = after
            && at >= range.start
        {
            from = time_key(at, seq).to_vec();
            from.push(0);
        }
        let end = time_key(range.end, 0).to_vec();
        let mut out = Vec::new();
        if from >= end {
            return Ok(out);
        }
        for kv in self.by_time.range(from..end) {
            if out.len() == limit {
                break;
            }
            let (k, _) = kv?;
            let seq = u64::from_be_bytes(k[8..16].try_into().map_err(|_| bad(0))?);
            let Some(v) = self.events.get(seq.to_be_bytes())? else {
                return Err(bad(seq));
            };
            out.push(AuditRecord {
                seq,
                at_ms: i64_from_ordered(&v).ok_or_else(|| bad(seq))?,
                body: v[8..].to_vec(),
            });
        }
        Ok(out)
    }
}

fn bad(seq: u64) -> MasterError {
    MasterError::Corrupt(format!("audit event {seq}"))
}

impl AuditStore for SledAudit {
    fn append(&self, at_ms: i64, body: Vec<u8>) -> BoxFuture<'_, u64> {
        Box::pin(async move {
            let seq = self.append_now(at_ms, &body)?;
            self.db.flush_async().await?;
            Ok(seq)
        })
    }

    fn list(
        &self,
        range: Range<i64>,
        after: Option<(i64, u64)>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<AuditRecord>> {
        Box::pin(async move { self.list_now(range, after, limit) })
    }
}
