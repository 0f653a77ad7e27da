//! What each worker can run, published beside its heartbeat, and what the front ends make of
//! it: the model lists clients read (`/sdapi/v1/sd-models`, `loras`, ...) are the union over
//! the live workers, and a job naming a checkpoint goes to that checkpoint's stream.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult};
use serde_json::{json, Value};

use super::job::now_ms;
use super::keys;
use crate::serve::models::Checkpoint;
use crate::serve::{a1111, controlnet, AppState};

/// How often a worker says it is alive (and what it has).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A worker not heard from for this long is taken for gone.
pub const LIVE_FOR: Duration = Duration::from_secs(10);

/// The lists a worker answers with: the same JSON its in-process server would give.
pub async fn lists(app: &Arc<AppState>) -> Value {
    let sd_models = a1111::sd_models(State(app.clone())).await.0;
    let loras = a1111::loras(State(app.clone())).await.0;
    let vaes = a1111::sd_vae(State(app.clone())).await.0;
    let embeddings = a1111::embeddings(State(app.clone())).await.0;
    let controlnets = controlnet::model_list(State(app.clone()))
        .await
        .map(|j| j.0)
        .unwrap_or_else(|_| json!({ "model_list": [] }));
    json!({
        "sd-models": sd_models,
        "loras": loras,
        "sd-vae": vaes,
        "embeddings": embeddings,
        "controlnet-models": controlnets["model_list"],
        "default": app.models.selected().title,
    })
}

/// One heartbeat: the worker's entry in the live set and its inventory.
pub async fn publish(
    conn: &mut ConnectionManager,
    name: &str,
    inventory: &Value,
) -> RedisResult<()> {
    redis::pipe()
        .zadd(keys::WORKERS, name, now_ms())
        .set_ex(
            keys::worker(name),
            inventory.to_string(),
            LIVE_FOR.as_secs(),
        )
        .query_async(conn)
        .await
}

/// Takes a worker off the live set (at a clean exit).
pub async fn withdraw(conn: &mut ConnectionManager, name: &str) -> RedisResult<()> {
    redis::pipe()
        .zrem(keys::WORKERS, name)
        .del(keys::worker(name))
        .query_async(conn)
        .await
}

/// The inventories of the workers heard from lately.
pub async fn live(conn: &mut ConnectionManager) -> RedisResult<Vec<Value>> {
    let since = now_ms().saturating_sub(LIVE_FOR.as_millis() as u64);
    let names: Vec<String> = conn.zrangebyscore(keys::WORKERS, since, "+inf").await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<String> = names.iter().map(|n| keys::worker(n)).collect();
    let texts: Vec<Option<String>> = redis::cmd("MGET").arg(&entries).query_async(conn).await?;
    Ok(texts
        .into_iter()
        .flatten()
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect())
}

/// The union of one list over the workers, without repeats (by `key`, or the whole value).
pub fn union(inventories: &[Value], list: &str, key: Option<&str>) -> Value {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for inventory in inventories {
        for item in inventory[list].as_array().into_iter().flatten() {
            let id = match key {
                Some(k) => item[k].to_string(),
                None => item.to_string(),
            };
            if seen.insert(id) {
                out.push(item.clone());
            }
        }
    }
    Value::Array(out)
}

/// The embeddings of all workers, as one A1111 answer: loaded where any worker loaded it,
/// skipped where every worker that has it skipped it.
pub fn embeddings(inventories: &[Value]) -> Value {
    let mut lists = [serde_json::Map::new(), serde_json::Map::new()];
    for inventory in inventories {
        for (list, key) in lists.iter_mut().zip(["loaded", "skipped"]) {
            for (name, v) in inventory["embeddings"][key]
                .as_object()
                .into_iter()
                .flatten()
            {
                list.entry(name.clone()).or_insert(v.clone());
            }
        }
    }
    let [loaded, mut skipped] = lists;
    skipped.retain(|name, _| !loaded.contains_key(name));
    json!({ "loaded": loaded, "skipped": skipped })
}

/// The checkpoint a name means among the workers' checkpoints (as A1111 matches names),
/// as `(title, model_name)`: the model name picks the job's stream.
pub fn find_checkpoint(inventories: &[Value], name: &str) -> Option<(String, String)> {
    inventories
        .iter()
        .flat_map(|i| i["sd-models"].as_array().into_iter().flatten())
        .find_map(|m| {
            let checkpoint = Checkpoint {
                title: m["title"].as_str()?.to_string(),
                model_name: m["model_name"].as_str()?.to_string(),
                source: String::new(),
                vae: None,
            };
            checkpoint
                .answers_to(name)
                .then_some((checkpoint.title, checkpoint.model_name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_embedding_is_skipped_only_where_no_worker_loaded_it() {
        let sd15 = json!({"embeddings": {"loaded": {"neg": {"shape": 768}}, "skipped": {"xl": {"shape": 1280}}}});
        let sdxl = json!({"embeddings": {"loaded": {"xl": {"shape": 1280}}, "skipped": {"neg": {"shape": 768}, "odd": {"shape": 48}}}});
        let all = embeddings(&[sd15, sdxl]);
        let names = |list: &str| -> Vec<String> {
            all[list].as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(names("loaded"), ["neg", "xl"]);
        assert_eq!(names("skipped"), ["odd"]);
    }

    #[test]
    fn unions_and_names() {
        let a = json!({"sd-models": [{"title": "a.safetensors", "model_name": "a"}], "loras": [{"name": "x"}]});
        let b = json!({"sd-models": [{"title": "a.safetensors", "model_name": "a"}, {"title": "b.ckpt", "model_name": "b"}], "loras": [{"name": "y"}]});
        let all = [a, b];
        assert_eq!(
            union(&all, "sd-models", Some("title"))
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            union(&all, "loras", Some("name")).as_array().unwrap().len(),
            2
        );
        assert_eq!(
            find_checkpoint(&all, "b"),
            Some(("b.ckpt".to_string(), "b".to_string()))
        );
        assert_eq!(
            find_checkpoint(&all, "a.safetensors [0123abcd]").map(|c| c.1),
            Some("a".to_string())
        );
        assert_eq!(find_checkpoint(&all, "c"), None);
    }
}
