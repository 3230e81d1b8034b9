//! sled-backed Raft storage: the log and vote (`LogStore`) and the state machine with its
//! snapshots (`StateMachineStore`).
//!
//! Durability: `append` and `save_vote` fsync (sled `flush_async`) before openraft is told
//! the write is durable. The application state itself is kept in memory and rebuilt on start
//! from the last snapshot (stored in sled) plus the committed log that follows it.

use crate::{App, NodeId, Proposal, Request, Response, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

type SErr = StorageError<NodeId>;

fn io_read(e: impl std::error::Error + 'static) -> SErr {
    StorageError::IO {
        source: StorageIOError::read(AnyError::new(&e)),
    }
}
fn io_write(e: impl std::error::Error + 'static) -> SErr {
    StorageError::IO {
        source: StorageIOError::write(AnyError::new(&e)),
    }
}
fn io_write_logs(e: impl std::error::Error + 'static) -> SErr {
    StorageError::IO {
        source: StorageIOError::write_logs(AnyError::new(&e)),
    }
}

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
/// How often (in log entries) the committed index is written to sled.
const COMMITTED_EVERY: u64 = 1024;

/// Opens (or creates) the sled database in `dir`.
pub fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir.join("raft.sled"))
        .cache_capacity(32 * 1024 * 1024)
        .mode(sled::Mode::HighThroughput)
        .open()
}

/// Counters that the API reads without going through openraft.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Last committed log index persisted by openraft (0 when unknown).
    pub committed: AtomicU64,
}

/// The Raft log and vote, in sled trees `log` and `meta`.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    stats: Arc<StoreStats>,
    /// sled's data file, for a real `fdatasync` after sled's own flush (which only uses
    /// `sync_file_range`, and so does not flush the device cache or file metadata).
    data_file: Option<Arc<std::fs::File>>,
    /// Group commit: appends queue their callbacks here; one flush completes them all.
    flusher: tokio::sync::mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

/// The group-commit loop: waits for queued appends, makes everything written so far durable
/// with one flush, then completes every callback that was queued before the flush began.
async fn flush_loop(
    db: sled::Db,
    data_file: Option<Arc<std::fs::File>>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(cb) = rx.try_recv() {
            batch.push(cb);
        }
        let res = durable_flush(&db, &data_file).await;
        for cb in batch {
            cb.log_io_completed(match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            });
        }
    }
}

