//! The clock probe: asks the broker for its time, so that the worker's own clock can be
//! checked ([`crate::clock`]). Every [`PROBE_EVERY`] it writes an empty record to
//! `{kafka.group_id}.clock`, a topic whose timestamps the broker sets on append
//! (`message.timestamp.type=LogAppendTime`), and reads the broker's time from the delivery
//! report, between the worker's times of sending and of the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::message::{Message, Timestamp as KafkaTimestamp};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use tracing::{info, warn};

use crate::clock::ClockCheck;
use crate::status::now_ms;

/// How often the probe asks the broker for its time.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);

/// The topic the probe writes to: one partition, records kept an hour, stamped by the broker.
pub fn topic(group_id: &str) -> String {
    format!("{group_id}.clock")
}

/// Keeps the broker's answer to the probe's record.
struct Answer {
    broker_ms: std::sync::Mutex<Option<Result<i64, String>>>,
}

impl ClientContext for Answer {}

impl ProducerContext for Answer {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let answer = match result {
            Ok(m) => match m.timestamp() {
                KafkaTimestamp::LogAppendTime(ms) => Ok(ms),
                other => Err(format!(
                    "the broker did not stamp the record ({other:?}): the topic's message.timestamp.type must be LogAppendTime"
                )),
            },
            Err((e, _)) => Err(e.to_string()),
        };
        if let Ok(mut slot) = self.broker_ms.lock() {
            *slot = Some(answer);
        }
    }
}

/// The probe: a producer of its own writing to the clock topic.
pub struct Probe {
    producer: BaseProducer<Answer>,
    topic: String,
    max_skew: Duration,
    /// Whether the last measurement found the clock suspect (to log changes only).
    suspect: bool,
}

impl Probe {
    /// A probe for `group_id`'s clock topic, judging by `max_skew`.
    pub fn new(client: &ClientConfig, group_id: &str, max_skew: Duration) -> anyhow::Result<Self> {
        let producer = client
            .clone()
            .set("linger.ms", "0")
            .create_with_context(Answer { broker_ms: std::sync::Mutex::new(None) })
            .context("cannot create the clock probe's producer")?;
        Ok(Probe { producer, topic: topic(group_id), max_skew, suspect: false })
    }

    /// Asks the broker for its time once (waiting up to 5 s for the answer) and records the
    /// answer in `check`. A broker that does not answer leaves the last measurement to age
    /// out; a topic that does not stamp records is an error (a configuration to fix).
    pub fn measure(&mut self, check: &ClockCheck) -> anyhow::Result<()> {
        let topic = self.topic.as_str();
        if let Ok(mut slot) = self.producer.context().broker_ms.lock() {
            *slot = None;
        }
        let sent = now_ms();
        if let Err((e, _)) = self.producer.send(BaseRecord::<(), [u8]>::to(topic).payload(b"")) {
            warn!(error = %e, topic, "clock: cannot send the probe");
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            self.producer.poll(Duration::from_millis(20));
            let answer = self.producer.context().broker_ms.lock().ok().and_then(|mut slot| slot.take());
            if answer.is_some() || Instant::now() >= deadline {
                break answer;
            }
        };
        let answered = now_ms();
        match answer {
            Some(Ok(broker_ms)) => {
                let offset_ms = check.measured(sent, answered, broker_ms, self.max_skew);
                let suspect = check.problem().is_some();
                if suspect && !self.suspect {
                    warn!(offset_ms, topic, "clock: this worker's clock disagrees with the broker's beyond billing.max_clock_skew; judging events by the broker's");
                } else if !suspect && self.suspect {
                    info!(offset_ms, "clock: this worker's clock agrees with the broker's again");
                }
                self.suspect = suspect;
            }
            Some(Err(why)) if why.contains("LogAppendTime") => anyhow::bail!("topic {topic}: {why}"),
            Some(Err(why)) => warn!(error = why, topic, "clock: the probe was not delivered"),
            None => warn!(topic, "clock: the broker did not answer the probe within 5 s"),
        }
        Ok(())
    }

    /// Measures every [`PROBE_EVERY`] until `stop` is set.
    pub fn run(mut self, check: &ClockCheck, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut next = Instant::now() + PROBE_EVERY;
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                next = Instant::now() + PROBE_EVERY;
                self.measure(check)?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}
