//! `text2img worker`: takes jobs from the streams one at a time, runs each on this process's
//! model through the same code the in-process server runs, stores the answer once and
//! acknowledges the entry.
//!
//! Delivery is at least once. A running job's entry is re-claimed by its worker every
//! heartbeat, so it never looks idle; an entry idle past `claim_idle` (its worker died) is
//! claimed by whichever worker looks next (`XAUTOCLAIM`). The answer is written with
//! `SET NX`, so a job run twice still has one answer (the same one: its seed was pinned
//! when it was queued). A job that fails, or whose worker dies, is tried again until its
//! entry has been delivered `max_deliveries` times; then it goes to the dead-letter stream
//! and its client gets the last error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult};
use serde_json::{json, Value};

use super::client::{ensure_group, RESULT_TTL};
use super::connection::{self, Backoff};
use super::inventory;
use super::job::{now_ms, QueuedJob, StoredResult};
use super::{keys, GROUP};
use crate::error::{Error, Result};
use crate::serve::api_error::ApiError;
use crate::serve::fields::Fields;
use crate::serve::models::Models;
use crate::serve::shutdown::{exit_on_second_signal, Signals};
use crate::serve::{AppState, Local, ServeOptions};

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The consumer name: unique among the workers (host and process id by default).
    pub name: String,
    /// An entry idle this long belongs to a worker that stopped: another claims it.
    pub claim_idle: Duration,
    /// Deliveries after which a job goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// How long a running job may go on after SIGTERM before it is handed back.
    pub shutdown_grace: Duration,
}

/// How long an idle worker's read waits for a job before it looks for stale entries again.
const BLOCK: Duration = Duration::from_secs(2);
/// How often a running job's cancel key is read and its progress written.
const TICK: Duration = Duration::from_millis(200);
/// The consumer that entries handed back go to, marked long idle so that the next worker
/// to look claims them at once.
const RELEASED: &str = "text2img-released";
const RELEASED_IDLE_MS: u64 = 24 * 3600 * 1000;
/// How long a progress entry outlives its last update.
const PROGRESS_TTL: Duration = Duration::from_secs(600);

/// Claims the entry again for its own consumer (resetting its idle time), but only while
/// that consumer still holds it: a worker that was paused past `claim_idle` must not take
/// its job back from the worker that took it over.
const HEARTBEAT_SCRIPT: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] and p[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  return 1
end
return 0
";

/// Hands an entry back (to the `RELEASED` consumer, long idle, with the given delivery
/// count), but only while this worker still holds it: one that lost it to another worker
/// must not take it from the worker now running it.
const HAND_BACK_SCRIPT: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] and p[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, ARGV[3], 'IDLE', ARGV[5], 'RETRYCOUNT', ARGV[6], 'JUSTID')
  return 1
end
return 0
";

/// An entry this worker took.
struct Taken {
    stream: String,
    entry: String,
    fields: HashMap<String, redis::Value>,
    deliveries: u64,
    /// When this worker took it (ms since the epoch).
    taken_ms: u64,
}

impl Taken {
    /// When the entry was added: the first part of its id (`XADD *` ids are times in ms).
    fn queued_ms(&self) -> Option<u64> {
        self.entry.split('-').next()?.parse().ok()
    }
}

/// How a run ended.
enum Outcome {
    /// An answer for the client (200, or a 4xx the request earned).
    Answer(StoredResult),
    /// The job failed in a way another try may not (a 5xx): try again.
    Retry(String),
    /// The job's cancel key said stop.
    Cancelled,
    /// This worker is stopping: hand the job back untried.
    HandBack,
}

pub struct Worker {
    app: Arc<AppState>,
    options: WorkerOptions,
    conn: ConnectionManager,
    blocking: ConnectionManager,
    stopping: Arc<AtomicBool>,
    stop_at: std::sync::Mutex<Option<Instant>>,
    heartbeat: redis::Script,
    hand_back: redis::Script,
    /// Whether this worker's own pending entries (from a run under the same name that
    /// stopped) have been taken back.
    resumed: AtomicBool,
}

