//! One process's dashboard values (`setDashValue`) and metrics (`metric`),
//! the latest of each, and the count of what was dropped on its way to it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use serde_json::{Value, json};

use super::bounds;
use crate::locked;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Counter,
    Gauge,
    Timing,
}

impl MetricType {
    pub fn name(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Timing => "timing",
        }
    }

    /// The StatsD type suffix.
    pub fn statsd(self) -> &'static str {
        match self {
            MetricType::Counter => "c",
            MetricType::Gauge => "g",
            MetricType::Timing => "ms",
        }
    }
}

/// One `metric()` call as it came.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    #[serde(rename = "type")]
    pub kind: MetricType,
}

#[derive(Deserialize)]
struct Dash {
    id: Value,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    color: Option<String>,
}

#[derive(Default)]
struct Values {
    dash: BTreeMap<String, (Value, Option<String>)>,
    metrics: BTreeMap<String, (f64, MetricType)>,
    /// What StatsD has not been told yet: counters as the sum since the
    /// last report, gauges and timings as the latest value. Its names are
    /// among `metrics`', so it is bounded the same.
    unreported: BTreeMap<String, (f64, MetricType)>,
}

#[derive(Default)]
pub struct Board {
    values: Mutex<Values>,
    /// Messages, offers and stream data not delivered to this process
    /// (it did not read), and dashboard values and metrics refused.
    dropped: AtomicU64,
}

impl Board {
    pub fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Keeps a `dash` frame's value; a malformed one or one beyond the
    /// bounds is counted as a drop.
    pub fn dash(&self, payload: &[u8]) {
        if self.try_dash(payload).is_none() {
            self.count_drop();
        }
    }

    fn try_dash(&self, payload: &[u8]) -> Option<()> {
        let dash: Dash = serde_json::from_slice(payload).ok()?;
        let id = match dash.id {
            Value::String(id) => id,
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let fits = id.len() <= bounds::NAME_BYTES
            && dash
                .color
                .as_ref()
                .is_none_or(|c| c.len() <= bounds::COLOR_BYTES)
            && dash.value.to_string().len() <= bounds::DASH_VALUE_BYTES;
        let mut values = locked(&self.values);
        if !fits || (values.dash.len() >= bounds::DASH_IDS && !values.dash.contains_key(&id)) {
            return None;
        }
        values.dash.insert(id, (dash.value, dash.color));
        Some(())
    }

    /// Keeps a `metric` frame's value (counters add up) and gives it back
    /// for StatsD; a malformed one or one beyond the bounds is counted as
    /// a drop.
    pub fn metric(&self, payload: &[u8]) -> Option<Metric> {
        let metric = self.try_metric(payload);
        if metric.is_none() {
            self.count_drop();
        }
        metric
    }

    fn try_metric(&self, payload: &[u8]) -> Option<Metric> {
        let metric: Metric = serde_json::from_slice(payload).ok()?;
        if metric.name.is_empty()
            || metric.name.len() > bounds::NAME_BYTES
            || !metric.value.is_finite()
        {
            return None;
        }
        let mut values = locked(&self.values);
        if values.metrics.len() >= bounds::METRIC_NAMES
            && !values.metrics.contains_key(&metric.name)
        {
            return None;
        }
        let Values {
            metrics,
            unreported,
            ..
        } = &mut *values;
        for table in [metrics, unreported] {
            let entry = table
                .entry(metric.name.clone())
                .or_insert((0.0, metric.kind));
            entry.0 = match metric.kind {
                MetricType::Counter if entry.1 == MetricType::Counter => entry.0 + metric.value,
                _ => metric.value,
            };
            entry.1 = metric.kind;
        }
        Some(metric)
    }

    /// The StatsD lines of what changed since the last call, each name
    /// after `prefix.`.
    pub fn statsd_lines(&self, prefix: &str, name_of: impl Fn(&str) -> String) -> Vec<String> {
        let unreported = std::mem::take(&mut locked(&self.values).unreported);
        unreported
            .into_iter()
            .map(|(name, (value, kind))| {
                format!("{prefix}.{}:{value}|{}", name_of(&name), kind.statsd())
            })
            .collect()
    }

    /// `{"<id>": {"value": …, "color": …}}`, the status data's `dash`.
    pub fn dash_json(&self) -> Value {
        let values = locked(&self.values);
        Value::Object(
            values
                .dash
                .iter()
                .map(|(id, (value, color))| (id.clone(), json!({"value": value, "color": color})))
                .collect(),
        )
    }

    /// `{"<name>": {"value": …, "type": …}}`, the status data's `metrics`.
    pub fn metrics_json(&self) -> Value {
        let values = locked(&self.values);
        Value::Object(
            values
                .metrics
                .iter()
                .map(|(name, (value, kind))| {
                    (name.clone(), json!({"value": value, "type": kind.name()}))
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_gauges_keep_the_latest() {
        let board = Board::default();
        for _ in 0..3 {
            board.metric(br#"{"name":"hits","value":2,"type":"counter"}"#);
        }
        board.metric(br#"{"name":"load","value":1.5,"type":"gauge"}"#);
        board.metric(br#"{"name":"load","value":0.5,"type":"gauge"}"#);
        assert_eq!(
            board.metrics_json(),
            json!({"hits": {"value": 6.0, "type": "counter"}, "load": {"value": 0.5, "type": "gauge"}})
        );
        assert_eq!(board.dropped(), 0);
    }

    #[test]
    fn statsd_hears_counters_as_sums_since_its_last_report() {
        let board = Board::default();
        board.metric(br#"{"name":"hits","value":2,"type":"counter"}"#);
        board.metric(br#"{"name":"hits","value":3,"type":"counter"}"#);
        board.metric(br#"{"name":"took","value":12.5,"type":"timing"}"#);
        let name = |n: &str| n.to_owned();
        assert_eq!(
            board.statsd_lines("p.w.0", name),
            ["p.w.0.hits:5|c", "p.w.0.took:12.5|ms"]
        );
        assert!(board.statsd_lines("p.w.0", name).is_empty());
        board.metric(br#"{"name":"hits","value":1,"type":"counter"}"#);
        assert_eq!(board.statsd_lines("p.w.0", name), ["p.w.0.hits:1|c"]);
        assert_eq!(board.metrics_json()["hits"]["value"], 6.0);
    }

    #[test]
    fn malformed_and_excess_values_are_dropped_and_counted() {
        let board = Board::default();
        board.metric(br#"{"name":"x","value":1,"type":"histogram"}"#);
        board.dash(br#"{"id":[1],"value":1}"#);
        board.dash(format!(r#"{{"id":1,"value":"{}"}}"#, "v".repeat(5000)).as_bytes());
        assert_eq!(board.dropped(), 3);
        for id in 0..bounds::DASH_IDS + 5 {
            board.dash(format!(r#"{{"id":{id},"value":{id},"color":"red"}}"#).as_bytes());
        }
        assert_eq!(
            board.dash_json().as_object().unwrap().len(),
            bounds::DASH_IDS
        );
        assert_eq!(board.dropped(), 8);
        board.dash(br#"{"id":1,"value":"again","color":null}"#);
        assert_eq!(
            board.dash_json()["1"],
            json!({"value": "again", "color": null})
        );
        assert_eq!(board.dropped(), 8);
    }
}
