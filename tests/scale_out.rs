//! Scale-out through a real Redis: `serve --redis` front ends, `text2img worker` processes on
//! the built-in model, and the faults the queue must survive (a killed worker, a poison job,
//! cancelled and interrupted jobs, a full queue, a Redis restart).

mod parity;
mod redis_server;
mod server;

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
    assert!(!b.log().contains("ran twice"), "{}", b.log());
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

    // The client leaves: the front end sets the job's cancel key, the worker stops.
    let url = front.url("/sdapi/v1/txt2img");
    let leaving = thread::spawn(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(3))
            .build();
        let r = agent
            .post(&url)
            .send_string(&long_job("leave-1").to_string());
        (r.is_err(), Instant::now())
    });
    wait_until_sampling(&front, "leave-1");
    let (gave_up, left) = leaving.join().unwrap();
    assert!(gave_up);
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

#[test]
fn a_full_queue_answers_429_and_waiting_jobs_run_when_a_worker_comes() {
    let Some(redis) = Redis::start() else { return };
    let front = front(&redis, &["--max-queue", "1"]);
    let waiting = post_in_background(
        &front,
        "/sdapi/v1/txt2img",
        json!({"prompt": "x", "steps": 2, "seed": 1}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while front.get("/health").1["queue"] != 1 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(20));
    }
    let r = ureq::post(&front.url("/sdapi/v1/txt2img")).send_string(r#"{"prompt": "y"}"#);
    match r {
        Err(ureq::Error::Status(429, response)) => {
            assert!(response.header("retry-after").is_some());
            let body: Value = response.into_json().unwrap();
            assert!(body["detail"].as_str().unwrap().contains("queue is full"));
        }
        other => panic!("expected 429, got {other:?}"),
    }
    let _worker = Worker::start(&redis, "late", &[]);
    let (status, answer) = waiting.join().unwrap();
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_redis_restart_loses_no_queued_job_and_batches_match_local_runs() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let worker = Worker::start(&redis, "a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| json!({"prompt": format!("shape {i}"), "steps": 40}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let queued = dir.path().join("queued");
    let batch = std::process::Command::new(env!("CARGO_BIN_EXE_text2img"))
        .args(["batch", "--prompts"])
        .arg(&prompts)
        .arg("--out")
        .arg(&queued)
        .args(["--redis", &redis.url()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Redis goes away while the first job runs and the others wait in the stream.
    worker.wait_for_log("(txt2img, delivery 1)", Duration::from_secs(60));
    // The queued entries reach the append-only file within its one-second fsync.
    thread::sleep(Duration::from_millis(1500));
    let unfinished: u64 = redis.connection().xlen("text2img:jobs").unwrap();
    assert!(
        unfinished >= 2,
        "{unfinished} entries left before the restart"
    );
    redis.restart(Duration::from_secs(2));
    let out = batch.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}\n{}", worker.log());
    assert!(log.contains("4 line(s) run, 0 failed"), "{log}");
    assert_eq!(
        worker.log().matches("answered 200").count(),
        4,
        "{}",
        worker.log()
    );
    // The same file run in-process gives the same PNG files, byte for byte.
    let local = dir.path().join("local");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_text2img"))
        .args(["batch", "--prompts"])
        .arg(&prompts)
        .arg("--out")
        .arg(&local)
        .status()
        .unwrap();
    assert!(status.success());
    for line in 1..=4 {
        let name = format!("{line:05}-1.png");
        let a = std::fs::read(queued.join(&name)).unwrap();
        let b = std::fs::read(local.join(&name)).unwrap();
        assert!(a == b, "{name} differs");
    }
    let summary = std::fs::read_to_string(queued.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 5, "{summary}");
    // A rerun finds every line done.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_text2img"))
        .args(["batch", "--prompts"])
        .arg(&prompts)
        .arg("--out")
        .arg(&local)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("0 line(s) run, 0 failed, 4 done earlier"),
        "{log}"
    );
}
