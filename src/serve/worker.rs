//! The one worker thread that owns the model: a bounded first-in-first-out queue of jobs,
//! run one at a time, with live progress for `/sdapi/v1/progress`.
//!
//! Jobs run one at a time because one generation already keeps every core busy (the
//! tensor kernels are multi-threaded); two at once would only interleave them.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::pipeline::{
    GenerateRequest, GeneratedImage, LoraSpec, Resolved, StepControl, StopFlags,
};

use super::models::{Checkpoint, Models};
use crate::png_out::encode_rgb_png;

/// The least time between two step previews of a job.
const PREVIEW_INTERVAL: Duration = Duration::from_millis(500);

/// One request: one or more generate calls (A1111's `n_iter`), each a batch.
pub struct JobSpec {
    /// Nothing to generate: a job that only loads `model` (a switch of checkpoint).
    pub batches: Vec<GenerateRequest>,
    /// The checkpoint the batches were planned for (loaded first if another is); `None`:
    /// whichever is loaded.
    pub model: Option<Checkpoint>,
    /// LoRAs merged into a copy of the model for this job only.
    pub loras: Vec<LoraSpec>,
    /// ControlNet files the batches' units name (by index).
    pub controlnets: Vec<std::path::PathBuf>,
    /// Cancel the job when it runs longer (it is stuck, or the machine is starved).
    pub deadline: Option<std::time::Duration>,
    /// What it was estimated to take, for the error an overrun gets.
    pub estimate_seconds: f64,
}

/// What a finished job hands back.
pub struct JobOutput {
    /// Each image with the request (batch) that made it.
    pub images: Vec<(GeneratedImage, GenerateRequest, Resolved)>,
    pub warnings: Vec<String>,
    /// An interrupt stopped it early; the images are what it had.
    pub interrupted: bool,
}

#[derive(Debug)]
pub enum JobError {
    /// The server is shutting down (queued jobs, or a running job past the grace period).
    ShuttingDown,
    /// The client went away.
    Cancelled,
    /// The pipeline refused the request (a 400).
    Invalid(String),
    /// It ran past its deadline and was cancelled.
    Overrun { ran: f64, estimate: f64 },
    /// Anything else (a 500).
    Failed(String),
}

pub type JobResult = Result<JobOutput, JobError>;

#[derive(Debug)]
pub enum SubmitError {
    Full,
    ShuttingDown,
}

/// How a job is stopped: `cancel` when the client left or the grace period ran out (stop and
/// report nothing), `finish` for `/sdapi/v1/interrupt` (stop sampling and return what there
/// is). The pipeline looks at both inside each step.
type Control = StopFlags;

struct Job {
    id: u64,
    spec: JobSpec,
    control: Arc<Control>,
    reply: oneshot::Sender<JobResult>,
}

/// The running job as the watchdog sees it.
struct Running {
    control: Arc<Control>,
    started: Instant,
    deadline: Option<std::time::Duration>,
    overran: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<Job>,
    running: Option<Running>,
    closed: bool,
    next_id: u64,
}

/// The live state `/sdapi/v1/progress` reports.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub job_count: usize,
    /// 0..1 over the whole running job (all its batches).
    pub fraction: f64,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    pub interrupted: bool,
    pub started: Option<Instant>,
    pub job_timestamp: String,
    /// Base64 PNG of the running job's latest step preview.
    pub current_image: Option<String>,
}

impl Progress {
    /// Seconds left, extrapolated from the time spent so far (A1111's estimate).
    pub fn eta_seconds(&self) -> f64 {
        match self.started {
            Some(t) if self.fraction > 0.0 => {
                let elapsed = t.elapsed().as_secs_f64();
                (elapsed / self.fraction - elapsed).max(0.0)
            }
            _ => 0.0,
        }
    }
}

pub struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
    progress: Mutex<Progress>,
}

/// A queued job as its HTTP handler holds it. Dropping the ticket (the client disconnected
/// and the handler was dropped) frees its place in the queue, or cancels it if it runs.
pub struct Ticket {
    queue: Arc<Queue>,
    id: u64,
    control: Arc<Control>,
    reply: Option<oneshot::Receiver<JobResult>>,
}

