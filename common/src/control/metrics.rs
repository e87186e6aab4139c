//! Statistics as metric families: one model, rendered as JSON (`stats`) or in the Prometheus
//! text exposition format (`stats --prometheus`), so the two can never disagree.

use std::fmt::Write;

use serde::Serialize;

use super::counters::HistogramSnapshot;

/// What a family measures (Prometheus `# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One sample's value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Number {
        value: f64,
    },
    Histogram {
        /// `(upper bound in seconds, cumulative count)`; the +Inf bucket is `count`.
        buckets: Vec<(f64, u64)>,
        count: u64,
        /// Seconds.
        sum: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Label names and values, in the order given (a JSON object).
    #[serde(serialize_with = "labels_as_object")]
    pub labels: Vec<(&'static str, String)>,
    #[serde(flatten)]
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

/// The statistics of one daemon, built fresh for each request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    pub families: Vec<Family>,
}

impl Metrics {
    pub fn push(&mut self, family: Family) {
        self.families.push(family);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for s in &f.samples {
                match &s.value {
                    Value::Number { value } => {
                        let _ = writeln!(
                            out,
                            "{}{} {}",
                            f.name,
                            labels(&s.labels, None),
                            number(*value)
                        );
                    }
                    Value::Histogram {
                        buckets,
                        count,
                        sum,
                    } => {
                        for (le, c) in buckets {
                            let le = number(*le);
                            let _ = writeln!(
                                out,
                                "{}_bucket{} {c}",
                                f.name,
                                labels(&s.labels, Some(&le))
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {count}",
                            f.name,
                            labels(&s.labels, Some("+Inf"))
                        );
                        let _ = writeln!(
                            out,
                            "{}_sum{} {}",
                            f.name,
                            labels(&s.labels, None),
                            number(*sum)
                        );
                        let _ =
                            writeln!(out, "{}_count{} {count}", f.name, labels(&s.labels, None));
                    }
                }
            }
        }
        out
    }
}

impl Family {
    pub fn new(name: &'static str, help: &'static str, kind: Kind) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a counter or gauge sample.
    pub fn number(&mut self, labels: Vec<(&'static str, String)>, value: u64) -> &mut Self {
        // Counters beyond 2^53 lose precision as f64, as they do in Prometheus itself.
        #[allow(clippy::cast_precision_loss)]
        let value = value as f64;
        self.samples.push(Sample {
            labels,
            value: Value::Number { value },
        });
        self
    }

    /// Adds a float gauge sample (seconds, ratios).
    pub fn float(&mut self, labels: Vec<(&'static str, String)>, value: f64) -> &mut Self {
        self.samples.push(Sample {
            labels,
            value: Value::Number { value },
        });
        self
    }

    /// Adds a latency histogram sample.
    pub fn histogram(
        &mut self,
        labels: Vec<(&'static str, String)>,
        h: &HistogramSnapshot,
    ) -> &mut Self {
        #[allow(clippy::cast_precision_loss)]
        let buckets = h
            .cumulative
            .iter()
            .map(|(us, c)| (*us as f64 / 1e6, *c))
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let sum = h.sum_ns as f64 / 1e9;
        self.samples.push(Sample {
            labels,
            value: Value::Histogram {
                buckets,
                count: h.count,
                sum,
            },
        });
        self
    }
}

fn labels_as_object<S: serde::Serializer>(
    pairs: &[(&'static str, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

fn labels(pairs: &[(&'static str, String)], le: Option<&str>) -> String {
    if pairs.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let mut first = true;
    let all = pairs
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(le.map(|le| ("le", le)));
    for (k, v) in all {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
    out
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::counters::LatencyHistogram;

    #[test]
    fn prometheus_text_has_help_type_labels_and_histogram_series() {
        let mut m = Metrics::default();
        let mut f = Family::new("bulkhead_test_total", "Things \"counted\".", Kind::Counter);
        f.number(vec![("queue", "0".into()), ("type", "read".into())], 7);
        m.push(f);
        let h = LatencyHistogram::default();
        h.record(20_000);
        let mut f = Family::new("bulkhead_test_seconds", "Latency.", Kind::Histogram);
        f.histogram(vec![("queue", "0".into())], &h.snapshot());
        m.push(f);
        let text = m.to_prometheus();
        assert!(text.contains("# TYPE bulkhead_test_total counter\n"));
        assert!(text.contains("bulkhead_test_total{queue=\"0\",type=\"read\"} 7\n"));
        assert!(text.contains("bulkhead_test_seconds_bucket{queue=\"0\",le=\"0.00001\"} 0\n"));
        assert!(text.contains("bulkhead_test_seconds_bucket{queue=\"0\",le=\"0.000025\"} 1\n"));
        assert!(text.contains("bulkhead_test_seconds_bucket{queue=\"0\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("bulkhead_test_seconds_count{queue=\"0\"} 1\n"));
        assert!(text.contains("bulkhead_test_seconds_sum{queue=\"0\"} 0.00002\n"));
    }

    #[test]
    fn json_labels_are_an_object() {
        let mut f = Family::new("x_total", "X.", Kind::Counter);
        f.number(vec![("queue", "1".into())], 2);
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["samples"][0]["labels"]["queue"], "1");
        assert_eq!(v["samples"][0]["value"], 2.0);
        assert_eq!(v["type"], "counter");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("a", "x\"y\\z\n".into())], None),
            "{a=\"x\\\"y\\\\z\\n\"}"
        );
    }
}