/// Makes everything sled has written durable: sled's flush, then `fdatasync` of its file.
/// Runs on the blocking pool: sled's flush does its IO on the calling thread.
async fn durable_flush(
    db: &sled::Db,
    data_file: &Option<Arc<std::fs::File>>,
) -> std::io::Result<()> {
    let (db, f) = (db.clone(), data_file.clone());
    tokio::task::spawn_blocking(move || {
        db.flush().map_err(std::io::Error::other)?;
        match f {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

impl LogStore {
    /// `dir` is the data dir given to [`open_db`]; its sled data file is fsynced on flush.
    pub fn open(
        db: &sled::Db,
        dir: Option<&Path>,
        stats: Arc<StoreStats>,
    ) -> Result<Self, sled::Error> {
        let data_file = match dir {
            Some(d) => Some(Arc::new(std::fs::File::open(
                d.join("raft.sled").join("db"),
            )?)),
            None => None,
        };
        let (flusher, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(flush_loop(db.clone(), data_file.clone(), rx));
        Ok(Self {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            stats,
            data_file,
            flusher,
        })
    }

    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
        match self.meta.get(key).map_err(io_read)? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(io_read),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), SErr> {
        let bytes = bincode::serialize(value).map_err(io_write)?;
        self.meta.insert(key, bytes).map_err(io_write)?;
        durable_flush(&self.db, &self.data_file)
            .await
            .map_err(io_write)?;
        Ok(())
    }
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self
            .log
            .range::<[u8; 8], _>((Bound::Included(index_key(start)), end))
        {
            let (_, v) = kv.map_err(io_read)?;
            out.push(bincode::deserialize(&v).map_err(io_read)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(KEY_PURGED)?;
        let last = match self.log.last().map_err(io_read)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = bincode::deserialize(&v).map_err(io_read)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Persisted only every COMMITTED_EVERY entries and not flushed on its own: it is an
        // optimisation (re-applying the committed log at start without waiting for a leader),
        // and rewriting a sled key on every commit costs more disk traffic than the log.
        let index = committed.map(|l| l.index).unwrap_or(0);
        let prev = self.stats.committed.swap(index, Ordering::Relaxed);
        if index / COMMITTED_EVERY != prev / COMMITTED_EVERY {
            let bytes = bincode::serialize(&committed).map_err(io_write)?;
            self.meta.insert(KEY_COMMITTED, bytes).map_err(io_write)?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        let c: Option<Option<LogId<NodeId>>> = self.get_meta(KEY_COMMITTED)?;
        let c = c.flatten();
        self.stats
            .committed
            .store(c.map(|l| l.index).unwrap_or(0), Ordering::Relaxed);
        Ok(c)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let bytes = bincode::serialize(&e).map_err(io_write_logs)?;
            batch.insert(&index_key(e.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(io_write_logs)?;
        // Return at once so openraft keeps working; it treats the entries as durable only when
        // the callback fires, after a flush that began after this insert (group commit).
        if let Err(e) = self.flusher.send(callback) {
            e.0.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let keys: Vec<_> = self
            .log
            .range(index_key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io_write_logs)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(io_write_logs)?;
        durable_flush(&self.db, &self.data_file)
            .await
            .map_err(io_write_logs)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // Record the purge point first: a crash in between leaves extra entries, never a gap.
        self.put_meta(KEY_PURGED, &log_id).await?;
        let keys: Vec<_> = self
            .log
            .range(..=index_key(log_id.index))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io_write_logs)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(io_write_logs)?;
        Ok(())
    }
}

/// What a snapshot holds besides the application bytes.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, crate::MasterNode>,
    data: Vec<u8>,
}

/// The bytes inside a snapshot: the application state and the request-dedup table.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    app: Vec<u8>,
    dedup: Vec<([u64; 2], Vec<u8>)>,
}

/// How many recent request ids the state machine remembers for idempotent retries.
const DEDUP_CAPACITY: usize = 50_000;

/// Recent request ids and their responses, oldest first.
#[derive(Default, Clone)]
struct Dedup {
    map: std::collections::HashMap<[u64; 2], Vec<u8>>,
    order: std::collections::VecDeque<[u64; 2]>,
}

impl Dedup {
    fn insert(&mut self, id: [u64; 2], resp: Vec<u8>) {
        if self.map.insert(id, resp).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > DEDUP_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
    fn to_vec(&self) -> Vec<([u64; 2], Vec<u8>)> {
        self.order
            .iter()
            .filter_map(|id| self.map.get(id).map(|r| (*id, r.clone())))
            .collect()
    }
    fn from_vec(v: Vec<([u64; 2], Vec<u8>)>) -> Self {
        let mut d = Dedup::default();
        for (id, r) in v {
            d.insert(id, r);
        }
        d
    }
}

/// Metadata of the state machine that openraft needs.
#[derive(Default, Clone)]
struct SmMeta {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, crate::MasterNode>,
    dedup: Dedup,
}

fn restore_payload<A: App>(app: &mut A, data: &[u8]) -> Result<Dedup, String> {
    let p: SnapshotPayload =
        bincode::deserialize(data).map_err(|e| format!("bad snapshot: {e}"))?;
    app.restore(&p.app)?;
    Ok(Dedup::from_vec(p.dedup))
}

/// The state machine: the application behind a lock that readers share, plus the last
/// snapshot persisted in sled tree `snapshot`.
pub struct StateMachineStore<A: App> {
    app: Arc<RwLock<A>>,
    meta: Arc<RwLock<SmMeta>>,
    snap_tree: sled::Tree,
    db: sled::Db,
    applied_tx: Arc<watch::Sender<u64>>,
    snapshot_seq: Arc<AtomicU64>,
    data_file: Option<Arc<std::fs::File>>,
}

impl<A: App> Clone for StateMachineStore<A> {
    fn clone(&self) -> Self {
        Self {
            app: self.app.clone(),
            meta: self.meta.clone(),
            snap_tree: self.snap_tree.clone(),
            db: self.db.clone(),
            applied_tx: self.applied_tx.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
            data_file: self.data_file.clone(),
        }
    }
}

impl<A: App> StateMachineStore<A> {
    /// Opens the state machine: restores the last persisted snapshot into `app`, if any.
    pub fn open(db: &sled::Db, dir: Option<&Path>, app: Arc<RwLock<A>>) -> Result<Self, String> {
        let data_file = match dir {
            Some(d) => Some(Arc::new(
                std::fs::File::open(d.join("raft.sled").join("db")).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let snap_tree = db.open_tree("snapshot").map_err(|e| e.to_string())?;
        let mut meta = SmMeta::default();
        if let Some(v) = snap_tree.get(KEY_SNAPSHOT).map_err(|e| e.to_string())? {
            let s: StoredSnapshot = bincode::deserialize(&v).map_err(|e| e.to_string())?;
            meta.dedup = restore_payload(&mut *app.write().expect("state lock"), &s.data)?;
            meta.last_applied = s.meta.last_log_id;
            meta.membership = s.meta.last_membership.clone();
        }
        let applied = meta.last_applied.map(|l| l.index).unwrap_or(0);
        Ok(Self {
            app,
            meta: Arc::new(RwLock::new(meta)),
            snap_tree,
            db: db.clone(),
            applied_tx: Arc::new(watch::channel(applied).0),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            data_file,
        })
    }

    /// A receiver that sees the last applied log index.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn current(&self) -> Result<Option<StoredSnapshot>, SErr> {
        match self.snap_tree.get(KEY_SNAPSHOT).map_err(io_read)? {
            None => Ok(None),
            Some(v) => Ok(Some(bincode::deserialize(&v).map_err(io_read)?)),
        }
    }

    async fn persist(&self, s: &StoredSnapshot) -> Result<(), SErr> {
        let bytes = bincode::serialize(s).map_err(io_write)?;
        self.snap_tree
            .insert(KEY_SNAPSHOT, bytes)
            .map_err(io_write)?;
        durable_flush(&self.db, &self.data_file)
            .await
            .map_err(io_write)?;
        Ok(())
    }
}

impl<A: App> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<A> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        // Hold the app read lock while copying meta, so data and meta match.
        let (data, meta) = {
            let app = self.app.read().expect("state lock");
            let meta = self.meta.read().expect("meta lock").clone();
            let payload = SnapshotPayload {
                app: app.snapshot(),
                dedup: meta.dedup.to_vec(),
            };
            (bincode::serialize(&payload).map_err(io_write)?, meta)
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match meta.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, seq),
            None => format!("none-{seq}"),
        };
        let smeta = SnapshotMeta {
            last_log_id: meta.last_applied,
            last_membership: meta.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: smeta.clone(),
            data,
        };
        self.persist(&stored).await?;
        Ok(Snapshot {
            meta: smeta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl<A: App> RaftStateMachine<TypeConfig> for StateMachineStore<A> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, crate::MasterNode>,
        ),
        SErr,
    > {
        let m = self.meta.read().expect("meta lock");
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut last = 0;
        {
            let mut app = self.app.write().expect("state lock");
            let mut meta = self.meta.write().expect("meta lock");
            for e in entries {
                meta.last_applied = Some(e.log_id);
                last = e.log_id.index;
                match e.payload {
                    EntryPayload::Blank => out.push(Response(Vec::new())),
                    EntryPayload::Normal(Request { batch }) => {
                        let mut results = Vec::with_capacity(batch.len());
                        for Proposal { id, data } in batch {
                            let r = match meta.dedup.map.get(&id) {
                                Some(r) => r.clone(),
                                None => {
                                    let r = app.apply(e.log_id.index, &data);
                                    meta.dedup.insert(id, r.clone());
                                    r
                                }
                            };
                            results.push(r);
                        }
                        out.push(Response(results))
                    }
                    EntryPayload::Membership(m) => {
                        meta.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(Response(Vec::new()))
                    }
                }
            }
        }
        if last > 0 {
            self.applied_tx.send_replace(last);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, crate::MasterNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        {
            let mut app = self.app.write().expect("state lock");
            let dedup = restore_payload(&mut *app, &data)
                .map_err(|e| io_write(std::io::Error::other(e)))?;
            let mut m = self.meta.write().expect("meta lock");
            m.dedup = dedup;
            m.last_applied = meta.last_log_id;
            m.membership = meta.last_membership.clone();
        }
        self.persist(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        self.applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(self.current()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    //! openraft's storage conformance suite against the sled store.
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    /// A tiny app for the suite: counts applied commands.
    #[derive(Default)]
    struct Counter(u64);
    impl App for Counter {
        fn apply(&mut self, _index: u64, _command: &[u8]) -> Vec<u8> {
            self.0 += 1;
            self.0.to_be_bytes().to_vec()
        }
        fn snapshot(&self) -> Vec<u8> {
            self.0.to_be_bytes().to_vec()
        }
        fn restore(&mut self, data: &[u8]) -> Result<(), String> {
            let b: [u8; 8] = data.try_into().map_err(|_| "bad snapshot".to_string())?;
            self.0 = u64::from_be_bytes(b);
            Ok(())
        }
    }

    struct Builder;
    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<Counter>, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore<Counter>), SErr> {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = open_db(dir.path()).map_err(io_write)?;
            let log = LogStore::open(&db, Some(dir.path()), Arc::default()).map_err(io_write)?;
            let sm = StateMachineStore::open(
                &db,
                Some(dir.path()),
                Arc::new(RwLock::new(Counter::default())),
            )
            .map_err(|e| io_write(std::io::Error::other(e)))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn sled_store_passes_openraft_suite() {
        Suite::test_all(Builder).expect("storage suite");
    }

    #[tokio::test]
    async fn snapshot_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path()).unwrap();
            let mut sm = StateMachineStore::open(
                &db,
                Some(dir.path()),
                Arc::new(RwLock::new(Counter::default())),
            )
            .unwrap();
            let p = |id: u64| Proposal {
                id: [id, 0],
                data: vec![1],
            };
            let e = |i, batch| Entry::<TypeConfig> {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
                payload: EntryPayload::Normal(Request { batch }),
            };
            let r = sm
                .apply(vec![
                    e(1, vec![p(1)]),
                    e(2, vec![p(2), p(3)]),
                    e(3, vec![p(3)]),
                ])
                .await
                .unwrap();
            // The repeated request id is answered from the dedup table, not applied again.
            assert_eq!(r[1].0[1], 3u64.to_be_bytes().to_vec());
            assert_eq!(r[2].0[0], r[1].0[1]);
            sm.build_snapshot().await.unwrap();
        }
        let db = open_db(dir.path()).unwrap();
        let app = Arc::new(RwLock::new(Counter::default()));
        let mut sm = StateMachineStore::open(&db, Some(dir.path()), app.clone()).unwrap();
        assert_eq!(app.read().unwrap().0, 3, "three distinct proposals applied");
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
    }
}
