//! The queue as its clients see it: add a job, wait for its answer, cancel it, read its
//! progress. The HTTP front end (`serve --redis`) and `text2img batch --redis` both use it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::connection::{self, Backoff};
use super::inventory;
use super::job::{QueuedJob, StoredResult};
use super::{keys, GROUP};
use crate::error::Result;
use crate::serve::api_error::ApiError;
use crate::serve::fields::Fields;
use crate::serve::Endpoint;
use axum::http::StatusCode;

/// How often the answers of the jobs waited for are looked up: one `MGET` for all of them,
/// so the load on Redis does not grow with the number of waiting clients, and the delay
/// this adds to a job (half of it on average) is small beside a generation.
const POLL: Duration = Duration::from_millis(50);

/// How long a job's answer, its cancel flag and its error are kept.
pub const RESULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The clients waiting for one job's answer, and where the job's entry is.
#[derive(Default)]
struct Waiting {
    senders: Vec<oneshot::Sender<StoredResult>>,
    entry: Option<(String, String)>,
}

pub struct QueueClient {
    conn: ConnectionManager,
    url: String,
    waiters: Mutex<HashMap<String, Waiting>>,
    /// Streams whose consumer group this process has made sure of.
    grouped: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QueueClient {
    /// Sets up the connection (made on first use) and starts the task that delivers
    /// answers. Must be called inside a Tokio runtime.
    pub fn new(url: &str) -> Result<Arc<Self>> {
        let client = connection::client(url)?;
        let this = Arc::new(Self {
            conn: connection::commands(&client)?,
            url: url.to_string(),
            waiters: Mutex::new(HashMap::new()),
            grouped: Mutex::new(HashSet::new()),
        });
        tokio::spawn(deliver_answers(Arc::downgrade(&this)));
        Ok(this)
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn wait_until_up(&self, give_up: Option<Duration>) -> Result<()> {
        connection::wait_until_up(&mut self.conn.clone(), &self.url, give_up).await
    }

    /// Jobs queued and not yet taken by a worker, over every job stream (each stream's
    /// consumer-group lag).
    pub async fn waiting(&self) -> RedisResult<usize> {
        let mut conn = self.conn.clone();
        let streams: Vec<String> = conn.smembers(keys::STREAMS).await?;
        let mut total = 0;
        for stream in streams {
            total += stream_waiting(&mut conn, &stream).await?;
        }
        Ok(total)
    }

    /// Adds a job to a stream (its consumer group made first, from the stream's start, so
    /// that no entry is missed by a group made later). Returns the entry's id.
    pub async fn submit(&self, stream: &str, job: &QueuedJob) -> RedisResult<String> {
        let mut conn = self.conn.clone();
        if !lock(&self.grouped).contains(stream) {
            ensure_group(&mut conn, stream).await?;
            let _: () = conn.sadd(keys::STREAMS, stream).await?;
            lock(&self.grouped).insert(stream.to_string());
        }
        conn.xadd(stream, "*", &job.fields()).await
    }

    /// A job's answer, if it has one.
    pub async fn stored(&self, job: &str) -> RedisResult<Option<StoredResult>> {
        let text: Option<String> = self.conn.clone().get(keys::result(job)).await?;
        Ok(text.map(|t| decode(&t)))
    }

    /// Clears a job's stored answer, error and cancel flag, so that the job can run again
    /// under the same id (a batch rerunning a line that failed).
    pub async fn forget(&self, job: &str) -> RedisResult<()> {
        self.conn
            .clone()
            .del(&[keys::result(job), keys::error(job), keys::cancel(job)])
            .await
    }

    /// Waits for a job's answer (however long the queue takes: a client that gives up drops
    /// this and cancels the job itself). With the job's entry (`(stream, entry id)`), an
    /// entry that vanishes without an answer (a Redis that lost its last second of writes
    /// in a crash) ends the wait with a 503 whose `meta.lost` is true: send the job again.
    pub async fn wait(&self, job: &str, entry: Option<(String, String)>) -> StoredResult {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = lock(&self.waiters);
            let waiting = waiters.entry(job.to_string()).or_default();
            waiting.senders.push(tx);
            if entry.is_some() {
                waiting.entry = entry;
            }
        }
        rx.await.unwrap_or_else(|_| {
            StoredResult::new(
                503,
                json!({"error": "unavailable", "detail": "the queue client stopped"}),
            )
        })
    }

    /// Asks the job to stop: `interrupt` answers with the images made so far, `cancel`
    /// answers nothing. A job not yet started is then skipped.
    pub async fn stop(&self, job: &str, how: Stop) -> RedisResult<()> {
        let value = match how {
            Stop::Cancel => "cancel",
            Stop::Interrupt => "interrupt",
        };
        self.conn
            .clone()
            .set_ex(keys::cancel(job), value, RESULT_TTL.as_secs())
            .await
    }

    /// The stream a job goes to: its checkpoint's (`override_settings.sd_model_checkpoint`, or
    /// the one `POST /sdapi/v1/options` selected), which only workers that have it read; else
    /// the shared one.
    pub async fn route(&self, endpoint: Endpoint, fields: &mut Fields) -> Result<String, ApiError> {
        if !matches!(endpoint, Endpoint::Txt2img | Endpoint::Img2img) {
            return Ok(keys::JOBS.to_string());
        }
        let mut overrides =
            fields
                .object("override_settings")?
                .map_or_else(serde_json::Map::new, |o| match o.to_value() {
                    Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                });
        let mut conn = self.connection();
        let selected: HashMap<String, String> =
            conn.hgetall(keys::OPTIONS).await.map_err(unavailable)?;
        let named = match overrides.get("sd_model_checkpoint") {
            Some(Value::String(name)) => Some(name.clone()),
            Some(_) => {
                return Err(ApiError::field(
                    "override_settings.sd_model_checkpoint",
                    "must be a string",
                ))
            }
            None => selected.get("sd_model_checkpoint").cloned(),
        };
        if !overrides.contains_key("sd_vae") {
            if let Some(vae) = selected.get("sd_vae") {
                overrides.insert("sd_vae".into(), json!(vae));
            }
        }
        let Some(name) = named else {
            if !overrides.is_empty() {
                fields.set("override_settings", Value::Object(overrides));
            }
            return Ok(keys::JOBS.to_string());
        };
        let workers = inventory::live(&mut conn).await.map_err(unavailable)?;
        let lists: Vec<Value> = workers.iter().map(|w| w["lists"].clone()).collect();
        let (title, model_name) = inventory::find_checkpoint(&lists, &name).ok_or_else(|| {
            let known = inventory::union(&lists, "sd-models", Some("title"));
            let titles: Vec<&str> = known
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["title"].as_str())
                .collect();
            ApiError::field(
                "sd_model_checkpoint",
                format!(
                    "`{name}` is on no live worker; the workers have: {}",
                    if titles.is_empty() {
                        "(no worker is running)".to_string()
                    } else {
                        titles.join(", ")
                    }
                ),
            )
        })?;
        overrides.insert("sd_model_checkpoint".into(), json!(title));
        fields.set("override_settings", Value::Object(overrides));
        Ok(keys::jobs_for(&model_name))
    }

