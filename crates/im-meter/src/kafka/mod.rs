//! The Kafka edge: client settings shared by every stage, topic administration,
//! producing events (`im-meter produce`), and the worker's stages (`im-meter run`).

pub mod admin;
pub mod bill;
pub mod changelog;
pub mod meter;
pub mod output;
pub mod produce;
pub mod worker;

use rdkafka::ClientConfig;

use crate::config::Config;

/// Client settings common to every producer, consumer and admin client.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.file.kafka.brokers)
        // Name the process in broker logs and quotas.
        .set("client.id", "im-meter");
    client
}
