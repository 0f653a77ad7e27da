//! `text2img batch`: one A1111 txt2img request per line of a JSON-lines file, run in this
//! process or through a Redis queue's workers. Resumable: a line whose record
//! (`NNNNN.json`) is in the output folder is done; its images were written before it, each
//! atomically. Every line's job id (and so its seed, when the line gives none) comes from
//! its text and number, so a rerun of a line gives the same images, and through the queue
//! finds the answers of jobs that finished while the batch was away.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use serde_json::{json, Value};

use text2img::png_out::write_atomic;
use text2img::scale::client::QueueClient;
use text2img::scale::job::{fnv1a, pin_seed, QueuedJob, StoredResult};
use text2img::serve::fields::Fields;
use text2img::serve::{Endpoint, Local, ServeOptions};

use crate::serve::{LimitArgs, ModelsArgs};

#[derive(Args)]
pub struct BatchArgs {
    /// JSON lines: one A1111 txt2img request per line (`{"prompt": ..., "seed": ...}`);
    /// blank lines and lines starting with `#` are skipped.
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: PathBuf,
    /// The folder for the images (`NNNNN-K.png`, NNNNN the line number), each line's
    /// record (`NNNNN.json`) and `summary.csv`.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Run the lines through this Redis queue's workers instead of in this process.
    #[arg(long, value_name = "URL", env = "TEXT2IMG_REDIS")]
    redis: Option<String>,
    /// Jobs in the queue at once (with --redis).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    #[command(flatten)]
    models: ModelsArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// One request of the file.
struct Line {
    number: usize,
    id: String,
    fields: Fields,
}

/// What became of a line, for the summary.
struct Row {
    number: usize,
    id: String,
    status: String,
    seed: Option<i64>,
    images: usize,
    seconds: f64,
    error: String,
}

pub fn batch_cmd(a: BatchArgs) -> Result<()> {
    a.limits.check()?;
    if a.in_flight == 0 {
        bail!("--in-flight must be at least 1");
    }
    if a.redis.is_some() && a.models.names_a_model() {
        bail!("with --redis the queue's workers run the lines: give --model to them, not here");
    }
    let text = std::fs::read_to_string(&a.prompts)
        .with_context(|| format!("reading {}", a.prompts.display()))?;
    let lines = parse_lines(&text, &a.prompts)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (done, todo): (Vec<_>, Vec<_>) = lines
        .into_iter()
        .partition(|l| record_path(&a.out, l.number).exists());
    let mut rows: Vec<Row> = done
        .iter()
        .map(|l| Row {
            number: l.number,
            id: l.id.clone(),
            status: "done earlier".into(),
            seed: None,
            images: 0,
            seconds: 0.0,
            error: String::new(),
        })
        .collect();
    if !done.is_empty() {
        eprintln!("{} line(s) done earlier; {} to run", done.len(), todo.len());
    }
    let bar = indicatif::ProgressBar::new((done.len() + todo.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} lines  {elapsed_precise} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done.len() as u64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = a.out.clone();
    let mut failed = 0usize;
    let mut record = |line_number: usize, id: &str, result: StoredResult, seconds: f64| {
        let row = save(&out, line_number, id, &result, seconds);
        let row = row.unwrap_or_else(|e| Row {
            number: line_number,
            id: id.to_string(),
            status: "not saved".into(),
            seed: None,
            images: 0,
            seconds,
            error: format!("{e:#}"),
        });
        if !row.error.is_empty() {
            failed += 1;
            bar.println(format!("line {line_number}: {}", row.error));
            bar.set_message(format!("{failed} failed"));
        }
        bar.inc(1);
        rows.push(row);
    };
    match &a.redis {
        None => {
            let mut options = ServeOptions::default();
            a.limits.apply(&mut options);
            let local = Local::start(a.models.load()?, options)?;
            let app = local.app.clone();
            runtime.block_on(async {
                for line in todo {
                    let started = Instant::now();
                    let result =
                        match text2img::serve::answer(&app, Endpoint::Txt2img, line.fields).await {
                            Ok(body) => StoredResult::new(200, body),
                            Err(e) => StoredResult::new(e.status.as_u16(), e.body()),
                        };
                    record(
                        line.number,
                        &line.id,
                        result,
                        started.elapsed().as_secs_f64(),
                    );
                }
            });
            local.stop();
        }
        Some(url) => runtime.block_on(async {
            let queue = QueueClient::new(url)?;
            queue.wait_until_up(Some(Duration::from_secs(10))).await?;
            let mut todo: VecDeque<Line> = todo.into();
            let mut running = tokio::task::JoinSet::new();
            loop {
                while running.len() < a.in_flight {
                    let Some(line) = todo.pop_front() else { break };
                    let queue = queue.clone();
                    running.spawn(async move {
                        let started = Instant::now();
                        let result = through_queue(&queue, &line).await;
                        (
                            line.number,
                            line.id,
                            result,
                            started.elapsed().as_secs_f64(),
                        )
                    });
                }
                let Some(finished) = running.join_next().await else {
                    break;
                };
                let (number, id, result, seconds) = finished?;
                record(number, &id, result, seconds);
            }
            anyhow::Ok(())
        })?,
    }
    bar.finish_and_clear();
    rows.sort_by_key(|r| r.number);
    let summary = a.out.join("summary.csv");
    write_atomic(&summary, summary_csv(&rows).as_bytes())?;
    let ran = rows.iter().filter(|r| r.status != "done earlier").count();
    eprintln!(
        "{} line(s) run, {failed} failed, {} done earlier; summary in {}",
        ran,
        rows.len() - ran,
        summary.display()
    );
    if failed > 0 {
        bail!("{failed} line(s) failed (see {})", summary.display());
    }
    Ok(())
}

/// A line through the queue: its answer if it has one already (it finished while the
/// batch was away), else queued, retried while Redis is away, and waited for. A failure
/// stored by an earlier run is cleared so that the line runs again; a job lost from the
/// queue (a Redis crash) is queued again.
async fn through_queue(queue: &Arc<QueueClient>, line: &Line) -> StoredResult {
    let mut delay = Duration::from_millis(100);
    let mut fields = line.fields.clone();
    let mut first = true;
    loop {
        let attempt = async {
            if let Some(answer) = queue.stored(&line.id).await.map_err(|e| e.to_string())? {
                if answer.status == 200 || !first {
                    return Ok(Err(answer));
                }
                queue.forget(&line.id).await.map_err(|e| e.to_string())?;
            }
            let stream = match queue.route(Endpoint::Txt2img, &mut fields).await {
                Ok(stream) => stream,
                // A checkpoint no worker has: the line's own fault.
                Err(e) if e.status.is_client_error() => {
                    return Ok(Err(StoredResult::new(e.status.as_u16(), e.body())))
                }
                Err(e) => return Err(e.message),
            };
            let job = QueuedJob {
                id: line.id.clone(),
                endpoint: Endpoint::Txt2img,
                body: fields.to_value(),
            };
            let entry = queue
                .submit(&stream, &job)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Ok((stream, entry)))
        };
        match attempt.await {
            Ok(Err(answer)) => return answer,
            Ok(Ok(entry)) => {
                first = false;
                let answer = queue.wait(&line.id, Some(entry)).await;
                if answer.meta["lost"] != json!(true) {
                    return answer;
                }
                eprintln!(
                    "line {}: its job was lost from the queue; queueing it again",
                    line.number
                );
            }
            Err(e) => {
                eprintln!("line {}: {e}; retrying", line.number);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn parse_lines(text: &str, path: &Path) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let mut fields = Fields::parse(raw.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: line {number}: {}", path.display(), e.message))?;
        let id = format!("batch-{:016x}-{number}", fnv1a(raw));
        pin_seed(&mut fields, &id);
        lines.push(Line { number, id, fields });
    }
    if lines.is_empty() {
        bail!("{}: no requests (one JSON object per line)", path.display());
    }
    Ok(lines)
}

fn record_path(out: &Path, number: usize) -> PathBuf {
    out.join(format!("{number:05}.json"))
}

/// Writes a line's images, then its record (which marks it done). An error answer writes
/// nothing: the line runs again next time.
fn save(out: &Path, number: usize, id: &str, result: &StoredResult, seconds: f64) -> Result<Row> {
    let mut row = Row {
        number,
        id: id.to_string(),
        status: result.status.to_string(),
        seed: None,
        images: 0,
        seconds,
        error: String::new(),
    };
    if result.status != 200 {
        row.error = error_text(&result.body);
        return Ok(row);
    }
    let info: Value = result.body["info"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    row.seed = info["seed"].as_i64();
    let mut files = Vec::new();
    for (k, image) in result.body["images"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let png = base64::engine::general_purpose::STANDARD
            .decode(image.as_str().unwrap_or_default())
            .context("an answer's image is not base64")?;
        let name = format!("{number:05}-{}.png", k + 1);
        write_atomic(&out.join(&name), &png)?;
        files.push(name);
    }
    row.images = files.len();
    let record = json!({
        "line": number,
        "job": id,
        "images": files,
        "seconds": seconds,
        "info": info,
    });
    write_atomic(
        &record_path(out, number),
        format!("{record:#}\n").as_bytes(),
    )?;
    Ok(row)
}

/// The message of an error answer, in either API's shape.
fn error_text(body: &Value) -> String {
    body["detail"]
        .as_str()
        .or_else(|| body["error"]["message"].as_str())
        .map_or_else(|| body.to_string(), str::to_string)
}

fn summary_csv(rows: &[Row]) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut csv = String::from("line,job,status,seed,images,seconds,error\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{:.2},{}\n",
            r.number,
            r.id,
            quote(&r.status),
            r.seed.map_or(String::new(), |s| s.to_string()),
            r.images,
            r.seconds,
            quote(&r.error)
        ));
    }
    csv
}