    /// A running job's progress as its worker last wrote it.
    pub async fn progress(&self, job: &str) -> RedisResult<Option<Value>> {
        let text: Option<String> = self.conn.clone().get(keys::progress(job)).await?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }
}

/// A Redis failure as the client's answer.
pub fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the queue is unavailable: {e}"),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Cancel,
    Interrupt,
}

fn decode(text: &str) -> StoredResult {
    StoredResult::decode(text)
        .unwrap_or_else(|e| StoredResult::new(500, json!({"error": "server_error", "detail": e})))
}

/// Creates the consumer group on a stream (and the stream), unless it is there.
pub async fn ensure_group(conn: &mut ConnectionManager, stream: &str) -> RedisResult<()> {
    let made: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match made {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Entries of one stream not yet delivered to the group: the group's lag, or when Redis
/// cannot tell it (an entry deleted past an older running one), the stream's length less
/// the running entries.
async fn stream_waiting(conn: &mut ConnectionManager, stream: &str) -> RedisResult<usize> {
    let info: RedisResult<redis::streams::StreamInfoGroupsReply> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    let info = match info {
        Ok(info) => info,
        // The stream is gone (Redis restarted without its data): nothing waits there.
        Err(e) if e.to_string().contains("no such key") => return Ok(0),
        Err(e) => return Err(e),
    };
    match info.groups.iter().find(|g| g.name == GROUP) {
        Some(group) => match group.lag {
            Some(lag) => Ok(lag),
            // Entries leave the stream when they are acknowledged (in the same transaction),
            // so what is in it is either waiting or running.
            None => {
                let len: usize = conn.xlen(stream).await?;
                Ok(len.saturating_sub(group.pending))
            }
        },
        None => conn.xlen(stream).await,
    }
}

/// How often the entries of the jobs waited for are checked to be still in their streams.
const CHECK_ENTRIES_EVERY: u32 = 20;

/// The task that hands answers to their waiters: every [`POLL`], one `MGET` of the result
/// keys of all the jobs waited for; every [`CHECK_ENTRIES_EVERY`] polls, a look at whether
/// the entries of those without answers are still queued.
async fn deliver_answers(client: Weak<QueueClient>) {
    let mut backoff = Backoff::new("waiting for answers");
    let mut polls = 0u32;
    loop {
        tokio::time::sleep(POLL).await;
        let Some(client) = client.upgrade() else {
            return;
        };
        let ids: Vec<String> = {
            let mut waiters = lock(&client.waiters);
            // Waiters whose client left.
            waiters.retain(|_, waiting| {
                waiting.senders.retain(|tx| !tx.is_closed());
                !waiting.senders.is_empty()
            });
            waiters.keys().cloned().collect()
        };
        if ids.is_empty() {
            continue;
        }
        polls = polls.wrapping_add(1);
        let mut conn = client.conn.clone();
        let checked = async {
            if polls.is_multiple_of(CHECK_ENTRIES_EVERY) {
                find_lost(&client, &mut conn, &ids).await?;
            }
            deliver(&client, &mut conn, &ids).await
        };
        match checked.await {
            Ok(()) => backoff.succeeded(),
            Err(e) => backoff.failed(&e).await,
        }
    }
}

/// Hands the answers there are to their waiters.
async fn deliver(
    client: &QueueClient,
    conn: &mut ConnectionManager,
    ids: &[String],
) -> RedisResult<()> {
    for chunk in ids.chunks(512) {
        let result_keys: Vec<String> = chunk.iter().map(|id| keys::result(id)).collect();
        let found: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&result_keys)
            .query_async(conn)
            .await?;
        for (id, text) in chunk.iter().zip(found) {
            if let Some(text) = text {
                answer(client, id, decode(&text));
            }
        }
    }
    Ok(())
}

fn answer(client: &QueueClient, id: &str, result: StoredResult) {
    let waiting = lock(&client.waiters).remove(id).unwrap_or_default();
    for tx in waiting.senders {
        let _ = tx.send(result.clone());
    }
}

/// Ends the waits of jobs whose entries left their streams without an answer. The worker
/// stores the answer before it deletes the entry, so the answer is looked for after the
/// entry is found missing.
async fn find_lost(
    client: &QueueClient,
    conn: &mut ConnectionManager,
    ids: &[String],
) -> RedisResult<()> {
    let entries: Vec<(String, (String, String))> = {
        let waiters = lock(&client.waiters);
        ids.iter()
            .filter_map(|id| Some((id.clone(), waiters.get(id)?.entry.clone()?)))
            .collect()
    };
    for (id, (stream, entry)) in entries {
        let there: redis::streams::StreamRangeReply = conn.xrange(&stream, &entry, &entry).await?;
        if !there.ids.is_empty() {
            continue;
        }
        let stored: Option<String> = conn.get(keys::result(&id)).await?;
        let result = match stored {
            Some(text) => decode(&text),
            None => StoredResult {
                meta: json!({ "lost": true }),
                ..StoredResult::new(
                    503,
                    json!({
                        "error": "unavailable",
                        "detail": "the job was lost from the queue (Redis restarted without it); send it again",
                    }),
                )
            },
        };
        answer(client, &id, result);
    }
    Ok(())
}
