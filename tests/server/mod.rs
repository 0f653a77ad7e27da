//! A real `text2img serve` on a loopback port for the server tests, and how they call it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::parity::model_dir;

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        let model = model_dir("sd1-tiny");
        let mut args = vec!["--model", model.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    /// A server of the built-in default model.
    pub fn start_default(extra: &[&str]) -> Self {
        Self::start_with(extra)
    }

    pub fn start_with(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_text2img"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let log = capture_log(child.stderr.take().unwrap());
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            thread::sleep(Duration::from_millis(200));
            panic!("server did not start: {line:?} {}", log.lock().unwrap());
        };
        Self {
            base: base.to_string(),
            child,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        answer(ureq::get(&self.url(path)).call())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    pub fn post_raw(&self, path: &str, body: &str, auth: Option<&str>) -> (u16, Value) {
        let mut req = ureq::post(&self.url(path)).set("Content-Type", "application/json");
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        answer(req.send_string(body))
    }

    /// Polls `/sdapi/v1/progress` until a job has run at least one step.
    pub fn wait_until_sampling(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, p) = self.get("/sdapi/v1/progress");
            if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 1 {
                return p;
            }
            assert!(Instant::now() < deadline, "no job started: {p}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_queue(&self, waiting: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get("/health").1["queue"].as_u64() != Some(waiting) {
            assert!(Instant::now() < deadline, "queue never reached {waiting}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn terminate(&self) {
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's stderr, gathered as it comes by a thread of its own.
pub fn capture_log(mut stderr: std::process::ChildStderr) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

pub fn answer(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn b64(text: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("a base64 string"))
        .unwrap()
}
