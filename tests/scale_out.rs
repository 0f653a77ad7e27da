//! Scale-out through a real Redis: `serve --redis` front ends, `text2img worker` processes on
//! the built-in model, and the faults the queue must survive (a killed worker, a poison job,
//! cancelled and interrupted jobs, a full queue, a Redis restart).

mod parity;
mod redis_server;
mod server;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use redis::Commands;
use serde_json::{json, Value};

use redis_server::{Redis, Worker};
use server::Server;

fn front(redis: &Redis, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(extra);
    Server::start_with(&args)
}

/// Waits until the front end sees `n` live workers.
fn wait_for_workers(front: &Server, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while front.get("/health").1["workers"].as_u64() != Some(n) {
        assert!(Instant::now() < deadline, "{}", front.get("/health").1);
        thread::sleep(Duration::from_millis(50));
    }
}

/// A job of many small steps: seconds long, stoppable between steps.
fn long_job(id: &str) -> Value {
    json!({"prompt": "a red circle", "steps": 150, "seed": 11, "force_task_id": id})
}

/// Waits until the job has run a step (its worker wrote its progress).
fn wait_until_sampling(front: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, p) = front.get(&format!("/sdapi/v1/progress?id_task={id}"));
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 1 {
            return p;
        }
        assert!(Instant::now() < deadline, "job {id} never started: {p}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn post_in_background(front: &Server, path: &str, body: Value) -> thread::JoinHandle<(u16, Value)> {
    let url = front.url(path);
    thread::spawn(move || {
        server::answer(
            ureq::post(&url)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
        )
    })
}

fn pending(conn: &mut redis::Connection, stream: &str) -> u64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("text2img")
        .query(conn)
        .unwrap();
    match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

#[test]
fn queued_requests_answer_as_the_in_process_server_does() {
    let Some(redis) = Redis::start() else { return };
    let _a = Worker::start(&redis, "a", &[]);
    let _b = Worker::start(&redis, "b", &[]);
    let front = front(&redis, &[]);
    wait_for_workers(&front, 2);
    let local = Server::start_default(&[]);

    // The same request gives the same answer through the queue as in-process.
    let request = json!({"prompt": "a blue square", "steps": 6, "seed": 42, "batch_size": 2});
    let (status, queued) = front.post("/sdapi/v1/txt2img", &request);
    assert_eq!(status, 200, "{queued}");
    let (_, here) = local.post("/sdapi/v1/txt2img", &request);
    assert_eq!(queued["images"].as_array().unwrap().len(), 2);
    assert_eq!(queued["images"], here["images"]);
    assert_ne!(queued["images"][0], queued["images"][1]);

    // Without a seed, the front end pins one from the job id: the same id answers the
    // same image (its second run finds the first answer stored).
    let unseeded = json!({"prompt": "a green triangle", "steps": 4, "force_task_id": "same-1"});
    let (_, first) = front.post("/sdapi/v1/txt2img", &unseeded);
    let (_, again) = front.post("/sdapi/v1/txt2img", &unseeded);
    assert_eq!(first["images"], again["images"]);
    let info: Value = serde_json::from_str(first["info"].as_str().unwrap()).unwrap();
    let pinned = json!({"prompt": "a green triangle", "steps": 4, "seed": info["seed"]});
    assert_eq!(
        local.post("/sdapi/v1/txt2img", &pinned).1["images"],
        first["images"]
    );

    // A request's own fault comes back from the worker as the 400 naming its field; a
    // checkpoint no worker has is refused by the front end.
    let (status, bad) = front.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 0}));
    assert_eq!(status, 400, "{bad}");
    assert!(bad["detail"].as_str().unwrap().contains("`steps`"), "{bad}");
    let (status, bad) = front.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}),
    );
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["detail"]
            .as_str()
            .unwrap()
            .contains("text2img-default-shapes"),
        "{bad}"
    );

    // OpenAI's request shape, its answer shape.
    let (status, openai) = front.post(
        "/v1/images/generations",
        &json!({"prompt": "a red circle", "n": 1, "size": "64x64", "seed": 3, "steps": 4}),
    );
    assert_eq!(status, 200, "{openai}");
    assert!(openai["data"][0]["b64_json"].as_str().unwrap().len() > 100);
    let (status, bad) = front.post("/v1/images/generations", &json!({"n": 1}));
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["param"], "prompt", "{bad}");

    // The model lists are the workers' (the same model on both: listed once).
    let (_, models) = front.get("/sdapi/v1/sd-models");
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models[0]["title"], "text2img-default-shapes");
    let (_, options) = front.get("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], "text2img-default-shapes");
    // Selecting it routes later requests to its stream, which both workers read.
    let (status, _) = front.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "text2img-default-shapes"}),
    );
    assert_eq!(status, 200);
    let (status, routed) = front.post("/sdapi/v1/txt2img", &request);
    assert_eq!(status, 200);
    assert_eq!(routed["images"], here["images"]);
    let mut conn = redis.connection();
    let on_model: u64 = conn
        .xlen("text2img:jobs:model:text2img-default-shapes")
        .unwrap();
    assert_eq!(on_model, 0, "acknowledged entries are deleted");
    assert_eq!(pending(&mut conn, "text2img:jobs"), 0);
}