/// Runs a worker until SIGTERM or Ctrl-C: the running job gets `shutdown_grace` to finish,
/// then it is handed back to the queue for another worker.
pub fn run(
    models: Models,
    serve_options: ServeOptions,
    url: &str,
    options: WorkerOptions,
) -> Result<()> {
    let client = connection::client(url)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidRequest(format!("cannot start the runtime: {e}")))?;
    let local = Local::start(models, serve_options)?;
    let app = local.app.clone();
    let result = runtime.block_on(async move {
        let mut conn = connection::commands(&client)?;
        let blocking = connection::blocking(&client, BLOCK)?;
        connection::wait_until_up(&mut conn, url, None).await?;
        let worker = Arc::new(Worker {
            app,
            options,
            conn,
            blocking,
            stopping: Arc::new(AtomicBool::new(false)),
            stop_at: std::sync::Mutex::new(None),
            heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
            hand_back: redis::Script::new(HAND_BACK_SCRIPT),
            resumed: AtomicBool::new(false),
        });
        let signals = {
            let worker = worker.clone();
            tokio::spawn(async move {
                let mut signals = Signals::new();
                signals.next().await;
                eprintln!("stopping: no new jobs; the running one has the grace period");
                *worker.stop_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                worker.stopping.store(true, Ordering::SeqCst);
                exit_on_second_signal(signals);
            })
        };
        let heartbeat = tokio::spawn(worker.clone().advertise());
        eprintln!(
            "worker {} taking jobs from {}",
            worker.options.name,
            connection::redacted(url)
        );
        worker.take_jobs().await;
        heartbeat.abort();
        signals.abort();
        let _ = inventory::withdraw(&mut worker.conn.clone(), &worker.options.name).await;
        Ok(())
    });
    local.stop();
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

