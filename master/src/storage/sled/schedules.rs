//! [`ScheduleStore`] on sled.
//!
//! Trees:
//! - `schedules`: schedule id -> body
//! - `fires`: schedule id (length-prefixed) + tick (ordered i64 ms) -> execution id: a fire is
//!   claimed once, in the transaction that stores its execution
//! - `executions`: execution id -> schedule id (length-prefixed) + at_ms (ordered) + body
//! - `executions_by_time`: at_ms (ordered) + execution id -> () (the listing's index)
use super::{i64_from_ordered, ordered_i64, push_part, take_part, tx_error};
use crate::error::{MasterError, Result};
use crate::storage::{BoxFuture, ExecutionRecord, ScheduleStore};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionResult, TransactionalTree};
use std::convert::Infallible;
use std::ops::Range;

/// The scheduler's trees of one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SledSchedules {
    db: sled::Db,
    schedules: sled::Tree,
    fires: sled::Tree,
    executions: sled::Tree,
    by_time: sled::Tree,
}

fn time_key(at_ms: i64, id: &str) -> Vec<u8> {
    let mut k = ordered_i64(at_ms).to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn encode(e: &ExecutionRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + e.schedule_id.len() + e.body.len());
    push_part(&mut v, &e.schedule_id);
    v.extend_from_slice(&ordered_i64(e.at_ms));
    v.extend_from_slice(&e.body);
    v
}

fn decode(id: &str, v: &[u8]) -> Result<ExecutionRecord> {
    let bad = || MasterError::Corrupt(format!("execution record {id}"));
    let (schedule_id, rest) = take_part(v).ok_or_else(bad)?;
    let at_ms = i64_from_ordered(rest).ok_or_else(bad)?;
    Ok(ExecutionRecord {
        id: id.to_string(),
        schedule_id,
        at_ms,
        body: rest[8..].to_vec(),
    })
}

/// Writes an execution and moves its index entry if its time changed.
fn write_execution(
    executions: &TransactionalTree,
    by_time: &TransactionalTree,
    e: &ExecutionRecord,
) -> ConflictableTransactionResult<(), Infallible> {
    if let Some(old) = executions.insert(e.id.as_bytes(), encode(e))?
        && let Ok(old) = decode(&e.id, &old)
        && old.at_ms != e.at_ms
    {
        by_time.remove(time_key(old.at_ms, &e.id))?;
    }
    by_time.insert(time_key(e.at_ms, &e.id), &[][..])?;
    Ok(())
}

impl SledSchedules {
    pub(super) fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            schedules: db.open_tree("schedules")?,
            fires: db.open_tree("fires")?,
            executions: db.open_tree("executions")?,
            by_time: db.open_tree("executions_by_time")?,
            db: db.clone(),
        })
    }

    fn claim_now(&self, schedule: &str, tick_ms: i64, e: &ExecutionRecord) -> Result<bool> {
        let mut fire = Vec::new();
        push_part(&mut fire, schedule);
        fire.extend_from_slice(&ordered_i64(tick_ms));
        (&self.fires, &self.executions, &self.by_time)
            .transaction(|(fires, executions, by_time)| {
                if fires.get(&fire)?.is_some() {
                    return Ok(false);
                }
                fires.insert(fire.as_slice(), e.id.as_bytes())?;
                write_execution(executions, by_time, e)?;
                Ok(true)
            })
            .map_err(tx_error)
    }

    fn put_execution_now(&self, e: &ExecutionRecord) -> Result<()> {
        (&self.executions, &self.by_time)
            .transaction(|(executions, by_time)| write_execution(executions, by_time, e))
            .map_err(tx_error)
    }

    fn get_execution_now(&self, id: &str) -> Result<Option<ExecutionRecord>> {
        self.executions
            .get(id.as_bytes())?
            .map(|v| decode(id, &v))
            .transpose()
    }

    fn list_executions_now(
        &self,
        range: Range<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<ExecutionRecord>> {
        let mut from = time_key(range.start, "");
        if let Some((at, id)) = after
            && at >= range.start
        {
            from = time_key(at, &id);
            from.push(0);
        }
        let end = time_key(range.end, "");
        let mut out = Vec::new();
        if from >= end {
            return Ok(out);
        }
        for kv in self.by_time.range(from..end) {
            if out.len() == limit {
                break;
            }
            let (k, _) = kv?;
            let id = String::from_utf8_lossy(&k[8..]).into_owned();
            if let Some(e) = self.get_execution_now(&id)? {
                out.push(e);
            }
        }
        Ok(out)
    }
}

impl ScheduleStore for SledSchedules {
    fn put_schedule(&self, id: String, body: Vec<u8>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.schedules.insert(id.as_bytes(), body)?;
            self.db.flush_async().await?;
            Ok(())
        })
    }

    fn get_schedule(&self, id: String) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move { Ok(self.schedules.get(id.as_bytes())?.map(|v| v.to_vec())) })
    }

    fn list_schedules(&self) -> BoxFuture<'_, Vec<(String, Vec<u8>)>> {
        Box::pin(async move {
            self.schedules
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                })
                .collect()
        })
    }

    fn delete_schedule(&self, id: String) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let deleted = self.schedules.remove(id.as_bytes())?.is_some();
            if deleted {
                self.db.flush_async().await?;
            }
            Ok(deleted)
        })
    }

    fn claim_fire(
        &self,
        schedule: String,
        tick_ms: i64,
        execution: ExecutionRecord,
    ) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let claimed = self.claim_now(&schedule, tick_ms, &execution)?;
            if claimed {
                self.db.flush_async().await?;
            }
            Ok(claimed)
        })
    }

    fn put_execution(&self, execution: ExecutionRecord) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.put_execution_now(&execution)?;
            self.db.flush_async().await?;
            Ok(())
        })
    }

    fn get_execution(&self, id: String) -> BoxFuture<'_, Option<ExecutionRecord>> {
        Box::pin(async move { self.get_execution_now(&id) })
    }

    fn list_executions(
        &self,
        range: Range<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<ExecutionRecord>> {
        Box::pin(async move { self.list_executions_now(range, after, limit) })
    }
}