#[test]
fn a_killed_workers_job_is_finished_by_another_once() {
    let Some(redis) = Redis::start() else { return };
    let mut a = Worker::start(&redis, "a", &["--claim-idle", "2"]);
    let front = front(&redis, &[]);
    wait_for_workers(&front, 1);
    let client = post_in_background(&front, "/sdapi/v1/txt2img", long_job("kill-1"));
    wait_until_sampling(&front, "kill-1");
    a.kill();
    let b = Worker::start(&redis, "b", &["--claim-idle", "2"]);
    let (status, answer) = client.join().unwrap();
    assert_eq!(status, 200, "{answer}\n{}", b.log());
    assert!(
        b.log().contains("(delivery 2)"),
        "b did not take over the entry:\n{}",
        b.log()
    );
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 11);
    let mut conn = redis.connection();
    assert_eq!(pending(&mut conn, "text2img:jobs"), 0);
    let dead: u64 = conn.xlen("text2img:dead").unwrap();
    assert_eq!(dead, 0);
    // The answer is the image one uninterrupted run gives.
    let local = Server::start_default(&["--max-job-seconds", "0"]);
    let mut request = long_job("x");
    request.as_object_mut().unwrap().remove("force_task_id");
    assert_eq!(
        local.post("/sdapi/v1/txt2img", &request).1["images"],
        answer["images"]
    );
}

#[test]
fn a_poison_job_goes_to_the_dead_letters_and_its_client_hears_why() {
    let Some(redis) = Redis::start() else { return };
    let worker = Worker::start(&redis, "a", &["--max-deliveries", "2", "--claim-idle", "2"]);
    let front = front(&redis, &[]);
    wait_for_workers(&front, 1);
    // An entry no worker can run (a front end of another version might write one).
    let mut conn = redis.connection();
    let _: String = conn
        .xadd(
            "text2img:jobs",
            "*",
            &[("job", "poison-1"), ("endpoint", "txt3img"), ("body", "{}")],
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let stored: Option<String> = conn.get("text2img:result:poison-1").unwrap();
        if let Some(s) = stored {
            break s;
        }
        assert!(Instant::now() < deadline, "{}", worker.log());
        thread::sleep(Duration::from_millis(50));
    };
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["status"], 500);
    let detail = stored["body"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("failed 2 times") && detail.contains("unknown endpoint `txt3img`"),
        "{detail}"
    );
    let dead: redis::streams::StreamRangeReply = conn.xrange_all("text2img:dead").unwrap();
    assert_eq!(dead.ids.len(), 1);
    let entry = &dead.ids[0];
    assert_eq!(entry.get::<String>("job").as_deref(), Some("poison-1"));
    assert_eq!(entry.get::<String>("deliveries").as_deref(), Some("2"));
    assert!(entry
        .get::<String>("error")
        .unwrap()
        .contains("unknown endpoint"));
    assert_eq!(pending(&mut conn, "text2img:jobs"), 0);
    // The worker goes on with the next job.
    let (status, _) = front.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 2}));
    assert_eq!(status, 200);
}

