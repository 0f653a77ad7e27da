//! Every Redis key text2img uses, in one place. All start with `text2img:`, so one Redis
//! can hold other data beside them (or `--redis redis://host/N` picks another database).

/// The stream of jobs any worker may run (on the model it started with).
pub const JOBS: &str = "text2img:jobs";
/// Jobs that name a checkpoint go to that checkpoint's stream, which only the workers that
/// have it read: no worker takes a job it would have to refuse.
pub fn jobs_for(model_name: &str) -> String {
    format!("text2img:jobs:model:{model_name}")
}
/// The set of every job stream made so far (what the queue's length is summed over).
pub const STREAMS: &str = "text2img:streams";
/// Jobs that failed `--max-deliveries` times, each with its last error.
pub const DEAD: &str = "text2img:dead";
/// Live workers: a sorted set of names scored by the time (ms) of their last heartbeat.
pub const WORKERS: &str = "text2img:workers";
/// What one worker can run (its checkpoints, LoRAs, ...), refreshed with its heartbeat.
pub fn worker(name: &str) -> String {
    format!("text2img:worker:{name}")
}
/// Settings the front ends share (`sd_model_checkpoint`, set by `POST /sdapi/v1/options`).
pub const OPTIONS: &str = "text2img:options";
/// Bumped by `refresh-checkpoints`/`refresh-loras`: workers then scan their folders again.
pub const REFRESH: &str = "text2img:refresh";

/// A job's answer: written once (`SET NX`), kept for the result TTL.
pub fn result(job: &str) -> String {
    format!("text2img:result:{job}")
}
/// A running job's progress (step, total, a small preview).
pub fn progress(job: &str) -> String {
    format!("text2img:progress:{job}")
}
/// Set to `cancel` (stop, answer nothing) or `interrupt` (stop, answer what there is).
pub fn cancel(job: &str) -> String {
    format!("text2img:cancel:{job}")
}
/// The last error a try of the job ended with (what the dead-letter entry reports).
pub fn error(job: &str) -> String {
    format!("text2img:error:{job}")
}