impl Ticket {
    pub async fn wait(mut self) -> JobResult {
        let reply = self.reply.take().expect("waited once");
        reply
            .await
            .unwrap_or_else(|_| Err(JobError::Failed("the worker stopped".into())))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.control.cancel.cancel();
        self.queue.lock().waiting.retain(|job| job.id != self.id);
        self.queue.update_job_count();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside the pipeline is caught in the worker; the lock data stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            capacity,
            progress: Mutex::new(Progress::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    /// Queues a job, or says why not (the queue is full, or the server is stopping).
    pub fn submit(self: &Arc<Self>, spec: JobSpec) -> Result<Ticket, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let control = Arc::new(Control::default());
        let id = {
            let mut state = self.lock();
            if state.closed {
                return Err(SubmitError::ShuttingDown);
            }
            if state.waiting.len() >= self.capacity {
                return Err(SubmitError::Full);
            }
            state.next_id += 1;
            let id = state.next_id;
            state.waiting.push_back(Job {
                id,
                spec,
                control: control.clone(),
                reply: tx,
            });
            id
        };
        self.wake.notify_all();
        self.update_job_count();
        Ok(Ticket {
            queue: self.clone(),
            id,
            control,
            reply: Some(rx),
        })
    }

    /// Jobs waiting (not counting the running one).
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    fn update_job_count(&self) {
        // Written while the queue is locked, so a later change cannot be overwritten by an
        // earlier count (the lock order queue -> progress is the same everywhere).
        let state = self.lock();
        lock(&self.progress).job_count = state.waiting.len() + usize::from(state.running.is_some());
    }

    /// Asks the running job to stop and return what it has (A1111's interrupt).
    pub fn interrupt(&self) -> bool {
        match &self.lock().running {
            Some(running) => {
                running.control.finish.cancel();
                lock(&self.progress).interrupted = true;
                true
            }
            None => false,
        }
    }

    /// Stops taking jobs and answers every waiting one "shutting down". Returns whether a
    /// job is still running.
    pub fn close(&self) -> bool {
        let (drained, running) = {
            let mut state = self.lock();
            state.closed = true;
            (
                state.waiting.drain(..).collect::<Vec<_>>(),
                state.running.is_some(),
            )
        };
        for job in drained {
            let _ = job.reply.send(Err(JobError::ShuttingDown));
        }
        self.wake.notify_all();
        self.update_job_count();
        running
    }

    pub fn is_running(&self) -> bool {
        self.lock().running.is_some()
    }

    /// Cancels the running job (the shutdown grace period is over).
    pub fn cancel_running(&self) {
        if let Some(running) = &self.lock().running {
            running.control.cancel.cancel();
        }
    }

    /// Starts the thread that cancels a running job once it is past its deadline.
    pub fn start_watchdog(self: &Arc<Self>) {
        let queue = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("text2img-watchdog".into())
            .spawn(move || {
                while let Some(queue) = queue.upgrade() {
                    if let Some(running) = &queue.lock().running {
                        let late = running
                            .deadline
                            .is_some_and(|d| running.started.elapsed() > d);
                        if late && !running.control.cancel.is_cancelled() {
                            running
                                .overran
                                .store(true, std::sync::atomic::Ordering::SeqCst);
                            running.control.cancel.cancel();
                        }
                    }
                    drop(queue);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
    }

    /// The worker loop: runs until the queue is closed and empty.
    pub fn run_worker(self: &Arc<Self>, models: &Models) {
        loop {
            let (job, overran) = {
                let mut state = self.lock();
                loop {
                    if let Some(job) = state.waiting.pop_front() {
                        state.running = Some(Running {
                            control: job.control.clone(),
                            started: Instant::now(),
                            deadline: job.spec.deadline,
                            overran: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                        });
                        break (
                            job,
                            state.running.as_ref().expect("just set").overran.clone(),
                        );
                    }
                    if state.closed {
                        return;
                    }
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            };
            let started = Instant::now();
            self.update_job_count();
            let result = if job.control.cancel.is_cancelled() {
                Err(JobError::Cancelled)
            } else {
                self.start_progress(&job.spec);
                catch_unwind(AssertUnwindSafe(|| self.run_job(models, &job)))
                    .unwrap_or_else(|_| Err(JobError::Failed("the generation panicked".into())))
            };
            let closed = {
                let mut state = self.lock();
                state.running = None;
                state.closed
            };
            {
                let mut progress = lock(&self.progress);
                let job_count = progress.job_count;
                *progress = Progress {
                    job_count,
                    ..Progress::default()
                };
            }
            self.update_job_count();
            if matches!(result, Err(JobError::Cancelled)) {
                eprintln!("job {} cancelled", job.id);
            }
            let result = match result {
                Err(JobError::Cancelled) if closed => Err(JobError::ShuttingDown),
                Err(JobError::Cancelled) if overran.load(std::sync::atomic::Ordering::SeqCst) => {
                    Err(JobError::Overrun {
                        ran: started.elapsed().as_secs_f64(),
                        estimate: job.spec.estimate_seconds,
                    })
                }
                other => other,
            };
            let _ = job.reply.send(result);
        }
    }

    fn start_progress(&self, spec: &JobSpec) {
        let mut progress = lock(&self.progress);
        progress.fraction = 0.0;
        progress.sampling_step = 0;
        progress.sampling_steps = spec.batches.first().and_then(|r| r.steps).unwrap_or(0);
        progress.interrupted = false;
        progress.started = Some(Instant::now());
        progress.job_timestamp = timestamp();
        progress.current_image = None;
    }

    fn run_job(&self, models: &Models, job: &Job) -> JobResult {
        let control = &job.control;
        let batches = job.spec.batches.len();
        let mut output = JobOutput {
            images: Vec::new(),
            warnings: Vec::new(),
            interrupted: false,
        };
        let loaded = match &job.spec.model {
            Some(checkpoint) => models.load(checkpoint),
            None => models
                .loaded()
                .ok_or_else(|| Error::InvalidRequest("no model is loaded".into())),
        }
        .map_err(|e| JobError::Failed(e.message()))?;
        if batches == 0 {
            return Ok(output);
        }
        let (pipeline, warnings) = models
            .with_loras(&loaded, &job.spec.loras)
            .map_err(|e| JobError::Invalid(e.message()))?;
        let pipeline = models
            .with_controlnets(pipeline, &job.spec.controlnets)
            .map_err(|e| JobError::Invalid(e.message()))?;
        output.warnings.extend(warnings);
        for (k, request) in job.spec.batches.iter().enumerate() {
            if control.finish.is_cancelled() {
                break;
            }
            // A full-size preview (a preview VAE's decode and a PNG) costs a fraction of a
            // step: at most one every PREVIEW_INTERVAL, and the last step's.
            let mut last_preview: Option<Instant> = None;
            let generation = pipeline.generate_stoppable(request, control, &mut |p| {
                let due = last_preview.is_none_or(|t| t.elapsed() >= PREVIEW_INTERVAL)
                    || p.step == p.total;
                let preview = if due {
                    last_preview = Some(Instant::now());
                    p.preview(0).ok().and_then(|(rgb, w, h)| {
                        let png = encode_rgb_png(&rgb, w, h, None).ok()?;
                        Some(base64::engine::general_purpose::STANDARD.encode(png))
                    })
                } else {
                    None
                };
                {
                    let mut progress = lock(&self.progress);
                    progress.sampling_step = p.step;
                    progress.sampling_steps = p.total;
                    progress.fraction = (k * p.total + p.step) as f64 / (batches * p.total) as f64;
                    if preview.is_some() {
                        progress.current_image = preview;
                    }
                }
                // The flags themselves stop the pipeline (inside the steps too).
                StepControl::Continue
            });
            let generation = match generation {
                Ok(g) => g,
                Err(Error::Cancelled) => return Err(JobError::Cancelled),
                Err(Error::InvalidRequest(m)) => return Err(JobError::Invalid(m)),
                Err(Error::UnknownScheduler { name, known }) => {
                    return Err(JobError::Invalid(format!(
                        "unknown sampler `{name}`; known: {known}"
                    )))
                }
                Err(e) => return Err(JobError::Failed(e.to_string())),
            };
            output.warnings.extend(generation.warnings);
            for image in generation.images {
                output
                    .images
                    .push((image, request.clone(), generation.resolved.clone()));
            }
        }
        output.interrupted = control.finish.is_cancelled();
        Ok(output)
    }
}

/// A1111's job timestamp: local-agnostic UTC `YYYYMMDDhhmmss`.
fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
    }

    #[test]
    fn full_queue_and_dropped_tickets() {
        let queue = Queue::new(2);
        let spec = || JobSpec {
            batches: vec![GenerateRequest::default()],
            model: None,
            loras: Vec::new(),
            controlnets: Vec::new(),
            deadline: None,
            estimate_seconds: 0.0,
        };
        let a = queue.submit(spec()).unwrap();
        let b = queue.submit(spec()).unwrap();
        assert!(matches!(queue.submit(spec()), Err(SubmitError::Full)));
        drop(a); // the client left: its place is free again
        assert_eq!(queue.waiting(), 1);
        let _c = queue.submit(spec()).unwrap();
        assert!(!queue.close());
        assert!(matches!(
            queue.submit(spec()),
            Err(SubmitError::ShuttingDown)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(rt.block_on(b.wait()), Err(JobError::ShuttingDown)));
    }
}