#[test]
fn cancelled_and_interrupted_jobs_stop_inside_their_steps() {
    let Some(redis) = Redis::start() else { return };
    let worker = Worker::start(&redis, "a", &[]);
    let front = front(&redis, &[]);
    wait_for_workers(&front, 1);

    // The client leaves while its job runs: the front end sets the job's cancel key, the
    // worker stops inside the step.
    let mut client =
        std::net::TcpStream::connect(front.base.trim_start_matches("http://")).unwrap();
    let body = long_job("leave-1").to_string();
    write!(
        client,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until_sampling(&front, "leave-1");
    drop(client);
    let left = Instant::now();
    let stopped = worker.wait_for_log("job leave-1 cancelled", Duration::from_secs(20));
    let took = stopped.duration_since(left).as_secs_f64();
    eprintln!("client left: job cancelled {took:.2} s later");
    assert!(took < 3.0, "{took} s");
    let mut conn = redis.connection();
    let stored: String = conn.get("text2img:result:leave-1").unwrap();
    assert!(stored.contains("cancelled"), "{stored}");

    // An interrupt answers with the image as far as it got.
    let client = post_in_background(&front, "/sdapi/v1/txt2img", long_job("int-1"));
    wait_until_sampling(&front, "int-1");
    let (_, r) = front.post("/sdapi/v1/interrupt?id_task=int-1", &json!({}));
    assert_eq!(r["interrupted"], true);
    let (status, answer) = client.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    assert_eq!(answer["images"].as_array().unwrap().len(), 1);

    // A job cancelled while it waits is skipped.
    let _: () = conn.set("text2img:cancel:skip-1", "cancel").unwrap();
    let (status, skipped) = front.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 2, "force_task_id": "skip-1"}),
    );
    assert_eq!(status, 503, "{skipped}");
    assert!(worker
        .log()
        .contains("job skip-1 was cancelled before it started"));
}

/// The ids of the entries in a stream.
fn entries(conn: &mut redis::Connection, stream: &str) -> Vec<String> {
    let range: redis::streams::StreamRangeReply = conn.xrange_all(stream).unwrap();
    range.ids.into_iter().map(|e| e.id).collect()
}

