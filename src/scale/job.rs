//! A job as it travels through a stream, and its answer as it is stored.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::serve::fields::Fields;
use crate::serve::Endpoint;

/// One request to run: which endpoint, and the request's fields with the seed pinned.
#[derive(Clone, Debug)]
pub struct QueuedJob {
    pub id: String,
    pub endpoint: Endpoint,
    pub body: Value,
}

/// Job ids are the client's (A1111's `force_task_id`, a batch line's id) or random; they
/// become parts of key names, so they are kept to a plain alphabet.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.()".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "job id `{id}` must be 1 to 100 letters, digits, `-`, `_`, `.`, `(` or `)`"
        ))
    }
}

/// A new random job id (128 bits, hex).
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A1111 and OpenAI requests without a seed (or with -1) get a random one. A queued job must
/// give the same image however often it runs (a crashed worker's job runs again), so the
/// seed is chosen once, before the job is queued, from its id: a batch resubmitting the
/// same id gets the same seed too.
pub fn pin_seed(fields: &mut Fields, job_id: &str) {
    let random = match fields.to_value().get("seed") {
        None | Some(Value::Null) => true,
        Some(v) => {
            v.as_f64() == Some(-1.0)
                || v.as_str()
                    .is_some_and(|s| s.trim().parse::<f64>() == Ok(-1.0))
        }
    };
    if random {
        fields.set("seed", json!(seed_from_id(job_id)));
    }
}

/// A seed in A1111's range (0..2^32) from the job id (it only has to spread ids).
pub fn seed_from_id(id: &str) -> u32 {
    let h = fnv1a(id);
    (h ^ (h >> 32)) as u32
}

/// 64-bit FNV-1a of a text: job ids' seeds, and batch lines' job ids.
pub fn fnv1a(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl QueuedJob {
    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("job", self.id.clone()),
            ("endpoint", self.endpoint.name().to_string()),
            ("body", self.body.to_string()),
            ("enqueued_ms", now_ms().to_string()),
        ]
    }

    /// Reads an entry back; an entry that is not a job says what is wrong with it (a
    /// front end of another version wrote it, or something else did).
    pub fn from_entry(map: &HashMap<String, redis::Value>) -> Result<Self, String> {
        let text = |name: &str| -> Result<String, String> {
            match map.get(name) {
                Some(v) => redis::from_redis_value_ref::<String>(v)
                    .map_err(|_| format!("the entry's `{name}` is not text")),
                None => Err(format!("the entry has no `{name}` field")),
            }
        };
        let id = text("job")?;
        check_id(&id)?;
        let endpoint = text("endpoint")?;
        let endpoint = Endpoint::from_name(&endpoint)
            .ok_or_else(|| format!("unknown endpoint `{endpoint}`"))?;
        let body: Value = serde_json::from_str(&text("body")?)
            .map_err(|e| format!("the entry's body is not JSON: {e}"))?;
        if !body.is_object() {
            return Err("the entry's body is not a JSON object".into());
        }
        Ok(Self { id, endpoint, body })
    }

    /// The job id an entry names, if any (to answer its client even when the rest is bad).
    pub fn id_of(map: &HashMap<String, redis::Value>) -> Option<String> {
        let id = redis::from_redis_value_ref::<String>(map.get("job")?).ok()?;
        check_id(&id).ok()?;
        Some(id)
    }
}

/// A job's answer: the HTTP status and JSON body its client gets, and where and when it
/// ran (`meta`: the worker, the times it was queued, started and finished, in ms).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResult {
    pub status: u16,
    pub body: Value,
    pub meta: Value,
}

impl StoredResult {
    pub fn new(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            meta: Value::Null,
        }
    }

    pub fn encode(&self) -> String {
        json!({ "status": self.status, "body": self.body, "meta": self.meta }).to_string()
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("a stored result is not JSON: {e}"))?;
        let status = v
            .get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .ok_or("a stored result has no status")?;
        Ok(Self {
            status,
            body: v.get("body").cloned().unwrap_or(Value::Null),
            meta: v.get("meta").cloned().unwrap_or(Value::Null),
        })
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_seeds() {
        assert!(check_id("batch-3f2a.17").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("a b").is_err());
        assert!(check_id("a:b").is_err());
        assert_eq!(seed_from_id("x"), seed_from_id("x"));
        assert_ne!(seed_from_id("job-1"), seed_from_id("job-2"));
        let mut f = Fields::from_map(serde_json::Map::new());
        pin_seed(&mut f, "job-1");
        assert_eq!(f.to_value()["seed"], json!(seed_from_id("job-1")));
        let mut f = Fields::parse(br#"{"seed": 7}"#).unwrap();
        pin_seed(&mut f, "job-1");
        assert_eq!(f.to_value()["seed"], json!(7));
        for random in ["-1", "-1.0", "\"-1\"", "null"] {
            let mut f = Fields::parse(format!(r#"{{"seed": {random}}}"#).as_bytes()).unwrap();
            pin_seed(&mut f, "job-2");
            assert_eq!(
                f.to_value()["seed"],
                json!(seed_from_id("job-2")),
                "{random}"
            );
        }
    }

    #[test]
    fn results_round_trip() {
        let r = StoredResult {
            status: 400,
            body: json!({"detail": "x"}),
            meta: json!({"worker": "w"}),
        };
        assert_eq!(StoredResult::decode(&r.encode()).unwrap(), r);
        assert!(StoredResult::decode("{}").is_err());
    }
}
