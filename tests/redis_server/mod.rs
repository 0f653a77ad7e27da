//! A real Redis server for the scale-out tests: one per test, on a Unix socket in a
//! temporary folder, with the append-only file on (as the docs tell deployments to run it),
//! and real `text2img worker` processes beside it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub struct Redis {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// A fresh server, or `None` (the test is skipped) where `redis-server` is not
    /// installed and `TEXT2IMG_REQUIRE_REDIS` is unset; CI sets it, so there it fails.
    pub fn start() -> Option<Self> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                std::env::var_os("TEXT2IMG_REQUIRE_REDIS").is_none(),
                "redis-server is not installed (TEXT2IMG_REQUIRE_REDIS is set)"
            );
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        let mut redis = Self {
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.launch();
        Some(redis)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn launch(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.try_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url().as_str())?.get_connection()
    }

    pub fn connection(&self) -> redis::Connection {
        self.try_connection()
            .expect("a connection to the test Redis")
    }

    /// Kills the server (SIGKILL: no shutdown, no last rewrite of its files) and starts it
    /// again on the same socket and files after `down`.
    pub fn crash(&mut self, down: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        thread::sleep(down);
        self.launch();
    }

    /// Stops the server as a shutdown does (SIGTERM: the append-only file is flushed) and
    /// starts it again on the same socket and files, after `down` without a server.
    pub fn restart(&mut self, down: Duration) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        thread::sleep(down);
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `text2img worker` on the built-in model; killed when dropped.
pub struct Worker {
    pub child: Child,
    pub name: String,
    log: Arc<Mutex<String>>,
}

impl Worker {
    pub fn start(redis: &Redis, name: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_text2img"))
            .args(["worker", "--redis", &redis.url(), "--name", name])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let log = crate::server::capture_log(child.stderr.take().unwrap());
        let worker = Self {
            child,
            name: name.to_string(),
            log,
        };
        worker.wait_for_log("taking jobs", Duration::from_secs(120));
        worker
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the worker's log says `text`; returns when it did.
    pub fn wait_for_log(&self, text: &str, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if self.log().contains(text) {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "worker {} never logged {text:?}:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}