fn wait_for_entries(conn: &mut redis::Connection, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids = entries(conn, "text2img:jobs");
        if ids.len() == n {
            return ids;
        }
        assert!(Instant::now() < deadline, "{ids:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_queue_answers_429_lost_jobs_are_told_and_waiting_ones_run_when_a_worker_comes() {
    let Some(redis) = Redis::start() else { return };
    let mut conn = redis.connection();
    let front = front(&redis, &["--max-queue", "2"]);
    let waiting = post_in_background(
        &front,
        "/sdapi/v1/txt2img",
        json!({"prompt": "x", "steps": 2, "seed": 1}),
    );
    wait_for_entries(&mut conn, 1);
    let lost = post_in_background(
        &front,
        "/sdapi/v1/txt2img",
        json!({"prompt": "y", "steps": 2, "seed": 2}),
    );
    let ids = wait_for_entries(&mut conn, 2);
    assert_eq!(front.get("/health").1["queue"], 2);
    let r = ureq::post(&front.url("/sdapi/v1/txt2img")).send_string(r#"{"prompt": "z"}"#);
    match r {
        Err(ureq::Error::Status(429, response)) => {
            assert!(response.header("retry-after").is_some());
            let body: Value = response.into_json().unwrap();
            assert!(body["detail"].as_str().unwrap().contains("queue is full"));
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // An entry that vanishes (a Redis crash that lost its last second of writes): its
    // client is told, not left waiting.
    let _: u64 = conn.xdel("text2img:jobs", &[&ids[1]]).unwrap();
    let (status, told) = lost.join().unwrap();
    assert_eq!(status, 503, "{told}");
    assert!(
        told["detail"]
            .as_str()
            .unwrap()
            .contains("lost from the queue"),
        "{told}"
    );
    // A batch queues such a job again.
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, r#"{"prompt": "a red circle", "steps": 2}"#).unwrap();
    let url = redis.url();
    let running = batch(&["--redis", &url], &prompts, &dir.path().join("out"));
    let ids = wait_for_entries(&mut conn, 2);
    let _: u64 = conn.xdel("text2img:jobs", &[&ids[1]]).unwrap();
    wait_for_entries(&mut conn, 2);
    // A worker comes: the waiting jobs run.
    let _worker = Worker::start(&redis, "late", &[]);
    let (status, answer) = waiting.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    let (ok, log) = finish(running, Duration::from_secs(120));
    assert!(ok, "{log}");
    assert!(
        log.contains("lost from the queue; queueing it again"),
        "{log}"
    );
    assert!(log.contains("1 line(s) run, 0 failed"), "{log}");
}

fn batch(args: &[&str], prompts: &std::path::Path, out: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_text2img"))
        .args(["batch", "--prompts"])
        .arg(prompts)
        .arg("--out")
        .arg(out)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a batch to end (killing it after `within`), returning its success and log.
fn finish(mut child: std::process::Child, within: Duration) -> (bool, String) {
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_redis_crash_loses_no_queued_job_and_batches_match_local_runs() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let worker = Worker::start(&redis, "a", &["--claim-idle", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| json!({"prompt": format!("shape {i}"), "steps": 40}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let queued = dir.path().join("queued");
    let url = redis.url();
    let running = batch(&["--redis", &url], &prompts, &queued);
    // Redis is killed while the first job runs and the others wait in the stream; it comes
    // back from its append-only file. (A killed process loses nothing it had written to the
    // file; a crash of the machine can lose its last second, which the 429 test stands in
    // for by deleting entries.)
    worker.wait_for_log("(txt2img, delivery 1)", Duration::from_secs(60));
    let unfinished: u64 = redis.connection().xlen("text2img:jobs").unwrap();
    assert!(unfinished >= 2, "{unfinished} entries before the crash");
    redis.crash(Duration::from_secs(2));
    let (ok, log) = finish(running, Duration::from_secs(300));
    assert!(ok, "{log}\n{}", worker.log());
    assert!(log.contains("4 line(s) run, 0 failed"), "{log}");
    // The same file run in-process gives the same PNG files, byte for byte.
    let local = dir.path().join("local");
    let (ok, log) = finish(batch(&[], &prompts, &local), Duration::from_secs(300));
    assert!(ok, "{log}");
    for line in 1..=4 {
        let name = format!("{line:05}-1.png");
        let a = std::fs::read(queued.join(&name)).unwrap();
        let b = std::fs::read(local.join(&name)).unwrap();
        assert!(a == b, "{name} differs");
    }
    let summary = std::fs::read_to_string(queued.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 5, "{summary}");
    // A rerun skips the lines with records; a line whose record is gone finds its answer
    // in Redis and runs nothing.
    std::fs::remove_file(queued.join("00002.json")).unwrap();
    let runs = worker.log().matches("answered 200").count();
    let (ok, log) = finish(
        batch(&["--redis", &url], &prompts, &queued),
        Duration::from_secs(60),
    );
    assert!(ok, "{log}");
    assert!(
        log.contains("1 line(s) run, 0 failed, 3 done earlier"),
        "{log}"
    );
    assert!(queued.join("00002.json").exists());
    assert_eq!(worker.log().matches("answered 200").count(), runs);
}

#[test]
fn a_paused_worker_loses_its_job_to_another_and_one_answer_is_kept() {
    let Some(redis) = Redis::start() else { return };
    let a = Worker::start(&redis, "a", &["--claim-idle", "2"]);
    let front = front(&redis, &[]);
    wait_for_workers(&front, 1);
    let client = post_in_background(&front, "/sdapi/v1/txt2img", long_job("pause-1"));
    wait_until_sampling(&front, "pause-1");
    // Stopped (a machine that froze, a long pause): its heartbeats stop, its entry idles.
    a.signal(libc::SIGSTOP);
    let b = Worker::start(&redis, "b", &["--claim-idle", "2"]);
    b.wait_for_log("job pause-1 (txt2img, delivery 2)", Duration::from_secs(60));
    a.signal(libc::SIGCONT);
    let (status, answer) = client.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    // Both runs end; the one that ends second finds the first one's answer and keeps it.
    a.wait_for_log("job pause-1 answered 200", Duration::from_secs(120));
    b.wait_for_log("job pause-1 answered 200", Duration::from_secs(120));
    assert!(
        a.log()
            .contains("job pause-1: its entry is no longer this worker's"),
        "{}",
        a.log()
    );
    let twice = [a.log(), b.log()]
        .iter()
        .filter(|l| l.contains("job pause-1 ran twice"))
        .count();
    assert_eq!(twice, 1, "a:\n{}\nb:\n{}", a.log(), b.log());
    let mut conn = redis.connection();
    assert_eq!(pending(&mut conn, "text2img:jobs"), 0);
    let dead: u64 = conn.xlen("text2img:dead").unwrap();
    assert_eq!(dead, 0);
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 11);
}
