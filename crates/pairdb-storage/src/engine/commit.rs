//! The write path's durability: queued single-key writes committed in groups ([`CommitQueue`]), the
//! explicit flush / fsync, and the poison signal a failed write or fsync sets for good.

use super::*;

/// Which keyspace a queued write goes to.
#[derive(Debug, Clone, Copy)]
pub(super) enum Space {
    Records,
    Hints,
    MintingActors,
    KeyIndex,
}

/// One single-key write waiting for a group commit.
#[derive(Debug)]
pub(super) enum WriteOp {
    Insert(Space, Vec<u8>, fjall::Slice),
    Remove(Space, Vec<u8>),
}

/// Longest a leader waits for writers that hold their stripe lock to join its group (`always` only).
pub(super) const MAX_GATHER: Duration = Duration::from_micros(250);

/// Group commit. A writer queues its write (or, with no write, a wait for what it wrote to the journal
/// earlier); if no leader is committing it becomes the leader, takes the whole queue and commits it as
/// one batch with one flush or fsync, then hands leadership to the first writer that queued meanwhile
/// and wakes each member of its group. Every waiter has its own condvar, so a commit wakes exactly the
/// writers it finished, not every thread in the queue.
///
/// While the leader fsyncs (fjall holds its journal lock for the fsync), the other writers do their
/// read-merge and queue up, so the next group takes all of them at once. With `gather`, a leader first
/// waits (at most [`MAX_GATHER`]) for writers that hold a stripe lock and are about to queue: without
/// that, groups alternate between nearly everyone and the few writers the last commit released.
#[derive(Debug)]
pub(super) struct CommitQueue {
    state: Mutex<QueueState>,
    /// The engine's poison signal: once set, every commit fails with its cause (never retried).
    poison: Arc<PoisonSignal>,
    /// Signalled when the last preparing writer queued (or gave up) while a leader waits for it.
    gathered: Condvar,
    /// Writers holding their stripe lock that will queue a write soon (`gather` only).
    preparing: AtomicUsize,
    gather: bool,
}

#[derive(Debug, Default)]
pub(super) struct QueueState {
    queue: Vec<(Vec<WriteOp>, Arc<Waiter>)>,
    /// A leader is committing (or gathering); new writers queue behind it.
    leading: bool,
    leader_gathering: bool,
}

#[derive(Debug, Default)]
pub(super) struct Waiter {
    state: Mutex<WaiterState>,
    woken: Condvar,
}

#[derive(Debug, Default)]
pub(super) enum WaiterState {
    #[default]
    Waiting,
    /// The previous leader handed over: commit the queue.
    Lead,
    Done(Result<(), PoisonCause>),
}

impl Waiter {
    fn wake(&self, state: WaiterState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
        self.woken.notify_one();
    }

    fn wait(&self) -> WaiterState {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while matches!(*state, WaiterState::Waiting) {
            state = self.woken.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        std::mem::take(&mut *state)
    }
}

/// A writer between taking its stripe lock and queueing its write; counted only with `gather`.
/// Dropping it without queueing (an error, or nothing to write) releases a gathering leader.
#[derive(Debug)]
pub(super) struct Preparing<'a> {
    queue: Option<&'a CommitQueue>,
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            let state = queue.lock();
            queue.done_preparing(&state);
        }
    }
}