fn lost(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

impl Worker {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The streams this worker reads, the loaded checkpoint's first (no switch needed),
    /// then the shared one, then its other checkpoints'.
    fn streams(&self) -> Vec<String> {
        let models = &self.app.models;
        let loaded = models.loaded().map(|l| l.checkpoint.model_name.clone());
        let mut streams = Vec::new();
        if let Some(name) = &loaded {
            streams.push(keys::jobs_for(name));
        }
        streams.push(keys::JOBS.to_string());
        for c in models.checkpoints() {
            let s = keys::jobs_for(&c.model_name);
            if !streams.contains(&s) {
                streams.push(s);
            }
        }
        streams
    }

    /// Makes the consumer group on each stream this worker reads (after a Redis that lost
    /// its data, too).
    async fn join(&self) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        for stream in self.streams() {
            ensure_group(&mut conn, &stream).await?;
            let _: () = conn.sadd(keys::STREAMS, &stream).await?;
        }
        Ok(())
    }

    /// The heartbeat: the live set, the inventory, and a rescan when a front end asked for
    /// one (`refresh-checkpoints`).
    async fn advertise(self: Arc<Self>) {
        let mut conn = self.conn.clone();
        let mut refreshed: Option<i64> = None;
        let mut backoff = Backoff::new("heartbeat");
        loop {
            let asked: RedisResult<Option<i64>> = conn.get(keys::REFRESH).await;
            if let Ok(asked) = asked {
                if refreshed.is_some() && asked != refreshed {
                    let models = &self.app.models;
                    for (what, r) in [
                        ("checkpoints", models.refresh_checkpoints()),
                        ("LoRAs", models.refresh_loras()),
                        ("VAEs", models.refresh_vaes()),
                    ] {
                        if let Err(e) = r {
                            eprintln!("rescanning {what}: {e}");
                        }
                    }
                    if let Err(e) = self.join().await {
                        eprintln!("joining new streams: {e}");
                    }
                }
                refreshed = Some(asked.unwrap_or(0));
            }
            let inventory = json!({
                "name": self.options.name,
                "streams": self.streams(),
                "lists": inventory::lists(&self.app).await,
                "running": self.app.queue.is_running(),
            });
            match inventory::publish(&mut conn, &self.options.name, &inventory).await {
                Ok(()) => backoff.succeeded(),
                Err(e) => backoff.failed(&e).await,
            }
            tokio::time::sleep(inventory::HEARTBEAT).await;
        }
    }

    /// The main loop: one job at a time until the worker is told to stop.
    async fn take_jobs(self: &Arc<Self>) {
        let mut backoff = Backoff::new("taking jobs");
        let mut joined = false;
        while !self.stopping() {
            if !joined {
                match self.join().await {
                    Ok(()) => joined = true,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                }
            }
            match self.next_entry().await {
                Ok(Some(taken)) => {
                    backoff.succeeded();
                    if self.stopping() {
                        self.hand_back(&taken, false).await;
                        break;
                    }
                    self.handle(taken).await;
                }
                Ok(None) => backoff.succeeded(),
                Err(e) => {
                    // A Redis that restarted without its data has no groups: make them again.
                    if lost(&e) {
                        joined = false;
                    }
                    backoff.failed(&e).await;
                }
            }
        }
    }

    /// The next entry to run: first one whose worker stopped (idle past `claim_idle`), then
    /// a new one, waiting up to [`BLOCK`] for it.
    async fn next_entry(&self) -> RedisResult<Option<Taken>> {
        let streams = self.streams();
        let mut conn = self.conn.clone();
        // A worker restarted under its old name takes back what it held at once.
        if !self.resumed.load(Ordering::SeqCst) {
            for stream in &streams {
                if let Some(taken) = self.own_pending(&mut conn, stream).await? {
                    return Ok(Some(taken));
                }
            }
            self.resumed.store(true, Ordering::SeqCst);
        }
        for stream in &streams {
            if let Some(taken) = self.reclaim(&mut conn, stream).await? {
                return Ok(Some(taken));
            }
        }
        for stream in &streams {
            let read = self
                .read(&mut conn, std::slice::from_ref(stream), None)
                .await?;
            if let Some(taken) = read.into_iter().next() {
                return Ok(Some(taken));
            }
        }
        let mut blocking = self.blocking.clone();
        let mut read = self.read(&mut blocking, &streams, Some(BLOCK)).await?;
        if read.is_empty() {
            return Ok(None);
        }
        let first = read.remove(0);
        // A blocking read over several streams may deliver one entry from each: keep one,
        // hand the others to the next worker that looks.
        for other in read {
            self.hand_back(&other, false).await;
        }
        Ok(Some(first))
    }

    /// An entry delivered to this consumer name and never acknowledged (its last run
    /// stopped), with its delivery count.
    async fn own_pending(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
    ) -> RedisResult<Option<Taken>> {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.options.name)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(stream)
            .arg("0")
            .query_async(conn)
            .await?;
        let Some(entry) = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .next()
        else {
            return Ok(None);
        };
        self.taken(conn, stream, entry, "taking back")
            .await
            .map(Some)
    }

    /// An entry this worker now holds again (its own from before, or an idle one it
    /// claimed), with its delivery count.
    async fn taken(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
        entry: redis::streams::StreamId,
        how: &str,
    ) -> RedisResult<Taken> {
        let deliveries = self.deliveries(conn, stream, &entry.id).await?;
        eprintln!(
            "{how} job entry {} of {stream} (delivery {deliveries})",
            entry.id
        );
        Ok(Taken {
            stream: stream.to_string(),
            entry: entry.id,
            fields: entry.map,
            deliveries,
            taken_ms: now_ms(),
        })
    }

    async fn deliveries(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
        entry: &str,
    ) -> RedisResult<u64> {
        let pending: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(GROUP)
            .arg(entry)
            .arg(entry)
            .arg(1)
            .query_async(conn)
            .await?;
        Ok(pending.ids.first().map_or(1, |p| p.times_delivered as u64))
    }

    async fn reclaim(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
    ) -> RedisResult<Option<Taken>> {
        // Each call scans a bounded part of the pending list: follow its cursor through
        // the whole list, or an idle entry behind many running ones would wait.
        let mut cursor = "0-0".to_string();
        let entry = loop {
            let reply: redis::streams::StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(GROUP)
                .arg(&self.options.name)
                .arg(self.options.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            // Entries deleted while pending (acknowledged elsewhere): nothing to run.
            if !reply.deleted_ids.is_empty() {
                let _: () = conn.xack(stream, GROUP, &reply.deleted_ids).await?;
            }
            if let Some(entry) = reply.claimed.into_iter().next() {
                break entry;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(None);
            }
            cursor = reply.next_stream_id;
        };
        self.taken(conn, stream, entry, "claimed").await.map(Some)
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        streams: &[String],
        block: Option<Duration>,
    ) -> RedisResult<Vec<Taken>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.options.name)
            .arg("COUNT")
            .arg(1);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(streams);
        for _ in streams {
            cmd.arg(">");
        }
        let reply: Option<redis::streams::StreamReadReply> = cmd.query_async(conn).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|key| {
                let stream = key.key;
                key.ids.into_iter().map(move |id| Taken {
                    stream: stream.clone(),
                    entry: id.id,
                    fields: id.map,
                    deliveries: 1,
                    taken_ms: now_ms(),
                })
            })
            .collect())
    }

    /// Runs one entry to its end: an answer stored and the entry acknowledged, or the
    /// entry handed back for another try, or moved to the dead letters.
    async fn handle(&self, taken: Taken) {
        let id = QueuedJob::id_of(&taken.fields);
        let mut conn = self.conn.clone();
        if let Some(id) = &id {
            // Answered already: a second delivery of a job that finished (its worker died
            // between the answer and the acknowledgement), or a dead letter's answer.
            if let Ok(true) = conn.exists::<_, bool>(keys::result(id)).await {
                eprintln!("job {id} already has its answer; acknowledging");
                self.finish(&taken, None).await;
                return;
            }
        }
        let error_key = keys::error(id.as_deref().unwrap_or(&format!("entry.{}", taken.entry)));
        if taken.deliveries > self.options.max_deliveries {
            let last: Option<String> = conn.get(&error_key).await.unwrap_or(None);
            let error = last.unwrap_or_else(|| "its worker stopped while running it".into());
            self.dead_letter(&taken, id.as_deref(), &error).await;
            return;
        }
        let job = match QueuedJob::from_entry(&taken.fields) {
            Ok(job) => job,
            Err(e) => {
                // Perhaps a newer front end's job that a newer worker understands: retried,
                // and dead-lettered if none does.
                eprintln!("entry {} of {}: {e}", taken.entry, taken.stream);
                let _: RedisResult<()> = conn.set_ex(&error_key, &e, RESULT_TTL.as_secs()).await;
                self.hand_back(&taken, true).await;
                return;
            }
        };
        let stop: Option<String> = conn.get(keys::cancel(&job.id)).await.unwrap_or(None);
        if stop.as_deref() == Some("cancel") {
            eprintln!("job {} was cancelled before it started", job.id);
            self.finish(&taken, Some(cancelled(&job))).await;
            return;
        }
        eprintln!(
            "job {} ({}, delivery {})",
            job.id,
            job.endpoint.name(),
            taken.deliveries
        );
        let started = Instant::now();
        match self.run_job(&taken, &job).await {
            Outcome::Answer(result) => {
                eprintln!(
                    "job {} answered {} in {:.1} s",
                    job.id,
                    result.status,
                    started.elapsed().as_secs_f64()
                );
                self.finish(&taken, Some((job.id.clone(), result))).await;
            }
            Outcome::Cancelled => {
                eprintln!("job {} cancelled", job.id);
                self.finish(&taken, Some(cancelled(&job))).await;
            }
            Outcome::Retry(error) => {
                eprintln!("job {} failed: {error}", job.id);
                let _: RedisResult<()> =
                    conn.set_ex(&error_key, &error, RESULT_TTL.as_secs()).await;
                self.hand_back(&taken, true).await;
            }
            Outcome::HandBack => {
                eprintln!("job {} handed back: this worker is stopping", job.id);
                self.hand_back(&taken, false).await;
            }
        }
        let _: RedisResult<()> = conn.del(keys::progress(&job.id)).await;
    }

    /// Runs a job on the local worker thread while watching its cancel key, writing its
    /// progress and keeping its entry claimed.
    async fn run_job(&self, taken: &Taken, job: &QueuedJob) -> Outcome {
        let fields = match &job.body {
            Value::Object(map) => Fields::from_map(map.clone()),
            _ => return Outcome::Retry("the job's body is not an object".into()),
        };
        let app = self.app.clone();
        let endpoint = job.endpoint;
        let mut answer =
            Box::pin(async move { crate::serve::answer(&app, endpoint, fields).await });
        let mut conn = self.conn.clone();
        let mut tick = tokio::time::interval(TICK);
        let mut beat = Instant::now();
        let mut interrupted = false;
        let mut last_step = None;
        let heartbeat_every = self.options.claim_idle / 4;
        loop {
            tokio::select! {
                r = &mut answer => return outcome(r),
                _ = tick.tick() => {}
            }
            let stop: Option<String> = conn.get(keys::cancel(&job.id)).await.unwrap_or(None);
            match stop.as_deref() {
                Some("interrupt") if !interrupted => {
                    self.app.queue.interrupt();
                    interrupted = true;
                }
                Some("interrupt") => {}
                // Dropping the answer drops its ticket, which cancels the job inside its step.
                Some(_) => return Outcome::Cancelled,
                None => {}
            }
            let progress = self.app.queue.progress();
            let step = (progress.sampling_step, progress.current_image.is_some());
            if progress.started.is_some() && last_step != Some(step) {
                last_step = Some(step);
                let value = json!({
                    "job": job.id,
                    "worker": self.options.name,
                    "progress": progress.fraction,
                    "eta_relative": progress.eta_seconds(),
                    "sampling_step": progress.sampling_step,
                    "sampling_steps": progress.sampling_steps,
                    "interrupted": progress.interrupted,
                    "job_timestamp": progress.job_timestamp,
                    "current_image": progress.current_image,
                });
                let _: RedisResult<()> = conn
                    .set_ex(
                        keys::progress(&job.id),
                        value.to_string(),
                        PROGRESS_TTL.as_secs(),
                    )
                    .await;
            }
            if beat.elapsed() >= heartbeat_every {
                beat = Instant::now();
                let still_ours: RedisResult<i64> = self
                    .heartbeat
                    .key(&taken.stream)
                    .arg(GROUP)
                    .arg(&self.options.name)
                    .arg(&taken.entry)
                    .invoke_async(&mut conn)
                    .await;
                if let Ok(0) = still_ours {
                    eprintln!(
                        "job {}: its entry is no longer this worker's (another took it over or finished it); finishing anyway (one answer is kept)",
                        job.id
                    );
                }
            }
            let stop_at = *self.stop_at.lock().unwrap_or_else(|e| e.into_inner());
            if stop_at.is_some_and(|t| t.elapsed() >= self.options.shutdown_grace) {
                return Outcome::HandBack;
            }
        }
    }

    /// Stores a job's answer (if any) once, and acknowledges and deletes its entry. Keeps
    /// trying while Redis is away: the answer exists only here until it is stored.
    async fn finish(&self, taken: &Taken, answer: Option<(String, StoredResult)>) {
        let mut conn = self.conn.clone();
        let mut backoff = Backoff::new("storing an answer");
        let answer = answer.map(|(id, mut result)| {
            result.meta = json!({
                "worker": self.options.name,
                "queued_ms": taken.queued_ms(),
                "started_ms": taken.taken_ms,
                "finished_ms": now_ms(),
                "deliveries": taken.deliveries,
            });
            (id, result)
        });
        loop {
            let stored: RedisResult<()> = async {
                if let Some((id, result)) = &answer {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(keys::result(id))
                        .arg(result.encode())
                        .arg("NX")
                        .arg("EX")
                        .arg(RESULT_TTL.as_secs())
                        .query_async(&mut conn)
                        .await?;
                    if set.is_none() {
                        eprintln!("job {id} ran twice; its first answer is kept");
                    }
                }
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .xack(&taken.stream, GROUP, &[&taken.entry])
                    .ignore()
                    .xdel(&taken.stream, &[&taken.entry])
                    .ignore();
                if let Some((id, _)) = &answer {
                    // An interrupt's flag has done its work.
                    pipe.del(keys::cancel(id)).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            }
            .await;
            match stored {
                Ok(()) => return,
                Err(e) => backoff.failed(&e).await,
            }
        }
    }

    /// Gives an entry back to the group, marked idle long enough that the next worker to
    /// look claims it at once. `counts`: the try counts toward `max_deliveries` (a failure);
    /// otherwise (this worker is stopping) it does not.
    async fn hand_back(&self, taken: &Taken, counts: bool) {
        let retry_count = if counts {
            taken.deliveries
        } else {
            taken.deliveries.saturating_sub(1)
        };
        let mut conn = self.conn.clone();
        let mut backoff = Backoff::new("handing a job back");
        for _ in 0..20 {
            let r: RedisResult<i64> = self
                .hand_back
                .key(&taken.stream)
                .arg(GROUP)
                .arg(&self.options.name)
                .arg(&taken.entry)
                .arg(RELEASED)
                .arg(RELEASED_IDLE_MS)
                .arg(retry_count)
                .invoke_async(&mut conn)
                .await;
            match r {
                Ok(_) => return,
                Err(e) => backoff.failed(&e).await,
            }
        }
        // Redis stayed away: the entry stays this worker's and is claimed after claim_idle.
    }

    /// Moves a job that failed every try to the dead-letter stream, answers its client with
    /// the last error, and acknowledges it.
    async fn dead_letter(&self, taken: &Taken, id: Option<&str>, error: &str) {
        eprintln!(
            "entry {} of {} failed {} times; moving it to {}: {error}",
            taken.entry,
            taken.stream,
            taken.deliveries - 1,
            keys::DEAD
        );
        let endpoint = taken
            .fields
            .get("endpoint")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .unwrap_or_default();
        let flavor = crate::serve::Endpoint::from_name(&endpoint)
            .map(|e| e.flavor())
            .unwrap_or_default();
        let failure = ApiError::internal(format!(
            "the job failed {} times; the last error: {error}",
            taken.deliveries - 1
        ))
        .flavor(flavor);
        let answer = StoredResult::new(failure.status.as_u16(), failure.body());
        let mut conn = self.conn.clone();
        let mut backoff = Backoff::new("dead-lettering a job");
        // One transaction: the dead letter, the client's answer and the acknowledgement
        // happen together or not at all (a crash between them would repeat the letter).
        loop {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if let Some(id) = id {
                pipe.cmd("SET")
                    .arg(keys::result(id))
                    .arg(answer.encode())
                    .arg("NX")
                    .arg("EX")
                    .arg(RESULT_TTL.as_secs())
                    .ignore();
            }
            pipe.xadd(
                keys::DEAD,
                "*",
                &[
                    ("job", id.unwrap_or("")),
                    ("endpoint", &endpoint),
                    ("stream", &taken.stream),
                    ("entry", &taken.entry),
                    ("deliveries", &(taken.deliveries - 1).to_string()),
                    ("error", error),
                    ("at_ms", &now_ms().to_string()),
                ],
            )
            .ignore()
            .xack(&taken.stream, GROUP, &[&taken.entry])
            .ignore()
            .xdel(&taken.stream, &[&taken.entry])
            .ignore();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => return,
                Err(e) => backoff.failed(&e).await,
            }
        }
    }
}

fn cancelled(job: &QueuedJob) -> (String, StoredResult) {
    let e =
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled").flavor(job.endpoint.flavor());
    (
        job.id.clone(),
        StoredResult::new(e.status.as_u16(), e.body()),
    )
}

/// A request's answer is final when it is an image or the request's own fault (4xx); a
/// server error may not happen on another try.
fn outcome(answer: std::result::Result<Value, ApiError>) -> Outcome {
    match answer {
        Ok(body) => Outcome::Answer(StoredResult::new(200, body)),
        // A full local queue is this worker's state, not the request's fault.
        Err(e) if e.status.is_server_error() || e.status == StatusCode::TOO_MANY_REQUESTS => {
            Outcome::Retry(e.message)
        }
        Err(e) => Outcome::Answer(StoredResult::new(e.status.as_u16(), e.body())),
    }
}