impl CommitQueue {
    pub(super) fn new(gather: bool, poison: Arc<PoisonSignal>) -> Self {
        Self {
            state: Mutex::default(),
            poison,
            gathered: Condvar::new(),
            preparing: AtomicUsize::new(0),
            gather,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Call right after taking the stripe lock of a key about to be written.
    pub(super) fn preparing(&self) -> Preparing<'_> {
        if !self.gather {
            return Preparing { queue: None };
        }
        self.preparing.fetch_add(1, Ordering::AcqRel);
        Preparing { queue: Some(self) }
    }

    /// Called with the state lock held, so a gathering leader cannot miss the wake-up.
    fn done_preparing(&self, state: &QueueState) {
        if self.preparing.fetch_sub(1, Ordering::AcqRel) == 1 && state.leader_gathering {
            self.gathered.notify_one();
        }
    }

    /// Queues `ops` (written in one batch; none: a wait for earlier journal writes) and returns once a
    /// group commit covering them succeeded or failed. `commit` is the leader's work for one group.
    fn submit(
        &self,
        ops: Vec<WriteOp>,
        preparing: Option<Preparing<'_>>,
        commit: impl FnOnce(Vec<WriteOp>) -> Result<(), PoisonCause>,
    ) -> Result<(), PoisonCause> {
        let me = Arc::new(Waiter::default());
        let mut state = self.lock();
        // Queued now: no longer preparing (taken out of the guard so its drop does not count again).
        if preparing.and_then(|mut preparing| preparing.queue.take()).is_some() {
            self.done_preparing(&state);
        }
        if let Some(cause) = self.poison.get() {
            return Err(cause.clone());
        }
        state.queue.push((ops, me.clone()));
        if state.leading {
            drop(state);
            match me.wait() {
                WaiterState::Done(result) => return result,
                WaiterState::Lead | WaiterState::Waiting => state = self.lock(),
            }
        } else {
            state.leading = true;
        }
        self.lead(state, &me, commit)
    }

    fn lead(
        &self,
        mut state: MutexGuard<'_, QueueState>,
        me: &Arc<Waiter>,
        commit: impl FnOnce(Vec<WriteOp>) -> Result<(), PoisonCause>,
    ) -> Result<(), PoisonCause> {
        if self.gather {
            let deadline = Instant::now() + MAX_GATHER;
            while self.preparing.load(Ordering::Acquire) > 0 && !self.poison.is_set() {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                state.leader_gathering = true;
                state = self.gathered.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
            }
            state.leader_gathering = false;
        }
        let group = std::mem::take(&mut state.queue);
        let failed = self.poison.get().cloned();
        drop(state);

        let mut ops = Vec::with_capacity(group.len());
        let mut waiters = Vec::with_capacity(group.len());
        for (writer_ops, waiter) in group {
            ops.extend(writer_ops);
            waiters.push(waiter);
        }
        let result = match failed {
            Some(cause) => Err(cause),
            None => commit(ops),
        };
        debug_assert!(result.is_ok() || self.poison.is_set(), "a failed commit poisons the write path");

        let mut state = self.lock();
        let next = state.queue.first().map(|(_, waiter)| waiter.clone());
        state.leading = next.is_some();
        drop(state);
        // Hand over first, so the next group's commit starts while this one's writers wake up.
        if let Some(next) = next {
            next.wake(WaiterState::Lead);
        }
        for waiter in waiters {
            if !Arc::ptr_eq(&waiter, me) {
                waiter.wake(WaiterState::Done(result.clone()));
            }
        }
        result
    }
}

impl Engine {
    /// Runs one engine write; an error poisons the write path.
    pub(super) fn write(&self, op: impl FnOnce() -> fjall::Result<()>) -> Result<(), EngineError> {
        op().map_err(|error| {
            EngineError::Poisoned(self.poison.set(PoisonCause::new(PoisonedBy::EngineWrite, &error)))
        })
    }

    /// Writes `ops` as one batch straight to the journal (atomic across a crash, not yet durable):
    /// the caller calls `make_durable` once after a run of these.
    pub(super) fn write_unsynced(&self, ops: Vec<WriteOp>) -> Result<(), EngineError> {
        let mut batch = self.db.batch().durability(None);
        for op in ops {
            match op {
                WriteOp::Insert(space, key, value) => batch.insert(self.keyspace(space), key, value),
                WriteOp::Remove(space, key) => batch.remove(self.keyspace(space), key),
            }
        }
        self.write(|| batch.commit())
    }

    pub(super) fn persist_mode(&self) -> PersistMode {
        match self.sync {
            SyncMode::Periodic { .. } => PersistMode::Buffer,
            SyncMode::Always => PersistMode::SyncData,
        }
    }

    /// Commits one key's writes (applied atomically, in one batch) through the group commit; the caller
    /// holds the key's stripe lock.
    pub(super) fn commit_write(
        &self,
        ops: Vec<WriteOp>,
        preparing: Preparing<'_>,
    ) -> Result<(), EngineError> {
        self.commit.submit(ops, Some(preparing), |ops| self.commit_group(ops)).map_err(EngineError::Poisoned)
    }

    /// Commits the writes of many keys through the group commit; the caller (a batch) holds every
    /// one of their stripe locks.
    pub(super) fn commit_writes(&self, ops: Vec<WriteOp>) -> Result<(), EngineError> {
        self.commit.submit(ops, None, |ops| self.commit_group(ops)).map_err(EngineError::Poisoned)
    }

    /// Waits until everything this thread wrote straight to the journal reached the OS (`periodic`)
    /// or the disk (`always`): one group commit covers it, since the journal is sequential.
    pub(super) fn make_durable(&self) -> Result<(), EngineError> {
        self.commit.submit(Vec::new(), None, |ops| self.commit_group(ops)).map_err(EngineError::Poisoned)
    }

    /// The leader's work: one fjall batch holding every queued write, flushed (`periodic`) or fsynced
    /// (`always`) before fjall applies it to the memtables; just a flush / fsync when the group only
    /// waits for earlier writes. An error poisons the write path.
    pub(super) fn commit_group(&self, ops: Vec<WriteOp>) -> Result<(), PoisonCause> {
        let mode = self.persist_mode();
        // Poisoned meanwhile (say by the periodic fsync): fjall may not know, so nothing more is written.
        if let Some(cause) = self.poison.get() {
            return Err(cause.clone());
        }
        let group_size = ops.len();
        let started = Instant::now();
        let result = if let Some(error) = self.injected_fault() {
            Err(error)
        } else if ops.is_empty() {
            self.db.persist(mode)
        } else {
            let mut batch = self.db.batch().durability(Some(mode));
            for op in ops {
                match op {
                    WriteOp::Insert(space, key, value) => batch.insert(self.keyspace(space), key, value),
                    WriteOp::Remove(space, key) => batch.remove(self.keyspace(space), key),
                }
            }
            batch.commit()
        };
        // One journal flush (`periodic`) or fsync (`always`) per group: its latency and the group size
        // show whether group commit is working.
        let mode_label = if matches!(mode, PersistMode::Buffer) { "buffer" } else { "fsync" };
        metrics::histogram!("pairdb_storage_commit_duration_seconds", "mode" => mode_label)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("pairdb_storage_commit_group_writes").record(group_size as f64);
        result.map_err(|error| {
            let by = if matches!(mode, PersistMode::Buffer) {
                PoisonedBy::JournalFlush
            } else {
                PoisonedBy::JournalFsync
            };
            self.poison.set(PoisonCause::new(by, &error))
        })
    }

    pub(super) fn keyspace(&self, space: Space) -> &Keyspace {
        match space {
            Space::Records => &self.records,
            Space::Hints => &self.hints,
            Space::MintingActors => &self.minting,
            Space::KeyIndex => &self.key_index,
        }
    }

    /// fsyncs everything written so far (periodic fsync, shutdown, tests). Once the write path is
    /// poisoned it fails without trying: a failed fsync is not retried.
    pub fn sync_now(&self) -> Result<(), EngineError> {
        if let Some(cause) = self.poison.get() {
            return Err(EngineError::Poisoned(cause.clone()));
        }
        let started = Instant::now();
        let synced = self.persist(PersistMode::SyncData);
        metrics::histogram!("pairdb_storage_fsync_duration_seconds").record(started.elapsed().as_secs_f64());
        synced.map_err(|error| {
            EngineError::Poisoned(self.poison.set(PoisonCause::new(PoisonedBy::Fsync, &error)))
        })
    }

    /// Makes the next journal persist (a group's flush or fsync, or [`Engine::sync_now`]) fail with an
    /// I/O error, as a failing disk would, without touching the journal: the group is not applied and
    /// the write path poisons itself exactly as on a real failure. For fault-injection tests only.
    #[doc(hidden)]
    pub fn inject_persist_failure_for_tests(&self) {
        self.persist_fault.store(true, Ordering::Release);
    }

    /// Consumes an injected fault, if one is armed.
    pub(super) fn injected_fault(&self) -> Option<fjall::Error> {
        self.persist_fault
            .swap(false, Ordering::AcqRel)
            .then(|| fjall::Error::Io(std::io::Error::other("injected fault: journal persist returned EIO")))
    }

    pub(super) fn persist(&self, mode: PersistMode) -> fjall::Result<()> {
        match self.injected_fault() {
            Some(error) => Err(error),
            None => self.db.persist(mode),
        }
    }
}
